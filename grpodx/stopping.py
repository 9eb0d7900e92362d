"""Why a run stops before its last step, and what it tells the user then.

Three causes, each with a checkpoint to resume from: Ctrl-C (:class:`CtrlC`), too many failed episodes
for too many steps in a row (:class:`FailureBreaker`), and outputs that can no longer be written
(:func:`cannot_write`). Every file is written atomically, so the last checkpoint is whole in all three.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from grpodx.storage import RunStorage


class TrainingHalted(RuntimeError):
    """The run stopped itself after saving a checkpoint; the message says why and how to resume."""


class TrainingInterrupted(TrainingHalted):
    """Ctrl-C stopped the run after a step, with a checkpoint."""


def checkpoint_dir(step: int) -> str:
    """The checkpoint of step ``step``, relative to the run directory."""
    return f"checkpoints/step-{step:06d}"


class CtrlC:
    """The first Ctrl-C asks the run to stop after the step in progress (``requested``); a second one
    stops it at once. Used as ``with CtrlC(log) as ctrl_c:`` inside the running event loop."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._watching = False

    def __enter__(self) -> CtrlC:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_signal)
        except (RuntimeError, ValueError):  # not the main thread: Ctrl-C keeps its default meaning
            return self
        self._watching = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            self._watching = False

    def _on_signal(self) -> None:
        if self.requested:
            self._stop_watching()
            raise KeyboardInterrupt
        self.requested = True
        self._log("Ctrl-C: stopping after the step in progress, with a checkpoint (Ctrl-C again: at once)")


class FailureBreaker:
    """Trips once more than ``max_failed_share`` of the episodes failed in ``max_failed_steps`` steps in
    a row: a dead API or simulator would otherwise have the run "train" on nothing, and pay for failed
    calls."""

    def __init__(self, max_failed_share: float, max_failed_steps: int):
        self.max_failed_share = max_failed_share
        self.max_failed_steps = max_failed_steps
        self._failing_steps = 0

    def on_step(self, failed_share: float) -> bool:
        """Count one step; True when the run must stop."""
        self._failing_steps = self._failing_steps + 1 if failed_share > self.max_failed_share else 0
        return self._failing_steps >= self.max_failed_steps

    def halted(self, step: int, failures: str | None, checkpoint: str) -> TrainingHalted:
        return TrainingHalted(
            f"stopped at step {step}: more than {self.max_failed_share:.0%} of the episodes failed in "
            f"{self.max_failed_steps} steps in a row (last step: {failures}). Fix the cause, then resume "
            f"with --load-checkpoint {checkpoint} (or raise train.max_failed_share / train.max_failed_steps)"
        )


def cannot_write(
    storage: RunStorage, step: int, saved: str | None, what: str, error: OSError
) -> TrainingHalted:
    """The run stops when its outputs cannot be written (a full disk, a lost mount): training on without
    them would lose what it learns. ``saved`` is the newest checkpoint the run wrote, if any."""
    reason = error.strerror or str(error) or type(error).__name__
    message = f"stopped at step {step}: cannot write {what} to {storage.display()} ({reason}); "
    if saved is None:
        return TrainingHalted(message + "no checkpoint was written yet")
    resume = f"--load-checkpoint {storage.display(saved)}"
    return TrainingHalted(message + f"the last checkpoint is intact: free space, then resume with {resume}")
