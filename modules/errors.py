"""The two ways a command ends early, as exceptions only the command line turns into a message and an exit code.

InputError: bad user input (config, data, checkpoints): one line and exit code 2, never a traceback.
Stopped: a training stopped by a signal after saving its state: one line and exit code 128 + the signal number.
"""
import signal


class InputError(Exception):
    """A problem with something the user gave us, said in one line: where, what, and how to fix it."""

    def __init__(self, path, problem: str, fix: str, line: int | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.line = line
        super().__init__(self.message())

    def message(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.problem}. Fix: {self.fix}"


class Stopped(Exception):
    """Training stopped on a signal after saving its state; the command line exits with 128 + the signal number."""

    def __init__(self, signal_number: int, checkpoint, where: str):
        self.signal_number, self.checkpoint, self.where = signal_number, checkpoint, where
        super().__init__(f"stopped by {signal.Signals(signal_number).name} {where}")
