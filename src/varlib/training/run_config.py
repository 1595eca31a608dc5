"""The resolved config a run was started with, kept in its folder so that a re-run can check it continues the same
run: a changed command stops before training instead of resuming silently (or dying on a state_dict mismatch).

``<output_dir>/run_config.yaml`` is written when a run starts or resumes (once its parts are built); a resume first
compares the new resolved config with it key by key. Keys in :data:`RESUMABLE_CHANGES` may differ (longer training, more or fewer processes when the
global batch is kept, loaders, logging, progress); any other difference is an error that lists each key, old -> new,
unless ``resume=force``.
"""

from __future__ import annotations

import logging
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RUN_CONFIG_FILENAME = "run_config.yaml"
#: Dotted keys (fnmatch patterns) that may change when a run resumes.
RESUMABLE_CHANGES = (
    "resume", "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "final_validation", "export_name",
    "paths.*", "cpu_threads", "data.num_workers", "data.persistent_workers", "data.pin_memory",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.num_sanity_val_steps", "logger", "logger.*", "callbacks.progress_bar", "callbacks.progress_bar.*",
    "callbacks.step_checkpoint.*",
)
#: How the global batch is split: these may change together when ``data.global_batch_size`` is set and kept.
BATCH_SPLIT = ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches", "data.batch_size")

_MISSING = "<absent>"


def check_resume_mode(resume: Any) -> None:
    """Refuses a ``resume`` value other than true, false and force."""
    if not (isinstance(resume, bool) or resume == "force"):
        raise ValueError(f"resume: expected true, false or force, got {resume!r}")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists and scalars are leaves, an empty dict is a leaf too."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python values, interpolations resolved (``???`` stays as is)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def config_changes(started: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every dotted key whose value differs and may not change on resume."""
    old, new = flatten(started), flatten(now)
    changed = {key: (old.get(key, _MISSING), new.get(key, _MISSING))
               for key in sorted(old.keys() | new.keys()) if old.get(key, _MISSING) != new.get(key, _MISSING)}
    global_batch = old.get("data.global_batch_size", _MISSING)
    batch_kept = global_batch not in (None, _MISSING) and "data.global_batch_size" not in changed
    return {key: values for key, values in changed.items()
            if not any(fnmatchcase(key, pattern) for pattern in RESUMABLE_CHANGES)
            and not (batch_kept and key in BATCH_SPLIT)}


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """One line per key: ``  key: old -> new``."""
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def describe_changes(changes: dict[str, tuple[Any, Any]], path: Path) -> str:
    """The error of a changed resume: each change, and the two ways on."""
    return (f"this command differs from the run it would resume (started with {path}):\n{format_changes(changes)}\n"
            "Start a fresh run instead (resume=false, or another task_name / paths.output_dir), or continue this one "
            "with the new values anyway (resume=force).")


def write_run_config(path: Path, config: dict[str, Any]) -> None:
    """Writes atomically (every rank may write the same content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(temporary, path)


def check_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """Compares ``cfg`` with the config the run in ``output_dir`` started with (a resume): raises a ValueError that
    lists the changes, unless ``cfg.resume`` is ``force``."""
    path = output_dir / RUN_CONFIG_FILENAME
    if not path.is_file():
        log.warning("%s is missing: the resumed run's settings cannot be compared with those it started with", path)
        return
    changes = config_changes(yaml.safe_load(path.read_text()), resolved_container(cfg))
    if changes and cfg.resume == "force":
        log.warning("resume=force: continuing with changed settings\n%s", format_changes(changes))
    elif changes:
        raise ValueError(describe_changes(changes, path))


def record_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """Keeps ``cfg`` (resolved) as the config of the run in ``output_dir``, for the next resume to compare with."""
    write_run_config(output_dir / RUN_CONFIG_FILENAME, resolved_container(cfg))
