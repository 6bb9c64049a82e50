"""The time value of each stored step (condition.txt time_values, written by --import from the solver's files), so
outputs that ParaView opens (.pvd, .xdmf) carry the simulation's times rather than step numbers."""
from pathlib import Path

import numpy as np

from modules.data.design_inputs import is_number
from modules.errors import InputError

TIMES_FIX = "give one time value per stored step (Dim2 of them, increasing) in a .npy or a .csv of one column"


def read_time_values(path, n_steps: int) -> np.ndarray:
    """The Dim2 times in path (.npy, or .csv of one column that may start with a header line), checked: as many as
    steps, finite, increasing. InputError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "time_values file does not exist", "give a path relative to the working directory, "
                         "or leave time_values empty")
    try:
        if path.suffix.lower() == ".npy":
            times = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".csv":
            lines = [line.split(",")[0].strip() for line in path.read_text().splitlines() if line.strip()]
            header = bool(lines) and not is_number(lines[0])
            times = np.array([float(line) for line in lines[header:]])
        else:
            raise InputError(path, f"has suffix '{path.suffix}', not .npy or .csv", TIMES_FIX)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(path, f"cannot be read as time values ({error})", TIMES_FIX) from None
    times = np.asarray(times, dtype=np.float64).ravel()
    if len(times) != n_steps:
        raise InputError(path, f"holds {len(times)} time values for {n_steps} steps (Dim2)", TIMES_FIX)
    if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
        raise InputError(path, "holds times that are not finite and increasing", TIMES_FIX)
    return times


def case_time_values(config) -> np.ndarray | None:
    """The times of all Dim2 steps from config.time_values (a path relative to the case folder), None without it."""
    return read_time_values(config.time_values, config.n_steps) if config.time_values else None
