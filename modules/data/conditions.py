"""What defines each design: the parameter CSV or the geometry images at param_dir, read and checked against the
data before anything trains or moves."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.data.design_inputs import check_image_count, image_channels, image_files, read_images, read_parameters
from modules.errors import InputError


@dataclass
class Conditions:
    """What defines each design, in dataset order."""

    values: np.ndarray          # [N, P] parameters or [N, C, S, S] images in [0, 1]
    param_names: list | None    # the CSV header, if any
    channels: int | None        # images only


def read_conditions(config) -> Conditions:
    """The CSV rows or images at param_dir, checked against Dim1 and num_param."""
    path = Path(config.param_dir)
    if config.design_inputs == "parameters":
        csv_path = _single_csv(path) if path.is_dir() else path
        values, names = read_parameters(csv_path, config.num_param or None)
        if len(values) != config.n_designs:
            raise InputError(csv_path, f"has {len(values)} data rows but Dim1 is {config.n_designs}",
                             "give one row per design, in dataset order")
        return Conditions(values, names, None)
    files = image_files(path, config.condition_extension)
    check_image_count(files, config.n_designs, path, config.condition_extension)
    channels = image_channels(files)
    return Conditions(read_images(files, config.image_size, channels), None, channels)


def _single_csv(folder: Path) -> Path:
    files = sorted(folder.glob("*.csv"))
    if len(files) != 1:
        raise InputError(folder, f"param_dir is a folder holding {len(files)} .csv files",
                         "point param_dir at the parameter CSV itself")
    return files[0]
