"""Secrets never leave the process: the one place that decides what is a secret and hides it.

A secret is the value of any variable or field whose name holds TOKEN (not TOKENIZER), KEY, SECRET, PASSWORD, PASSWD or
CREDENTIAL (case-insensitive: `HF_TOKEN`, `WANDB_API_KEY`, `AWS_SESSION_TOKEN`, `aws_secret_access_key`). Code
that prints, logs or records a name with its value goes through `shown_value` (one value) or `redacted` (a JSON
document: a config snapshot, a dataloader entry). As a backstop, `install_log_redaction` puts a filter on the
root logger's handlers that replaces, in every record, the secret values it knows: those of the environment's
secret variables and those `remember_secret` was given (a dataloader's credentials, say).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import TypeVar

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"TOKEN(?!IZER)|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter values ("1", "yes") are not hunted for in log lines

_known: set[str] = set()
_lock = threading.Lock()

J = TypeVar("J")


def is_secret_name(name: str) -> bool:
    """Whether a variable or field called `name` holds a secret (see the module doc)."""
    return bool(SECRET_NAME.search(name))


def shown_value(name: str, value: str) -> str:
    """`value` as it may be printed, logged or recorded under `name`: REDACTED for a secret's non-empty value."""
    return REDACTED if value and is_secret_name(name) else value


def redacted(document: J) -> J:
    """A copy of a JSON-like document whose values under secret names (at any depth) are REDACTED."""
    if isinstance(document, Mapping):
        return {key: (REDACTED if isinstance(key, str) and is_secret_name(key) and value not in (None, "")
                      else redacted(value)) for key, value in document.items()}  # type: ignore[return-value]
    if isinstance(document, list):
        return [redacted(item) for item in document]  # type: ignore[return-value]
    if isinstance(document, tuple):
        return tuple(redacted(item) for item in document)  # type: ignore[return-value]
    return document


def remember_secret(value: str | None) -> None:
    """A secret value the log filter must hide wherever it appears (credentials read from a file)."""
    if value and len(value) >= _MIN_SECRET_LENGTH:
        with _lock:
            _known.add(value)


def known_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values the log filter hides: the environment's secret variables' and the remembered ones, longest first."""
    source = os.environ if environ is None else environ
    values = {value for name, value in source.items() if is_secret_name(name) and len(value) >= _MIN_SECRET_LENGTH}
    with _lock:
        values |= _known
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every known secret value replaced by REDACTED."""
    for secret in known_secrets() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """Replaces known secret values in a record's message (and its exception text) before any handler writes it.

    The values are gathered again every `REFRESH_S` seconds (a `-v` run logs thousands of lines), and at once when
    a variable or a remembered secret is added."""

    REFRESH_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self._when = -1.0
        self._sizes = (-1, -1)

    def _current(self) -> list[str]:
        now, sizes = time.monotonic(), (len(_known), len(os.environ))
        if now - self._when > self.REFRESH_S or sizes != self._sizes:  # a new variable or remembered secret: now
            self._secrets, self._when, self._sizes = known_secrets(), now, sizes
        return self._secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._current()
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging's own handler reports it, with nothing formatted here
            return True
        cleaned = scrub(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if scrub(text, secrets) != text:
                record.exc_text, record.exc_info = scrub(text, secrets), None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put a SecretFilter on every handler of `logger` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(existing, SecretFilter) for existing in handler.filters):
            handler.addFilter(SecretFilter())
