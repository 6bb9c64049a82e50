"""Generated cases for the accuracy benchmark (bench/accuracy.py): closed forms or short solves, deterministic for a
seed, each written as a case folder that SimulGenVAE trains on as a user's would be.

- pulse: a Gaussian pulse advected and diffused on a periodic unit square, u_t + a . grad u = D lap u, in closed
  form. 5 parameters per design: start x0, y0, direction theta, speed v, diffusivity D. A feature that moves across
  the mesh: what a spatially linear decoder (and POD) cannot compress.
- burgers: viscous Burgers u_t + u u_x = nu u_xx on a periodic [0, 2 pi) from u0 = a + b sin(x - phi), solved by
  finite volumes (Rusanov flux, central diffusion, explicit steps); 4 parameters a, b, phi, nu. A steepening front
  that travels at a speed set by a.
- beam: a cantilever (Euler-Bernoulli, length 1) loaded step by step, in closed form: tip force P, uniform load q and
  tip moment M, scaled by a load factor (k / steps) ** gamma, over a stiffness EI; 5 parameters P, q, M, EI, gamma.
  A near-linear static family: POD with 16 modes reconstructs a held-out design to about 1e-7, so any surrogate that
  loses to POD there loses to rounding.
- shear: a Gaussian blob on a periodic unit square that moves as the pulse does while it stretches (area kept) and
  turns, in closed form; 6 parameters x0, y0, theta, v, stretch s, turning rate omega. A feature that changes shape
  as it moves: POD with 64 modes misses 70 % of a held-out field.
- plate: the demo's family, larger, given by its geometry images: transient heat conduction through a plate with a
  circular inclusion (input_data/make_demo_case.py's solver), 64 x 64 images of the inclusion (its gray level the
  conductivity; read at image_size 32) as what defines each design, on a grid x grid mesh (at most 32 x 32: the
  explicit solve's steps grow as the square of the grid). The parameters the images draw are written beside them,
  for the benchmark's POD + GPR on the exact parameters: what a user who had them could do.
- demo: the shipped heat-conduction case (input_data/), copied as it is.
"""
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = ("demo", "pulse", "burgers", "beam", "shear", "plate")


@dataclass(frozen=True)
class Size:
    designs: int = 205      # 164 training and 41 validation designs at val_fraction 0.2
    steps: int = 24
    grid: int = 48          # pulse and shear: grid x grid nodes (plate: at most 32 x 32)
    line: int = 256         # burgers and beam: nodes on the line


def add_case_arguments(parser, cases=CASES) -> None:
    """The options that choose the cases (among `cases`, all by default) and the generated cases' size, shared by the
    benchmarks that run them."""
    parser.add_argument("--cases", nargs="+", choices=cases, default=list(cases))
    parser.add_argument("--designs", type=int, default=Size.designs, help="designs of the generated cases")
    parser.add_argument("--steps", type=int, default=Size.steps, help="time steps of the generated cases")
    parser.add_argument("--grid", type=int, default=Size.grid,
                        help="pulse, shear and plate (at most 32): grid x grid nodes")
    parser.add_argument("--line", type=int, default=Size.line, help="burgers and beam: nodes on the line")


def pulse_fields(parameters: np.ndarray, steps: int, grid: int) -> np.ndarray:
    """[n, steps, grid * grid] float32 fields at t = k / steps (k = 1..steps), node index iy * grid + ix; parameters
    [n, 5] = (x0, y0, theta, v, D). Width sigma(t)^2 = sigma0^2 + 2 D t, mass conserved, periodic images summed."""
    sigma0 = 0.08  # at 205 designs POD with 64 modes then misses about half of a held-out field: hard for linear ROMs
    x = np.arange(grid) / grid
    nodes_x, nodes_y = np.meshgrid(x, x)  # [grid, grid]: row iy, column ix
    times = np.arange(1, steps + 1) / steps
    fields = np.zeros((len(parameters), steps, grid, grid))
    for design, (x0, y0, theta, speed, diffusivity) in enumerate(parameters):
        for step, t in enumerate(times):
            cx, cy = x0 + speed * t * np.cos(theta), y0 + speed * t * np.sin(theta)
            variance = sigma0 ** 2 + 2 * diffusivity * t
            dx = (nodes_x - cx + 0.5) % 1.0 - 0.5  # nearest periodic image
            dy = (nodes_y - cy + 0.5) % 1.0 - 0.5
            fields[design, step] = sigma0 ** 2 / variance * np.exp(-(dx ** 2 + dy ** 2) / (2 * variance))
    return fields.reshape(len(parameters), steps, grid * grid).astype(np.float32)


def pulse_parameters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0, 2 * np.pi, n),
                     rng.uniform(0.2, 0.8, n), 10 ** rng.uniform(-4, -3, n)], axis=1)


def shear_fields(parameters: np.ndarray, steps: int, grid: int) -> np.ndarray:
    """[n, steps, grid * grid] float32 fields at t = k / steps (k = 1..steps), node index iy * grid + ix; parameters
    [n, 6] = (x0, y0, theta, v, s, omega). A Gaussian blob that moves as the pulse does while it changes shape: its
    axes stretch to sigma0 (1 + s t) and shrink to sigma0 / sqrt(1 + s t) (area kept) and turn at omega rad per unit
    time, so a translation alone cannot draw it (the family whose feature changes shape as it moves)."""
    sigma0 = 0.06
    x = np.arange(grid) / grid
    nodes_x, nodes_y = np.meshgrid(x, x)  # [grid, grid]: row iy, column ix
    times = np.arange(1, steps + 1) / steps
    fields = np.zeros((len(parameters), steps, grid, grid))
    for design, (x0, y0, theta, speed, stretch, omega) in enumerate(parameters):
        for step, t in enumerate(times):
            cx, cy = x0 + speed * t * np.cos(theta), y0 + speed * t * np.sin(theta)
            dx = (nodes_x - cx + 0.5) % 1.0 - 0.5  # nearest periodic image
            dy = (nodes_y - cy + 0.5) % 1.0 - 0.5
            angle = theta + omega * t
            along, across = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
            long, short = sigma0 * (1 + stretch * t), sigma0 / np.sqrt(1 + stretch * t)
            fields[design, step] = np.exp(-along ** 2 / (2 * long ** 2) - across ** 2 / (2 * short ** 2))
    return fields.reshape(len(parameters), steps, grid * grid).astype(np.float32)


def shear_parameters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0, 2 * np.pi, n),
                     rng.uniform(0.2, 0.6, n), rng.uniform(0.5, 3.0, n), rng.uniform(-3.0, 3.0, n)], axis=1)


def burgers_fields(parameters: np.ndarray, steps: int, nodes: int, t_end: float = 2.0) -> np.ndarray:
    """[n, steps, nodes] float32 snapshots at t = k t_end / steps (k = 1..steps) of every design at once;
    parameters [n, 4] = (a, b, phi, nu)."""
    a, b, phi, nu = (parameters[:, i:i + 1] for i in range(4))
    dx = 2 * np.pi / nodes
    x = np.arange(nodes) * dx
    u = a + b * np.sin(x[None, :] - phi)
    out = np.empty((len(parameters), steps, nodes))
    t, next_snapshot = 0.0, 1
    while next_snapshot <= steps:
        target = next_snapshot * t_end / steps
        speed = np.abs(u).max()
        dt = min(0.4 * dx / speed, 0.2 * dx ** 2 / nu.max(), target - t)
        right = np.roll(u, -1, axis=1)
        flux = 0.25 * (u ** 2 + right ** 2) - 0.5 * np.maximum(np.abs(u), np.abs(right)) * (right - u)  # Rusanov
        diffusion = nu * (right - 2 * u + np.roll(u, 1, axis=1)) / dx ** 2
        u = u - dt / dx * (flux - np.roll(flux, 1, axis=1)) + dt * diffusion
        t += dt
        if t >= target - 1e-12:
            out[:, next_snapshot - 1] = u
            next_snapshot += 1
    return out.astype(np.float32)


def burgers_parameters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.0, n), rng.uniform(0, 2 * np.pi, n),
                     10 ** rng.uniform(-2, -1.3, n)], axis=1)


def beam_fields(parameters: np.ndarray, steps: int, nodes: int) -> np.ndarray:
    """[n, steps, nodes] float32 deflections w(x) at load factors (k / steps) ** gamma (k = 1..steps) of nodes evenly
    spaced on [0, 1] (x = 0 clamped); parameters [n, 5] = (P, q, M, EI, gamma)."""
    x = np.linspace(0, 1, nodes)[None, None, :]
    force, load, moment, stiffness, gamma = (parameters[:, i, None, None] for i in range(5))
    factor = (np.arange(1, steps + 1) / steps)[None, :, None] ** gamma
    shape = force * x ** 2 * (3 - x) / 6 + load * x ** 2 * (6 - 4 * x + x ** 2) / 24 + moment * x ** 2 / 2
    return (factor * shape / stiffness).astype(np.float32)


def beam_parameters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.2, 1.0, n), rng.uniform(0.2, 1.0, n), rng.uniform(-0.3, 0.3, n),
                     rng.uniform(0.8, 1.25, n), rng.uniform(1.0, 1.5, n)], axis=1)


PRESET = "data_No, init_beta_divisor, encoder_filters, conditioner_filters\n1\n0\n{filters}\n32 64 128 256\n"
CONDITION = """\
Dim1 {n}
Dim2 {steps}
Dim3 {nodes}
Training_epochs {epochs}
Batch_size 16
input_type csv
param_dir input_data/parameters.csv
n_epoch {lc_epochs}
plot 2
"""


def write_case(folder: Path, name: str, size: Size, epochs: int, lc_epochs: int, seed: int = 0,
               settings: dict | None = None) -> dict:
    """Write case `name` into folder (preset.txt, input_data/); returns what defines it. settings: condition.txt
    keys set (or replaced) in every case."""
    facts = _write_case(folder, name, size, epochs, lc_epochs, seed)
    condition = folder / "input_data" / "condition.txt"
    for key, value in (settings or {}).items():
        condition.write_text(_set_key(condition.read_text(), key, value))
    return {**facts, **({"settings": settings} if settings else {})}


def _write_case(folder: Path, name: str, size: Size, epochs: int, lc_epochs: int, seed: int) -> dict:
    data = folder / "input_data"
    data.mkdir(parents=True, exist_ok=True)
    if name == "demo":
        for file in ("condition.txt", "dataset1.npy", "parameters.csv", "plate.vtu"):
            shutil.copyfile(REPO / "input_data" / file, data / file)
        shutil.copyfile(REPO / "preset.txt", folder / "preset.txt")
        text = _set_key((data / "condition.txt").read_text(), "plot", "2")  # a key given twice is refused: replace
        text = _set_key(text, "Training_epochs", str(epochs) if epochs else None)
        text = _set_key(text, "n_epoch", str(lc_epochs) if lc_epochs else None)
        (data / "condition.txt").write_text(text)
        shape = np.load(data / "dataset1.npy", mmap_mode="r").shape
        return {"case": name, "shape": list(shape), "parameters": "cx, cy, radius, conductivity"}
    if name == "pulse":
        parameters = pulse_parameters(size.designs, seed)
        fields = pulse_fields(parameters, size.steps, size.grid)
        names, filters = "x0,y0,theta,v,D", "256 128 64 32"
        where = f"grid_shape {size.grid} {size.grid}\ngrid_periodic 1"
    elif name == "shear":
        parameters = shear_parameters(size.designs, seed)
        fields = shear_fields(parameters, size.steps, size.grid)
        names, filters = "x0,y0,theta,v,s,omega", "256 128 64 32"
        where = f"grid_shape {size.grid} {size.grid}\ngrid_periodic 1"
    elif name == "plate":
        return _write_plate(folder, size, epochs, lc_epochs, seed)
    elif name == "burgers":
        parameters = burgers_parameters(size.designs, seed)
        fields = burgers_fields(parameters, size.steps, size.line)
        names, filters = "a,b,phi,nu", "256 128 64 32"
        np.save(data / "nodes.npy", np.stack([np.arange(size.line) * 2 * np.pi / size.line, np.zeros(size.line)], 1))
        where = "node_coordinates input_data/nodes.npy"
    elif name == "beam":
        parameters = beam_parameters(size.designs, seed)
        fields = beam_fields(parameters, size.steps, size.line)
        names, filters = "P,q,M,EI,gamma", "256 128 64 32"
        np.save(data / "nodes.npy", np.stack([np.linspace(0, 1, size.line), np.zeros(size.line)], 1))
        where = "node_coordinates input_data/nodes.npy"
    else:
        raise ValueError(f"unknown case {name!r}")
    np.save(data / "dataset1.npy", fields)
    np.savetxt(data / "parameters.csv", parameters, delimiter=",", header=names, comments="", fmt="%.8g")
    (folder / "preset.txt").write_text(PRESET.format(filters=filters))
    n, steps, nodes = fields.shape
    (data / "condition.txt").write_text(CONDITION.format(n=n, steps=steps, nodes=nodes, epochs=epochs or 200,
                                                         lc_epochs=lc_epochs or 500) + where + "\n")
    return {"case": name, "shape": list(fields.shape), "parameters": names.replace(",", ", ")}


def _write_plate(folder: Path, size: Size, epochs: int, lc_epochs: int, seed: int) -> dict:
    """The plate case (the module's docstring): the demo's solver and images, input_type image."""
    sys.path.insert(0, str(REPO / "input_data"))
    import make_demo_case as demo

    grid = min(size.grid, 32)
    parameters = demo.sample_parameters(size.designs, seed)
    fields = demo.solve_transient(demo.conductivity_fields(parameters, grid), size.steps, t_end=0.4)
    demo.write_tables(fields, parameters, grid, folder / "input_data")
    demo.write_images(parameters, folder / "images")
    (folder / "preset.txt").write_text(PRESET.format(filters="64 64 32"))  # the demo's
    n, steps, nodes = fields.shape
    text = CONDITION.format(n=n, steps=steps, nodes=nodes, epochs=epochs or 300, lc_epochs=lc_epochs or 200)
    # image_size 32: a quarter of the pixels, four times faster a CNN on 2 cores (docs/accuracy.md, the demo's images)
    text = _set_key(_set_key(_set_key(text, "input_type", "image"), "param_dir", "images"), "image_size", "32")
    (folder / "input_data" / "condition.txt").write_text(text + "mesh_file input_data/plate.vtu\n")
    return {"case": "plate", "shape": list(fields.shape), "parameters": "images of cx, cy, radius, conductivity",
            "parameters_csv": "input_data/parameters.csv"}


def _set_key(text: str, key: str, value: str | None) -> str:
    """condition.txt text with key's line replaced by 'key value' (value None: unchanged)."""
    if value is None:
        return text
    lines = [line for line in text.splitlines() if line.split("#")[0].split()[:1] != [key]]
    return "\n".join(lines + [f"{key} {value}"]) + "\n"
