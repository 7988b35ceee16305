"""The one redaction function: which names hold secrets, and the log filter that hides their values."""

from __future__ import annotations

import logging

import pytest

from expertune.redaction import (
    REDACTED,
    SecretFilter,
    is_secret_name,
    redacted,
    remember_secret,
    scrub,
    shown_value,
)


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "AWS_SESSION_TOKEN", "aws_secret_access_key",
                                  "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS", "hub_token"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name) and shown_value(name, "abc123") == REDACTED


@pytest.mark.parametrize("name", ["HF_HOME", "WANDB_MODE", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM"])
def test_plain_names(name: str) -> None:
    assert not is_secret_name(name) and shown_value(name, "value") == "value"


def test_a_document_is_redacted_at_any_depth() -> None:
    document = {"id": "x", "aws_secret_access_key": "s3cr3t", "nested": [{"HF_TOKEN": "t0k3n", "ok": 1}],
                "empty_token": ""}
    assert redacted(document) == {"id": "x", "aws_secret_access_key": REDACTED,
                                  "nested": [{"HF_TOKEN": REDACTED, "ok": 1}], "empty_token": ""}
    assert document["aws_secret_access_key"] == "s3cr3t"  # a copy


def test_the_log_filter_hides_known_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_API_KEY", "value-from-env-123")
    remember_secret("value-from-file-456")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s and %s", ("value-from-env-123",
                               "value-from-file-456"), None)
    assert SecretFilter().filter(record)
    assert record.getMessage() == f"sent {REDACTED} and {REDACTED}"
    assert scrub("no secret here") == "no secret here"


@pytest.mark.parametrize("asked, level", [(None, logging.INFO), ("1", logging.NOTSET)])
def test_botocores_wire_log_stays_off_under_verbose_unless_asked_by_name(
        monkeypatch: pytest.MonkeyPatch, asked: str | None, level: int) -> None:
    from expertune import cli

    if asked is None:
        monkeypatch.delenv(cli.DEBUG_BOTO_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cli.DEBUG_BOTO_VARIABLE, asked)
    loggers = [logging.getLogger(name) for name in cli.WIRE_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
    try:
        cli._setup_logging(verbose=True)
        assert [logger.level for logger in loggers] == [level] * len(loggers)
        assert all(any(isinstance(f, SecretFilter) for f in handler.filters) for handler in logging.getLogger().handlers)
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


def test_the_filter_sees_a_variable_added_after_its_last_record(monkeypatch: pytest.MonkeyPatch) -> None:
    hide = SecretFilter()
    first = logging.LogRecord("x", logging.INFO, __file__, 1, "nothing", (), None)
    assert hide.filter(first)
    monkeypatch.setenv("LATE_ACCESS_TOKEN", "late-value-789")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", ("late-value-789",), None)
    assert hide.filter(record) and record.getMessage() == f"got {REDACTED}"
