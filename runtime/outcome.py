"""How a stage run under `dvc` ends when it does not succeed: `runtime.launch` supervises the
stage's process and, whatever ended it (an error, a bad input, Ctrl-C, SIGTERM, a kill, the `dvc`
it runs under going away), puts back the last good outputs that `dvc repro` removed before
running it, and says in one line what happened and what to run next."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import suppress

STOPPED_BY = {  # the ways a stage's process is stopped from outside, by exit code
    128 + signal.SIGINT: "was interrupted (SIGINT, Ctrl-C)",
    128 + signal.SIGTERM: "was stopped (SIGTERM)",
    128 + signal.SIGKILL: "was killed (SIGKILL: `kill -9`, or the kernel's out-of-memory killer)",
}

ORPHANED = "was stopped: the `dvc` (or pipeline flow) it ran under is gone"


def stopped_by(code: int) -> str | None:
    """What an exit code says about a signal that ended the stage; None for a plain exit code."""
    if code in STOPPED_BY:
        return STOPPED_BY[code]
    if 128 < code < 128 + signal.NSIG:
        return f"was ended by {signal.Signals(code - 128).name}"
    return None


class Supervised:
    """The launcher's watch over one stage process: `started` is told its PID, `code` holds its
    exit code; on leaving, a run that did not exit 0 has its last good outputs put back and is
    explained. If the `dvc` (or pipeline flow) it runs under goes first, the stage process is
    killed and its outputs put back before this process ends (`runtime.lifetime.end_with`)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.child: int | None = None
        self.code: int | None = None
        self._ending = threading.Lock()  # the stage's end is handled once: here, or by `_orphaned`
        self._ended = False
        self.lives_by: list = []  # the `dvc` (or pipeline flow) it runs under, and what is between

    def started(self, pid: int) -> None:
        self.child = pid

    def __enter__(self) -> Supervised:
        from runtime.invocation import current_invocation, lineage
        from runtime.lifetime import end_with

        if (invocation := current_invocation()) is not None:
            self.lives_by = lineage(invocation)
            end_with(self.lives_by, what=f"stage '{self.stage}'", then=self._orphaned)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, KeyboardInterrupt):  # before the stage's process took over Ctrl-C
            self.code = 128 + signal.SIGINT
        elif exc is not None:
            self.code = 1
        with self._ending:
            if self.code and not self._ended:
                restored = put_back(self.stage)
                if not all(process.alive() for process in self.lives_by):  # the stage saw it go first
                    self._say(ORPHANED)
                elif (how := stopped_by(self.code)) is not None:
                    self._say(how)
                elif restored:
                    print(f"stage '{self.stage}' failed: nothing was changed, its last good outputs are in place",
                          file=sys.stderr, flush=True)
            self._ended = True
        if isinstance(exc, KeyboardInterrupt):
            sys.exit(self.code)
        return False

    def _orphaned(self) -> None:
        """The `dvc` this stage ran under is gone: stop the stage's process, then put back."""
        import psutil

        with self._ending:
            if self._ended:
                return
            if self.child is not None:
                with suppress(psutil.Error):
                    process = psutil.Process(self.child)
                    process.kill()
                    process.wait(timeout=10)
            put_back(self.stage)
            self._say(ORPHANED)
            self._ended = True

    def _say(self, how: str) -> None:
        with suppress(OSError):  # nobody may be reading any more
            print(f"stage '{self.stage}' {how}: nothing was changed, its last good outputs are in place; "
                  f"`dvc repro {self.stage}` runs it again (a training stage resumes from its checkpoint)",
                  file=sys.stderr, flush=True)


def put_back(stage: str) -> list[str]:
    """The stage's last good outputs back in place (`runtime.dag.restore_outs`); the paths put back."""
    from runtime.dag import restore_outs

    try:
        return restore_outs(stage)
    except Exception as err:  # the stage's own error is the one to report
        with suppress(OSError):
            print(f"could not put back the last good outputs of '{stage}' ({type(err).__name__}: {err}); "
                  f"`dvc checkout {stage}` restores the cached ones", file=sys.stderr)
        return []
