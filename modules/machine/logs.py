"""What a run says: each module speaks through its own logger (logging.getLogger(__name__), all under "modules"),
and the command line sets them up once (setup_logging). Information goes to stdout and warnings to stderr, each as
the plain line it is (a message says "note:" or "warning:" itself where it is one); only the main process of a DDP
run speaks; --quiet keeps the warnings alone. Progress bars (tqdm) are not logging: they show at a terminal only, and
not under --quiet (shows_progress)."""
import logging
import os
import sys
from contextlib import contextmanager

ROOT = "modules"


class StandardStream(logging.Handler):
    """Writes each record as one line to sys.stdout or sys.stderr as they are when it comes (so output that a caller
    redirected or captured after start-up goes where the caller wants it)."""

    def __init__(self, name: str):
        super().__init__()
        self.stream_name = name

    def emit(self, record) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed or broken stream must not end a week-long run
            self.handleError(record)


@contextmanager
def silenced(name: str):
    """The logger name (and those under it) says nothing below an error while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def shows_progress() -> bool | None:
    """tqdm's disable for a progress bar: None (shown at a terminal only) where information is said, True (never
    shown) under --quiet or in a DDP run's other processes."""
    speaks = logging.getLogger(ROOT).isEnabledFor(logging.INFO) and os.environ.get("RANK", "0") == "0"
    return None if speaks else True


def main_process_only(record) -> bool:
    """Only the main process of a DDP run (torchrun's RANK 0, or a run without torchrun) speaks."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging(quiet: bool = False) -> None:
    """The handlers of every module's logger: information to stdout, warnings and worse to stderr, rank 0 only;
    quiet: warnings only. Calling it again replaces what an earlier call set (and only that)."""
    logger = logging.getLogger(ROOT)
    for handler in [handler for handler in logger.handlers if isinstance(handler, StandardStream)]:
        logger.removeHandler(handler)
    information, warnings = StandardStream("stdout"), StandardStream("stderr")
    information.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings.setLevel(logging.WARNING)
    for handler in (information, warnings):
        handler.addFilter(main_process_only)
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
