"""Stop training cleanly on SIGTERM / SIGINT / a multi-host preemption notice.

Usage in the training loop::

    with PreemptionGuard() as guard:
        for step in range(start, steps + 1):
            ...train one step...
            if guard.should_stop(step):
                checkpointer.save(step, state, data_state, force=True)
                checkpointer.wait()
                print(guard.message(step))
                break

The signal handler only sets a flag: the current step finishes, the state is saved and
`dsa-train train` exits with ``dsa_train.exit_codes.PREEMPTED`` (75), so a scheduler can requeue it. A second SIGINT (Ctrl-C twice) interrupts at once.

Multi-process jobs: every process must stop at the same step or the final save deadlocks. There,
the decision comes from JAX's preemption sync point
(``jax.experimental.multihost_utils.reached_preemption_sync_point``), which agrees on one step
across processes once any of them received SIGTERM; Python signal handlers are not installed, so
JAX's own notifier keeps receiving the signal.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

import jax

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def _preemption_sync_point_reached(step: int) -> bool:
    try:
        from jax.experimental import multihost_utils
    except ImportError:
        return False
    check = getattr(multihost_utils, "reached_preemption_sync_point", None)
    if check is None:
        return False
    try:
        return bool(check(step))
    except RuntimeError:
        # The preemption sync manager only exists when jax.distributed was initialized with it.
        return False


class PreemptionGuard:
    """Context manager: installs flag-setting SIGTERM/SIGINT handlers, restores the old ones."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 multi_process: Optional[bool] = None):
        self.signals = tuple(signals)
        self.multi_process = jax.process_count() > 1 if multi_process is None else multi_process
        self.received: Optional[int] = None  # the first signal received
        self.reason: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save
        if self.received is None:
            self.received = signum
            self.reason = f"received {_NAMES.get(signum, f'signal {signum}')}"

    def install(self) -> "PreemptionGuard":
        # Signal handlers can only be installed from the main thread; elsewhere (e.g. a trainer
        # run inside a worker thread) the guard still works through request_stop / the sync point.
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install`` (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def request_stop(self, reason: str) -> None:
        """Ask for a stop from code (tests, a time budget, a watchdog)."""
        if self.reason is None:
            self.reason = reason

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested; call it every step, with the same step on all hosts."""
        if self.reason is not None:
            return True
        if self.multi_process and _preemption_sync_point_reached(step):
            self.reason = "reached the preemption sync point"
            return True
        return False

    def message(self, step: int, saved_step: Optional[int] = None) -> str:
        """The line to print once the final checkpoint (``saved_step``, default ``step``) is committed."""
        saved_step = step if saved_step is None else saved_step
        return (f"preempted at step {step}: {self.reason or 'stop requested'}; the checkpoint of step {saved_step} "
                "is saved: run the same command again to resume")
