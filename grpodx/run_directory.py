"""Where a run writes: a new run directory, or the one of the checkpoint it resumes from."""

from __future__ import annotations

import time
from pathlib import Path

from grpodx.config import Config, ConfigError
from grpodx.preflight import CHECKPOINT_STATE, check_checkpoint, open_run_root
from grpodx.storage import RunStorage


def new_run_dir(config: Config) -> RunStorage:
    """A fresh run directory under ``train.run_dir`` (a local path or a URI such as s3://bucket/runs)."""
    root = open_run_root(config.train.run_dir)
    name = config.train.run_name or time.strftime("%Y%m%d-%H%M%S")
    candidate, suffix = name, 1
    while root.exists(candidate):
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return root.child(candidate)


def checkpoint_location(checkpoint: str) -> tuple[RunStorage, str]:
    """``<run>/checkpoints/step-N`` (a path or URI) as (the run's storage, the path below it)."""
    text = str(checkpoint).rstrip("/")
    if "://" in text:
        parts = text.rsplit("/", 2)
        run_root, rel = parts[0], "/".join(parts[1:])
    else:
        path = Path(text).resolve()
        if len(path.parents) < 2:  # "/" or "/x": no run directory above it
            raise ConfigError(
                f"--load-checkpoint {checkpoint}: not a checkpoint directory; pass one such as "
                "runs/<run>/checkpoints/step-000100"
            )
        run_root, rel = str(path.parents[1]), f"{path.parent.name}/{path.name}"
    try:
        return RunStorage(run_root), rel
    except ValueError as exc:  # a URI pyarrow cannot open
        raise ConfigError(f"--load-checkpoint {checkpoint}: {exc}") from None


def open_checkpoint(
    load_checkpoint: str, config: Config, expected_adapter: dict
) -> tuple[RunStorage, str, dict]:
    """The run storage of a checkpoint to resume from, its path below it and its checked state
    (:func:`grpodx.preflight.check_checkpoint`); a clear error when it is not whole."""
    storage, checkpoint = checkpoint_location(load_checkpoint)
    complete = storage.exists(f"{checkpoint}/{CHECKPOINT_STATE}") and (
        storage.is_local or storage.is_complete_dir(checkpoint)
    )
    if not complete:
        raise ConfigError(
            f"--load-checkpoint {load_checkpoint}: no complete checkpoint there; "
            "pass a directory such as runs/<run>/checkpoints/step-000100"
        )
    return storage, checkpoint, check_checkpoint(storage, checkpoint, config, expected_adapter)
