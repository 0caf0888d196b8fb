"""Clean stops: SIGINT (Ctrl-C) and SIGTERM end a run at the end of the current step, with a checkpoint.

Inside :class:`StopOnSignal` the two signals only set a flag; the training loop looks at it after each
step, writes its logs and a checkpoint, and raises :class:`RunInterrupted`. The command line turns that
into one line and the conventional exit status (128 + the signal's number: 130 for SIGINT, 143 for
SIGTERM). A second signal while the first is being handled stops at once, as before. Handlers are only
installed in the main thread of a single process (a multi-process run's ranks would stop at different
steps, and a checkpoint there is a collective), and the previous handlers come back on exit.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after a whole step: the step, the signal, and the checkpoint written (or None)."""

    def __init__(self, step: int, signum: int, checkpoint: str | os.PathLike | None):
        self.step, self.signum = int(step), int(signum)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.exit_status = 128 + self.signum
        saved = (f"checkpoint {self.checkpoint} written; --resume continues from it" if self.checkpoint is not None
                 else "no checkpoint_dir, so nothing was saved")
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {self.step}: {saved}")

    def __str__(self) -> str:
        return str(self.args[0])


class StopOnSignal:
    """Context manager: ``.signum`` becomes the first SIGINT/SIGTERM received inside (None until then)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: no more waiting for the step to end
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


__all__ = ["RunInterrupted", "StopOnSignal"]
