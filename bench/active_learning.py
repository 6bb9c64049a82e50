"""Does simulating the designs --suggest picks improve the surrogate more than simulating as many random designs?

    python bench/active_learning.py                        # the demo case, 16 added designs (about 15 minutes)
    python bench/active_learning.py --add 8 --random_seeds 1 2 3 --json al.json

On the shipped demo (heat conduction past an inclusion; input_data/make_demo_case.py solves any design):
1. the demo is trained as shipped (its 96 designs), and --suggest=K picks K designs from the Sobol candidates of the
   training box (the command's default) and, in a second arm, from --candidates: 1024 designs drawn as the demo's
   designs are (its own distribution: conductivity log-uniform);
2. each arm's K designs are simulated with the demo's own solver and added to the 96, and the case is trained again
   as shipped; the random arms add K designs drawn as the demo's are, once per --random_seeds;
3. every trained case predicts the same --test designs (drawn as the demo's are, with another seed, simulated) and
   its mean relative L2 error against their simulated fields is reported, with the error of the case before
   anything was added.
The validation split is the config's (val_fraction 0.2, seed 42), the same positions in every arm of one size, so
some added designs validate rather than train, alike in every arm. Prints a markdown table; --json keeps the
numbers.
"""
import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "input_data"))
import make_demo_case as demo  # noqa: E402

GRID, STEPS, T_END = 20, 24, 0.4  # the shipped demo's generator settings (make_demo_case.py defaults)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--add", type=int, default=16, help="designs added in every arm")
    parser.add_argument("--test", type=int, default=128, help="test designs, never trained on")
    parser.add_argument("--random_seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="one random arm per seed")
    parser.add_argument("--workdir", type=Path, default=Path("bench_active_learning"))
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def simulate(parameters: np.ndarray, k_max: float) -> np.ndarray:
    """float32 [n, T, M] fields of the demo's solver, with the time step of conductivity k_max."""
    k = demo.conductivity_fields(parameters, GRID)
    return demo.solve_transient(k, STEPS, T_END, max(k_max, float(k.max()))).astype(np.float32)


def read_rows(path: Path) -> np.ndarray:
    """The first four columns (cx, cy, radius, conductivity) of a CSV with a header."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return np.array([[float(cell) for cell in row[:4]] for row in rows])


def write_rows(path: Path, parameters: np.ndarray) -> None:
    demo.write_csv(path, demo.PARAM_NAMES, parameters)


def train(folder: Path) -> float:
    """Train the case in folder as shipped; returns the wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--plot=2"], cwd=folder, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def case_with(folder: Path, base: Path, added: np.ndarray, k_max: float) -> Path:
    """A copy of the base case with the added designs simulated and appended (dataset, parameters, Dim1)."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "input_data").mkdir(parents=True)
    shutil.copy(base / "preset.txt", folder)
    fields = np.load(base / "input_data" / "dataset1.npy")
    parameters = read_rows(base / "input_data" / "parameters.csv")
    if len(added):
        fields = np.concatenate([fields, simulate(added, k_max)])
        parameters = np.concatenate([parameters, added])
    np.save(folder / "input_data" / "dataset1.npy", fields)
    write_rows(folder / "input_data" / "parameters.csv", parameters)
    shutil.copy(base / "input_data" / "plate.vtu", folder / "input_data")
    condition = (base / "input_data" / "condition.txt").read_text()
    lines = [f"Dim1            {len(fields)}" if line.startswith("Dim1") else line for line in condition.splitlines()]
    (folder / "input_data" / "condition.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_error(folder: Path, test_csv: Path, truth: np.ndarray) -> float:
    """Mean relative L2 (whole field) of the case's --predict on the test designs."""
    out = folder / "test_prediction.npy"
    out.unlink(missing_ok=True)
    (folder / "test_prediction_report.json").unlink(missing_ok=True)
    subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), f"--predict={test_csv}", f"--out={out}"],
                   cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predicted = np.load(out).reshape(len(truth), -1)
    flat = truth.reshape(len(truth), -1)
    return float(np.mean(np.linalg.norm(predicted - flat, axis=1) / np.linalg.norm(flat, axis=1)))


def suggested(base: Path, count: int, name: str, candidates: Path | None = None) -> np.ndarray:
    out = base / f"{name}.csv"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "SimulGen-VAE.py"), f"--suggest={count}", f"--out={out}"]
    subprocess.run(command + ([f"--candidates={candidates}"] if candidates else []), cwd=base, check=True,
                   stdout=subprocess.DEVNULL)
    return read_rows(out)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shipped = REPO / "input_data"
    k_max = float(demo.conductivity_fields(read_rows(shipped / "parameters.csv"), GRID).max())
    test_parameters = demo.sample_parameters(args.test, seed=1000)
    truth = simulate(test_parameters, k_max)
    write_rows(work / "test.csv", test_parameters)
    pool = demo.sample_parameters(1024, seed=2000)
    write_rows(work / "pool.csv", pool)

    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    (base / "input_data").mkdir(parents=True)
    shutil.copy(REPO / "preset.txt", base)
    for name in ("condition.txt", "dataset1.npy", "parameters.csv", "plate.vtu"):
        shutil.copy(shipped / name, base / "input_data")
    results = [{"arm": "before: the 96 designs of the demo", "seconds": train(base),
                "test_error": test_error(base, work / "test.csv", truth)}]
    arms = [("suggested from Sobol candidates of the training box (--suggest)",
             suggested(base, args.add, "suggested_sobol")),
            ("suggested from 1024 candidates drawn as the demo's designs (--candidates)",
             suggested(base, args.add, "suggested_pool", work / "pool.csv"))]
    arms += [(f"random, drawn as the demo's designs (seed {seed})", demo.sample_parameters(args.add, seed=seed))
             for seed in args.random_seeds]
    for index, (arm, added) in enumerate(arms):
        folder = case_with(work / f"arm{index}", base, added, k_max)
        seconds = train(folder)
        results.append({"arm": arm, "seconds": seconds, "test_error": test_error(folder, work / "test.csv", truth),
                        "added": added.tolist()})
        print(f"{arm}: {results[-1]['test_error']:.4%}", flush=True)
    print(f"\n| designs | {args.test} test designs: mean relative L2 of --predict |\n|---|---:|")
    for row in results:
        print(f"| {row['arm']} | {row['test_error']:.3%} |")
    if args.json:
        args.json.write_text(json.dumps({"add": args.add, "test": args.test, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
