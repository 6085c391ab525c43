"""What a stage process's Prefect logs leave out and take in: `ReportedOnce` drops the repeats
of an error reported once elsewhere; `warnings_to_run_logs` sends Python warnings to the run's
logs."""

from __future__ import annotations

import logging
import warnings

from prefect.exceptions import TerminationSignal

from runtime.failures import causes, disk_full
from tasks.errors import StageError

INTERRUPTED = ("aborted by an interrupt signal", "aborted by a termination signal")  # Prefect's crash messages


class ReportedOnce(logging.Filter):
    """Prefect logs a failing task's and flow's exception with its traceback, then again in each
    final state: for a StageError, a message meant for the user, and a full disk, `main` prints it
    once instead; an interrupt, the launcher reports (`runtime.outcome`), and so an error raised
    while handling one too (Prefect's crash handling can fail on it). Records repeating `messages`
    (reported already) are left out too."""

    def __init__(self, *messages: str):
        super().__init__()
        self.messages: set[str] = set(messages)
        self._judged: dict[int, tuple[BaseException, bool]] = {}  # by id; the error kept, so its id stays its own

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if any(isinstance(cause, (KeyboardInterrupt, TerminationSignal)) for cause in causes(error)) or any(
            m in record.getMessage() for m in INTERRUPTED
        ):
            return False
        if error is not None and self._reported_by_main(error):
            return False
        return not any(message in record.getMessage() for message in self.messages)

    def _reported_by_main(self, error: BaseException) -> bool:
        """A StageError or a full disk (judged once per error, however many records carry it)."""
        if id(error) not in self._judged:
            reported = isinstance(error, StageError) or disk_full(error) is not None
            self._judged[id(error)] = (error, reported)
            if reported:
                self.messages.add(str(error))
        return self._judged[id(error)][1]


def warnings_to_run_logs() -> None:
    """Python warnings raised in a flow or task run go to its logs at WARNING, so the UI's level
    filter finds them; others print as usual."""
    show = warnings.showwarning

    def log_or_show(message, category, filename, lineno, file=None, line=None):
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            logger = get_run_logger()
        except MissingContextError:
            return show(message, category, filename, lineno, file, line)
        logger.warning("%s: %s", category.__name__, message)

    warnings.showwarning = log_or_show
