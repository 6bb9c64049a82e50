"""What defines each design, read from the user's files in dataset order: a parameter CSV or a folder of images.

Row i of the CSV, or the i-th image in natural-sorted order (design_2 before design_10), belongs to design i of the
dataset. Images become float32 [n, C, S, S] in [0, 1] with C = 1 (grayscale) or 3 (colour). Every problem with the
files raises InputError naming the file (and line), never a traceback and never a silent fix-up.
"""
import csv
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.errors import InputError

NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NOT_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
DIGITS = re.compile(r"([0-9]+)")


# ---- parameter CSV

def read_parameters(path, num_param: int | None = None) -> tuple[np.ndarray, list[str] | None]:
    """CSV of design parameters -> (float64 [n, P], column names or None when the file has no header).

    One row per design. The first non-blank row is a header when it holds text that is not a number. Separator:
    comma, else semicolon or tab when the first row has no comma. Blank lines are skipped.
    """
    path = Path(path)
    rows = _csv_rows(path)  # [(line number, cells)], blank lines already gone
    if not rows:
        raise InputError(path, "has no data rows", "put one row of parameters per design in it")
    names = _header(path, *rows[0])
    data_rows = rows[1:] if names is not None else rows
    if not data_rows:
        raise InputError(path, "has no data rows (only the header)", "add one row of parameters per design under it")
    width = len(rows[0][1])
    values = np.empty((len(data_rows), width), dtype=np.float64)
    for i, (line, cells) in enumerate(data_rows):
        if len(cells) != width:
            raise InputError(path, f"has {len(cells)} cells but the first row has {width}",
                             f"give every row {width} values", line=line)
        values[i] = [_number(path, line, column, cell, names) for column, cell in enumerate(cells, start=1)]
    if num_param and num_param != width:
        raise InputError(path, f"has {width} columns but num_param is {num_param}",
                         f"set num_param {width} in input_data/condition.txt or fix the file")
    return values, names


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise InputError(path, "parameter file not found" if not path.exists() else "is a folder, not a CSV file",
                         "check param_dir in input_data/condition.txt")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError:
        raise InputError(path, "is not UTF-8 text (an Excel .xlsx, or a CSV in a legacy encoding?)",
                         "save it from Excel as 'CSV UTF-8 (comma delimited)'") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    separator = "," if "," in first else ";" if ";" in first else "\t" if "\t" in first else ","
    reader = csv.reader(lines, delimiter=separator)
    rows = []
    for cells in reader:
        if any(cell.strip() for cell in cells) or len(cells) > 1:  # ",," is a row of empty cells, not a blank line
            rows.append((reader.line_num, [cell.strip() for cell in cells]))
    return rows


def _header(path, line, cells) -> list[str] | None:
    """The column names when the first row is a header, None when it is already data."""
    text = [cell for cell in cells if cell and not is_number(cell)]
    if not text:
        return None
    numbers = [cell for cell in cells if is_number(cell)]
    if numbers:  # a typo in the first design would otherwise silently turn it into a header and drop it
        raise InputError(path, f"the first row mixes numbers ({numbers[0]!r}) and text ({text[0]!r}), so it is "
                         "neither a clean header nor a row of numbers",
                         "give every column a name that is not a number, or fix the text cell", line=line)
    return cells


def is_number(cell: str) -> bool:
    return NUMBER.fullmatch(cell) is not None or cell.lower() in NOT_FINITE


def _number(path, line, column, cell, names) -> float:
    where = f"column {column}" + (f" ({names[column - 1]})" if names and names[column - 1] else "")
    if not cell:
        raise InputError(path, f"{where} is empty", "give every design a value in every column", line=line)
    if cell.lower() in NOT_FINITE:
        raise InputError(path, f"{where} is {cell}", "give a finite number (or remove that design)", line=line)
    if NUMBER.fullmatch(cell) is None:
        decimal_comma = re.fullmatch(r"[+-]?\d+,\d+", cell) is not None
        raise InputError(path, f"{where} is {cell!r}, not a number",
                         "write numbers with a '.' decimal point" if decimal_comma else "fix that cell", line=line)
    return float(cell)  # Python's float() is correctly rounded: 1e-3 reads as exactly the double 0.001


# ---- image files and their order

def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as numbers, text case-insensitively ("design_2.png" < "Design_10.png")."""
    parts = DIGITS.split(name)  # text, number, text, ...: positions always hold the same kind, so tuples compare
    return tuple(int(part) if i % 2 else part.lower() for i, part in enumerate(parts)), name


def image_files(folder, extension: str) -> list[Path]:
    """The files directly in folder with that extension (".jpg" and ".jpeg" alike), natural-sorted by name.

    Hidden files (".name", such as macOS "._design_1.png" copies) are not images of designs and are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "image folder not found" if not folder.exists() else "is a file, not a folder",
                         "check param_dir in input_data/condition.txt")
    wanted = _suffixes(extension)
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    chosen = sorted((f for f in files if f.suffix.lower() in wanted), key=lambda f: natural_key(f.name))
    if not chosen:
        held = sorted({f.suffix.lower() or "(no extension)" for f in files})
        raise InputError(folder, f"has no {'/'.join(sorted(wanted))} files (it holds: "
                         f"{', '.join(held) if held else 'nothing'})",
                         "put the design images there, or set param_data_type in input_data/condition.txt to "
                         "their extension")
    return chosen


def _suffixes(extension: str) -> set[str]:
    suffix = "." + extension.lower().lstrip(".")
    return {".jpg", ".jpeg"} if suffix in (".jpg", ".jpeg") else {suffix}


def check_image_count(files: list[Path], n_designs: int, folder, extension) -> None:
    """Raise InputError unless there is exactly one image per design, saying where the numbering breaks."""
    if len(files) == n_designs:
        return
    raise InputError(folder, f"holds {len(files)} {extension} images but there are {n_designs} designs (Dim1); "
                     f"{_first_mismatch(files, n_designs)}",
                     f"make the folder hold exactly one image per design ({n_designs} of them), in design order")


def _first_mismatch(files: list[Path], n_designs: int) -> str:
    numbers = _design_numbers(files)
    if numbers is None:
        return (f"the names hold no numbers (first {files[0].name}, last {files[-1].name}); images are matched to "
                "designs in natural-sorted order") if files else "the folder has none"
    first = int(numbers[0].group())
    for i, match in enumerate(numbers):
        number, expected = int(match.group()), first + i
        if number > expected:
            return (f"{_renumbered(files[i], match, expected)} is missing ({files[i - 1].name} is followed by "
                    f"{files[i].name})")
        if number < expected:
            return f"extra image {files[i].name} (number {number} comes after {files[i - 1].name})"
    if len(files) > n_designs:
        return f"extra image {files[n_designs].name}"
    return f"the last image is {files[-1].name}, so {n_designs - len(files)} images are missing at the end"


def _design_numbers(files) -> list[re.Match] | None:
    """Per file, the digits of its design number: the number that varies across names (the last one if none does)."""
    found = [list(DIGITS.finditer(f.stem)) for f in files]
    if not found or not all(found):
        return None
    position = -1
    if len({len(matches) for matches in found}) == 1:  # same pattern everywhere: skip constant parts like "_v2"
        varying = [p for p in range(len(found[0])) if len({int(m[p].group()) for m in found}) > 1]
        position = varying[-1] if varying else -1
    return [matches[position] for matches in found]


def _renumbered(file: Path, match: re.Match, number: int) -> str:
    """The name the missing file would have: this file's name with its number replaced, zero-padding kept."""
    digits = match.group()
    width = len(digits) if digits.startswith("0") else 1
    return file.stem[:match.start()] + str(number).zfill(width) + file.stem[match.end():] + file.suffix


# ---- pixels

def image_sizes(paths) -> dict:
    """{(width, height): the first file of that size} of the images, read from their headers only."""
    sizes = {}
    for path in paths:
        with _opened_image(path) as image:
            sizes.setdefault(image.size, Path(path).name)
    return sizes


def image_channels(paths) -> int:
    """1 when every image is grayscale (a gray mode, or R, G and B identical), 3 when any has colour."""
    return 3 if any(_has_colour(_pixels(path)) for path in paths) else 1


def read_images(paths, size: int, channels: int) -> np.ndarray:
    """Image files -> float32 [n, channels, size, size] in [0, 1], resized (bilinear, antialiased) when needed.

    channels 3 repeats a grayscale image; channels 1 refuses an image with colour.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    paths = list(paths)
    images = np.empty((len(paths), channels, size, size), dtype=np.float32)  # filled one image at a time
    for i, path in enumerate(paths):
        pixels = _pixels(path)
        if channels == 1 and _has_colour(pixels):
            raise InputError(path, "has colour but the model was trained on grayscale images",
                             "give grayscale images, or retrain the model on colour images")
        pixels = pixels[:, :, :1] if channels == 1 else np.repeat(pixels, 3 // pixels.shape[2], axis=2)
        images[i] = _resized(pixels, size).transpose(2, 0, 1)
    return images


def read_condition_images(folder_or_file, extension: str, size: int, channels: int | None
                          ) -> tuple[np.ndarray, list[Path], int]:
    """For prediction: a folder (every image with that extension, natural-sorted) or one image file.

    Returns (float32 [n, channels, size, size], their paths, channels); channels None detects it from the images.
    """
    source = Path(folder_or_file)
    if not source.exists():
        raise InputError(source, "not found", "give an image file or a folder of images")
    paths = image_files(source, extension) if source.is_dir() else [source]
    channels = image_channels(paths) if channels is None else channels
    return read_images(paths, size, channels), paths, channels


def _pixels(path) -> np.ndarray:
    """One image -> float32 [H, W, 1 or 3] in [0, 1]; alpha dropped, palettes expanded, never thresholded."""
    with _opened_image(path) as image:
        image.load()
        return _scaled(path, image)


@contextmanager
def _opened_image(path):
    """PIL's image of path; a file it cannot read (truncated, corrupt, not an image at all) is an InputError naming
    the file, whether at opening or while the block reads it."""
    try:
        with Image.open(path) as image:
            yield image
    except InputError:
        raise
    except Exception as error:
        raise InputError(path, f"cannot read it as an image ({type(error).__name__}: {error})",
                         "replace it with a valid image file") from None


def _scaled(path, image) -> np.ndarray:
    mode = image.mode
    if mode == "1" or mode == "L" or mode == "LA":
        array = np.asarray(image, dtype=np.float32)
        array = array if mode == "1" else array / 255  # mode "1" arrives as booleans: already 0 and 1
        return (array[:, :, :1] if mode == "LA" else array[:, :, None]).astype(np.float32)
    if mode == "I" or mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float64)
        if array.min() < 0 or array.max() > 65535:
            raise InputError(path, f"has pixel values from {array.min():g} to {array.max():g}, outside the 16-bit "
                             "range 0..65535", "save it as an 8- or 16-bit image")
        return (array / 65535).astype(np.float32)[:, :, None]
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InputError(path, "has NaN or infinite pixel values", "save it with finite values")
        return np.clip(array, 0, 1)[:, :, None]  # float images are taken to be in [0, 1] already
    if mode not in ("RGB", "RGBA"):  # palette, CMYK, YCbCr, ...: let PIL convert; RGBA keeps palette transparency
        image = image.convert("RGBA" if mode in ("P", "PA") else "RGB")
    return np.asarray(image, dtype=np.float32)[:, :, :3] / 255


def _has_colour(pixels: np.ndarray) -> bool:
    return pixels.shape[2] == 3 and not (np.array_equal(pixels[..., 0], pixels[..., 1])
                                         and np.array_equal(pixels[..., 0], pixels[..., 2]))


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C]. Resized per channel as float ("F") images so 16-bit detail survives."""
    if pixels.shape[:2] == (size, size):
        return pixels
    planes = [Image.fromarray(np.ascontiguousarray(pixels[:, :, c])) for c in range(pixels.shape[2])]
    return np.stack([np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR)) for plane in planes], axis=2)


# ---- training-time augmentation

def augment_images(images: torch.Tensor, flip: bool, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """[B, C, H, W] -> same shape: random flips and/or integer shifts (zero-filled), only what is switched on.

    The random numbers are drawn on the CPU from generator, so a run is reproducible whatever the images' device.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, not {max_shift}")
    count = images.shape[0]
    if flip:
        horizontal = (torch.rand(count, generator=generator) < 0.5).to(images.device)[:, None, None, None]
        vertical = (torch.rand(count, generator=generator) < 0.5).to(images.device)[:, None, None, None]
        images = torch.where(horizontal, images.flip(-1), images)
        images = torch.where(vertical, images.flip(-2), images)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator).to(images.device)
        images = _shifted(images, shifts[:, 0], shifts[:, 1])
    return images


def _shifted(images, dy, dx):
    """Move image b down by dy[b] and right by dx[b] pixels; pixels that come in from outside are 0."""
    count, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device)[None, :] - dy[:, None]  # [B, H]: output row y reads row y - dy
    cols = torch.arange(width, device=images.device)[None, :] - dx[:, None]
    out = images.gather(2, rows.clamp(0, height - 1)[:, None, :, None].expand(count, channels, height, width))
    out = out.gather(3, cols.clamp(0, width - 1)[:, None, None, :].expand(count, channels, height, width))
    inside = ((rows >= 0) & (rows < height))[:, None, :, None] & ((cols >= 0) & (cols < width))[:, None, None, :]
    return out.masked_fill(~inside, 0)
