"""Build the SimulGenVAE demo case from a real transient heat-conduction solve.

Physics
-------
Each design is a unit-square plate (0 <= x, y <= 1) with conductivity
``k(x, y) = 1`` in the matrix and ``k_inc`` inside a circular inclusion of
centre ``(cx, cy)`` and radius ``r``.  The temperature ``u`` obeys pure
conduction (no volumetric source)::

    du/dt = div( k(x, y) grad u )

with

* initial state ``u = 0`` everywhere (apart from the held left edge),
* left edge ``x = 0`` held at ``u = 1`` and right edge ``x = 1`` held at
  ``u = 0`` (Dirichlet),
* top and bottom edges ``y = 0, 1`` insulated (zero normal flux).

Discretisation: G x G nodes at ``x = ix * h``, ``y = iy * h`` with
``h = 1 / (G - 1)``.  Every node owns an h x h control volume; its
conductivity is the area fraction of that volume covered by the inclusion
(4 x 4 supersampling) blended linearly between 1 and ``k_inc``, so the field
varies continuously with the parameters.  Face conductivities are harmonic
means of the two neighbouring nodes.  Insulated edges use half control
volumes (equivalently mirror ghost nodes).  Time integration is explicit
Euler with ``dt <= 0.2 h^2 / k_max`` (monotone, so the discrete maximum
principle keeps ``0 <= u <= 1``), with all designs advanced together as
one vectorised batch.

Outputs (relative to ``--out-root``, default: the repository root)
-----------------------------------------------------------------
* ``input_data/dataset1.npy``: float32 ``[N, T, G*G]`` snapshots at
  ``t_k = k * t_end / T`` (k = 1..T), node index ``iy * G + ix``.
* ``input_data/parameters.csv``: ``cx,cy,radius,conductivity`` per design.
* ``input_data/node_coordinates.csv``: ``x,y`` of every node in node order.
* ``input_data/plate.vtu``: the same nodes as a mesh of (G-1)^2 quads (condition.txt ``mesh_file``): the plots
  draw on its cells and ``--predict --out=fields.xdmf`` opens on it in ParaView.
* ``images/design_001.png`` ...: 64 x 64 grayscale geometry images; the
  inclusion disk is anti-aliased with gray level encoding log(k_inc)
  from [log 0.1, log 10] onto [64, 255]; row 0 is the top (y near 1).
* ``input_data/new_designs/``: ``parameters.csv``, ``images/`` and the true
  ``fields.npy`` of 8 more designs (seed + 1), never part of the training
  data, for trying ``--predict``.

Usage (from the repository root)::

    python input_data/make_demo_case.py [--n-designs 96] [--seed 0]
                                        [--grid 20] [--steps 24]
"""

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

PARAM_NAMES = ("cx", "cy", "radius", "conductivity")
BOUNDS = {"cx": (0.3, 0.7), "cy": (0.3, 0.7), "radius": (0.08, 0.22)}
K_BOUNDS = (0.1, 10.0)
SUPERSAMPLE = 4
IMAGE_SIZE = 64
GRAY_RANGE = (64, 255)


def parse_args():
    """Parse command-line options."""
    default_root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-root", type=Path, default=default_root,
                        help="root folder for outputs (default: repo root)")
    parser.add_argument("--n-designs", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=20,
                        help="nodes per side G (M = G*G)")
    parser.add_argument("--steps", type=int, default=24,
                        help="number of recorded snapshots")
    parser.add_argument("--t-end", type=float, default=0.4,
                        help="final (non-dimensional) time")
    parser.add_argument("--n-new", type=int, default=8,
                        help="extra designs, never trained on, for trying --predict")
    return parser.parse_args()


def sample_parameters(n, seed):
    """Latin-hypercube sample of ``n`` designs; returns an ``[n, 4]`` array.

    Columns are cx, cy, radius and the inclusion conductivity, the last one
    log-uniform in ``K_BOUNDS``.
    """
    rng = np.random.default_rng(seed)
    columns = []
    for _ in PARAM_NAMES:
        strata = rng.permutation(n)
        columns.append((strata + rng.random(n)) / n)
    unit = np.stack(columns, axis=1)
    params = np.empty_like(unit)
    for j, name in enumerate(PARAM_NAMES[:3]):
        lo, hi = BOUNDS[name]
        params[:, j] = lo + (hi - lo) * unit[:, j]
    log_lo, log_hi = np.log10(K_BOUNDS)
    params[:, 3] = 10.0 ** (log_lo + (log_hi - log_lo) * unit[:, 3])
    return params


def disk_coverage(xc, yc, cell, cx, cy, r):
    """Fraction of square cells covered by disks, via supersampling.

    ``xc, yc`` are cell-centre coordinate arrays of shape ``[H, W]`` and
    ``cell`` is the cell width.  ``cx, cy, r`` are arrays of shape ``[N]``.
    Returns an ``[N, H, W]`` array in [0, 1].
    """
    offsets = ((np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5) * cell
    cover = np.zeros((len(cx),) + xc.shape)
    cx, cy, r = (a[:, None, None] for a in (cx, cy, r))
    for dy in offsets:
        for dx in offsets:
            inside = (xc + dx - cx) ** 2 + (yc + dy - cy) ** 2 <= r ** 2
            cover += inside
    return cover / SUPERSAMPLE ** 2


def conductivity_fields(params, grid):
    """Nodal conductivity ``[N, G, G]`` (axis 1 = y, axis 2 = x)."""
    h = 1.0 / (grid - 1)
    coords = np.arange(grid) * h
    xc, yc = np.meshgrid(coords, coords)
    cx, cy, r, k_inc = params.T
    frac = disk_coverage(xc, yc, h, cx, cy, r)
    return 1.0 + frac * (k_inc[:, None, None] - 1.0)


def face_conductivities(k):
    """Harmonic-mean conductivities on x faces ``[N,G,G-1]`` and y faces."""
    kx = 2.0 * k[:, :, 1:] * k[:, :, :-1] / (k[:, :, 1:] + k[:, :, :-1])
    ky = 2.0 * k[:, 1:, :] * k[:, :-1, :] / (k[:, 1:, :] + k[:, :-1, :])
    return kx, ky


def divergence(u, kx, ky):
    """Discrete ``div(k grad u) * h^2`` at every node (insulated top/bottom).

    Boundary rows use half control volumes, hence the factor 2 there.
    The Dirichlet columns are left to the caller.
    """
    flux_x = kx * np.diff(u, axis=2)
    flux_y = ky * np.diff(u, axis=1)
    div = np.zeros_like(u)
    div[:, :, :-1] += flux_x
    div[:, :, 1:] -= flux_x
    div[:, :-1, :] += flux_y
    div[:, 1:, :] -= flux_y
    div[:, 0, :] *= 2.0
    div[:, -1, :] *= 2.0
    return div


def solve_transient(k, n_snapshots, t_end, k_max=None):
    """Integrate all designs with explicit Euler; return ``[N, T, G*G]``.

    A single time step, the largest allowed by ``dt <= 0.2 h^2 / k_max``
    (k_max: the batch's largest conductivity unless given) that divides the
    snapshot interval exactly, is used.
    """
    n, grid, _ = k.shape
    h = 1.0 / (grid - 1)
    dt_snap = t_end / n_snapshots
    dt_max = 0.2 * h ** 2 / (k.max() if k_max is None else k_max)
    substeps = int(np.ceil(dt_snap / dt_max))
    coef = (dt_snap / substeps) / h ** 2
    kx, ky = face_conductivities(k)
    u = np.zeros_like(k)
    u[:, :, 0] = 1.0
    out = np.empty((n, n_snapshots, grid * grid), dtype=np.float32)
    for snap in range(n_snapshots):
        for _ in range(substeps):
            du = coef * divergence(u, kx, ky)
            u[:, :, 1:-1] += du[:, :, 1:-1]
        out[:, snap] = u.reshape(n, -1)
    return out


def geometry_image(cx, cy, r, k_inc):
    """64 x 64 uint8 image of one design's inclusion (row 0 = top)."""
    cell = 1.0 / IMAGE_SIZE
    centres = (np.arange(IMAGE_SIZE) + 0.5) * cell
    xc, yc = np.meshgrid(centres, centres[::-1])
    cover = disk_coverage(xc, yc, cell, *(np.array([v]) for v in (cx, cy, r)))
    log_lo, log_hi = np.log(K_BOUNDS)
    level_frac = (np.log(k_inc) - log_lo) / (log_hi - log_lo)
    level = GRAY_RANGE[0] + level_frac * (GRAY_RANGE[1] - GRAY_RANGE[0])
    return np.rint(cover[0] * level).astype(np.uint8)


def write_images(params, image_dir):
    """Write one geometry PNG per design, 1-based and zero-padded."""
    image_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(params))))
    paths = []
    for i, (cx, cy, r, k_inc) in enumerate(params, start=1):
        path = image_dir / f"design_{i:0{width}d}.png"
        Image.fromarray(geometry_image(cx, cy, r, k_inc), mode="L").save(path)
        paths.append(path)
    return paths


def write_csv(path, header, rows):
    """Write rows of floats with 6 significant digits."""
    lines = [",".join(header)]
    lines += [",".join(f"{v:.6g}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_tables(data, params, grid, data_dir):
    """Write dataset, parameter table and node coordinates; return paths."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_path = data_dir / "dataset1.npy"
    np.save(data_path, data, allow_pickle=False)
    param_path = data_dir / "parameters.csv"
    write_csv(param_path, PARAM_NAMES, params)
    coords = np.arange(grid) / (grid - 1)
    xs, ys = np.meshgrid(coords, coords)
    node_path = data_dir / "node_coordinates.csv"
    write_csv(node_path, ("x", "y"), np.column_stack([xs.ravel(), ys.ravel()]))
    mesh_path = data_dir / "plate.vtu"
    write_mesh(mesh_path, grid)
    return [data_path, param_path, node_path, mesh_path]


def write_mesh(path, grid):
    """The G x G nodes (node index iy * G + ix) as quads, counter-clockwise, in a VTK unstructured grid."""
    import meshio

    coords = np.arange(grid) / (grid - 1)
    xs, ys = np.meshgrid(coords, coords)
    corner = (np.arange(grid - 1)[:, None] * grid + np.arange(grid - 1)[None, :]).ravel()
    quads = np.stack([corner, corner + 1, corner + grid + 1, corner + grid], axis=1)
    points = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(grid * grid)])
    meshio.write(path, meshio.Mesh(points, [("quad", quads)]))


def print_summary(data, paths, root, elapsed):
    """Print shape, value range, design spread, timing and file sizes."""
    final = data[:, -1]
    spread = final.std(axis=0).max()
    last_change = np.abs(data[:, -1] - data[:, -2]).max()
    print(f"dataset shape {data.shape} (designs, snapshots, nodes)")
    print(f"value range [{data.min():.4f}, {data.max():.4f}]")
    print(f"max std across designs of final snapshot: {spread:.4f}")
    print(f"max change over last snapshot interval: {last_change:.2e}")
    print(f"time taken: {elapsed:.2f} s")
    total = sum(p.stat().st_size for p in paths)
    for p in paths[:4]:
        print(f"  {p.relative_to(root)}: {p.stat().st_size / 1024:.1f} KiB")
    print(f"  images/*.png: {len(paths) - 4} files, "
          f"{sum(p.stat().st_size for p in paths[4:]) / 1024:.1f} KiB")
    print(f"total output size: {total / 1024 ** 2:.2f} MiB")


def main():
    """Sample designs, solve, and write the demo case."""
    args = parse_args()
    start = time.perf_counter()
    params = sample_parameters(args.n_designs, args.seed)
    k = conductivity_fields(params, args.grid)
    data = solve_transient(k, args.steps, args.t_end)
    root = args.out_root
    paths = write_tables(data, params, args.grid, root / "input_data")
    paths += write_images(params, root / "images")
    print_summary(data, paths, root, time.perf_counter() - start)
    write_new_designs(args, k.max(), root / "input_data" / "new_designs")


def write_new_designs(args, k_max, folder):
    """Designs drawn with another seed, solved with the same time step: parameters.csv, images/ and their true
    fields.npy, to try --predict on designs the model has never seen and measure its error."""
    params = sample_parameters(args.n_new, args.seed + 1)
    k = conductivity_fields(params, args.grid)
    data = solve_transient(k, args.steps, args.t_end, max(k_max, k.max()))
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "fields.npy", data, allow_pickle=False)
    write_csv(folder / "parameters.csv", PARAM_NAMES, params)
    write_images(params, folder / "images")
    print(f"{args.n_new} new designs for --predict: {folder}")


if __name__ == "__main__":
    main()
