"""Versioned config snapshots (OneTrainer's pattern): every change of the config's shape gets a version and
a migration, and a stored snapshot is migrated step by step before anything compares it.

A checkpoint stores `config_version` next to its config snapshot (`Config.to_dict()`); resume migrates the
stored snapshot to `CONFIG_VERSION` and only then compares it with the current config, so a renamed or
moved option is not reported as a change. To change the config's shape: bump `CONFIG_VERSION` and add
`MIGRATIONS[old_version] = function(snapshot) -> snapshot of old_version + 1`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from expertune.errors import ConfigError

CONFIG_VERSION = 2
Snapshot = dict[str, dict[str, Any]]


def _validation_resolution_as_text(snapshot: Snapshot) -> Snapshot:
    """1 -> 2 (issue 19): validation_resolution became text (1024x1024, several comma-separated)."""
    section = snapshot.get("validation", {})
    if isinstance(section.get("validation_resolution"), int):
        section["validation_resolution"] = str(section["validation_resolution"])
    return snapshot


# MIGRATIONS[v] turns a snapshot of version v into one of version v + 1.
MIGRATIONS: dict[int, Callable[[Snapshot], Snapshot]] = {1: _validation_resolution_as_text}


def migrate_snapshot(snapshot: Snapshot, version: int | None, source: str = "the checkpoint") -> Snapshot:
    """`snapshot` of config version `version` (None: written before versions, i.e. 1) as one of `CONFIG_VERSION`."""
    current = 1 if version is None else int(version)
    if current > CONFIG_VERSION:
        raise ConfigError(f"{source} holds a config of version {current}; this expertune knows versions up to "
                          f"{CONFIG_VERSION}: upgrade expertune to resume it")
    migrated = copy.deepcopy(snapshot)
    while current < CONFIG_VERSION:
        step = MIGRATIONS.get(current)
        if step is None:
            raise ConfigError(f"{source} holds a config of version {current} and no migration to version "
                              f"{current + 1} exists; start a new run")
        migrated = step(migrated)
        current += 1
    return migrated
