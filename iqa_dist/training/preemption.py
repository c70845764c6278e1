"""Stop requests: a signal, Ctrl-C or a stop file asks the run to checkpoint after its step."""

from __future__ import annotations

import os
import signal
import time


class PreemptionFlag:
    """A request to checkpoint at the end of the step and exit: SIGUSR1 or SIGTERM to this
    process, Ctrl-C (SIGINT) once training runs (`interrupts`; a second Ctrl-C a second later
    quits at once), or the file named by $IQA_DIST_STOP_FILE appearing (the SLURM scripts and
    `iqa-dist launch` touch it: no signal has to get through torchrun's agent)."""

    def __init__(self) -> None:
        self.raised = False
        self.interrupted_at: float | None = None
        self.stop_file = os.environ.get("IQA_DIST_STOP_FILE", "")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.raised = True

    def interrupts(self, announce: bool) -> None:
        """From now on Ctrl-C checkpoints like SIGTERM (before, during data preparation, it simply
        stops). The main process says so once, in one line."""
        def handle(signum: int, frame) -> None:
            now = time.monotonic()
            # the terminal's Ctrl-C and the launcher's forwarded one arrive together: only a press
            # a second later is the user's second Ctrl-C
            if self.interrupted_at is not None and now - self.interrupted_at > 1.0:
                raise KeyboardInterrupt
            if self.interrupted_at is None and announce:
                os.write(2, b"Ctrl-C: checkpointing after this step (Ctrl-C again to quit at once)\n")
            self.interrupted_at = self.interrupted_at or now
            self.raised = True

        signal.signal(signal.SIGINT, handle)

    def requested(self) -> bool:
        return self.raised or bool(self.stop_file and os.path.exists(self.stop_file))
