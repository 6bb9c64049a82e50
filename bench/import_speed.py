"""How fast --import turns a folder of VTU series into a case, and its peak memory, next to a plain read of the same
files (the disk's speed as this machine sees it). Default: the issue's scale, 200 designs x 24 steps x 50,176 nodes
(a 224 x 224 quad mesh), one .pvd and 24 .vtu files per design, written by meshio (binary, in the encoding asked).

    python bench/import_speed.py                                 # 200 x 24 x 50,176, uncompressed, warm and cold
    python bench/import_speed.py --designs 20 --encoding zlib --json import.json

Each measurement runs `SimulGen-VAE.py --import` in a fresh case folder in its own process (what a user runs), and
reports: seconds, file GB/s (bytes of the .vtu files per second of the import) and its share of the plain read's
GB/s, values GB/s (float32 bytes written to dataset1.npy per second), and the process's peak resident memory
(ru_maxrss). The plain read is one process reading every .vtu file in the import's order in 64 MB pieces.
- warm: the files were read just before; cold: every file is dropped from the page cache (posix_fadvise DONTNEED)
  before the run. On a virtual machine the host may still cache the disk, so "cold" can beat the physical disk.
The numbers describe this run on this machine; they change with the disk, the memory and what else is running.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from loader_speed import PLAIN_READ_BYTES, drop_from_cache  # noqa: E402 - bench/ is on the path from here


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--side", type=int, default=224, help="nodes per side of the square quad mesh (224: 50,176)")
    parser.add_argument("--encoding", choices=("none", "zlib"), default="none",
                        help="meshio's binary VTU without compression, or zlib-compressed (meshio's default)")
    parser.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/simulgen_import_bench"))
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def write_family(root: Path, designs: int, steps: int, side: int, encoding: str) -> list:
    """root/design_K/design_K.pvd + design_K_S.vtu; the .vtu paths in import order. Kept between runs of the bench
    when the same family is asked for again (root/family.json says which)."""
    import meshio

    asked = {"designs": designs, "steps": steps, "side": side, "encoding": encoding}
    files = [root / f"design_{d + 1}" / f"design_{d + 1}_{s}.vtu" for d in range(designs) for s in range(steps)]
    if (root / "family.json").is_file() and json.loads((root / "family.json").read_text()) == asked:
        return files
    shutil.rmtree(root, ignore_errors=True)
    x, y = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side))
    points = np.stack([x.ravel(), y.ravel(), np.zeros(side * side)], axis=1)
    corner = (np.arange(side - 1)[:, None] * side + np.arange(side - 1)[None, :]).ravel()
    quads = np.stack([corner, corner + 1, corner + side + 1, corner + side], axis=1)
    rng = np.random.default_rng(0)
    for design in range(designs):
        folder = root / f"design_{design + 1}"
        folder.mkdir(parents=True)
        centre, width = rng.uniform(0.2, 0.8, size=2), rng.uniform(0.05, 0.2)
        rows = []
        for step in range(steps):
            shifted = centre + 0.01 * step
            field = np.exp(-((points[:, :2] - shifted) ** 2).sum(axis=1) / width ** 2).astype(np.float32)
            name = f"design_{design + 1}_{step}.vtu"
            meshio.write(folder / name, meshio.Mesh(points, [("quad", quads)], point_data={"temperature": field}),
                         binary=True, compression=None if encoding == "none" else "zlib")
            rows.append(f'    <DataSet timestep="{0.1 * (step + 1)!r}" part="0" file="{name}"/>')
        (folder / f"design_{design + 1}.pvd").write_text(
            '<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1">\n  <Collection>\n' + "\n".join(rows)
            + "\n  </Collection>\n</VTKFile>\n")
    (root / "family.json").write_text(json.dumps(asked))
    return files


def prepare(files: list, cache: str) -> None:
    for path in files:
        drop_from_cache(path) if cache == "cold" else plain_read([path])


def plain_read(files: list) -> float:
    """Seconds to read every file front to back into one reused buffer."""
    buffer = bytearray(PLAIN_READ_BYTES)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def run_import(results: Path, case: Path) -> tuple:
    """(seconds, peak resident bytes) of --import in its own process."""
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(REPO / "SimulGen-VAE.py"), f"--import={results}",
                                "--fields=temperature"], cwd=case, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"--import failed: {err}")
    print(out.strip())
    return seconds, usage.ru_maxrss * 1024


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = args.workdir / f"results_{args.encoding}"
    files = write_family(results, args.designs, args.steps, args.side, args.encoding)
    file_bytes = sum(path.stat().st_size for path in files)
    value_bytes = args.designs * args.steps * args.side ** 2 * 4
    rows = []
    for cache in args.cache:
        prepare(files, cache)
        plain = plain_read(files)
        prepare(files, cache)
        seconds, peak = run_import(results, args.workdir / "case")
        row = {"cache": cache, "seconds": round(seconds, 2), "file_GBps": round(file_bytes / seconds / 1e9, 3),
               "plain_read_GBps": round(file_bytes / plain / 1e9, 3),
               "share_of_plain_read": round(plain / seconds, 3), "values_GBps": round(value_bytes / seconds / 1e9, 3),
               "peak_resident_GB": round(peak / 1e9, 3)}
        rows.append(row)
        print(json.dumps(row))
    report = {"designs": args.designs, "steps": args.steps, "nodes": args.side ** 2, "encoding": args.encoding,
              "file_GB": round(file_bytes / 1e9, 2), "values_GB": round(value_bytes / 1e9, 2),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(args.workdir / "case", ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
