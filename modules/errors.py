"""The one error type for bad user input (config, data, checkpoints).

Code below the command line raises InputError; only the entry point turns it into a one-line message and exit code 2,
so a bad file never produces a traceback.
"""


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
