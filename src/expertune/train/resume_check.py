"""Whether a checkpoint may be resumed under the current config: each option's resume rule, the differences
between the checkpoint's config snapshot and the current config, and the refusal that lists them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertune.config.migrations import migrate_snapshot
from expertune.config.schema import FIELDS, section_resume_rule
from expertune.errors import ConfigError

log = logging.getLogger(__name__)


def resume_rule(section: str, name: str) -> str:
    """The option's own resume rule (config.schema RESUME_RULES); an option no longer known is refused
    unless its section may change."""
    spec = FIELDS.get(name)
    if spec is not None:
        return spec.resume_rule
    return section_resume_rule(section)


@dataclass(frozen=True)
class ConfigChange:
    section: str
    name: str
    before: Any
    after: Any

    @property
    def harmless(self) -> bool:
        return resume_rule(self.section, self.name) == "may_change"

    def __str__(self) -> str:
        return f"{self.name}: {self.before!r} -> {self.after!r}"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """Every field whose value differs between a checkpoint's config snapshot and the current config."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        before, after = saved.get(section, {}), current.get(section, {})
        for name in sorted(n for n in set(before) | set(after) if resume_rule(section, n) != "not_compared"):
            if name not in before and name in FIELDS and after.get(name) == FIELDS[name].default:
                continue  # an option added since the checkpoint was written, left at its default
            if before.get(name) != after.get(name):
                changes.append(ConfigChange(section, name, before.get(name), after.get(name)))
    return changes


def check_resume_compatible(document: dict[str, Any], config_snapshot: dict[str, Any],
                            run_identity: dict[str, Any], allow_config_change: bool, checkpoint: Path) -> list[str]:
    """Refuse a resume that would silently change the run; returns the accepted harmless changes.

    The stored snapshot is first migrated to this expertune's config version (config.migrations), so an
    option that was renamed or moved since is compared under its current name.
    """
    saved = migrate_snapshot(document["config"], document.get("config_version"), f"checkpoint {checkpoint}")
    changes = config_changes(saved, config_snapshot)
    problems = [f"{change} (cannot change on resume)" for change in changes if not change.harmless]
    for key in sorted(set(document["run_identity"]) | set(run_identity)):
        if document["run_identity"].get(key) != run_identity.get(key):
            problems.append(f"{key} differs from the checkpoint's (the datasets or model changed)")
    harmless = [str(change) for change in changes if change.harmless]
    if harmless and not allow_config_change:
        problems += [f"{change} (pass --allow_config_change to accept)" for change in harmless]
    if problems:
        raise ConfigError(
            f"resuming from {checkpoint} with a different configuration is refused:\n  " + "\n  ".join(problems)
        )
    for change in harmless:
        log.warning("resuming with a changed setting: %s", change)
    return harmless
