"""Whole-process speed and memory of --predict, as a user runs it, against the bare model time.

    python bench/predict_speed.py                                  (20,000 designs, 3 runs, the CPU)
    python bench/predict_speed.py --designs 20000 --repeats 3 --formats .npy .h5 --json predict.json

It builds the travelling-pulse case of bench/cases.py (205 designs of 24 steps x 2,304 nodes, preset filters
256 128 64 32, the CSV conditioner: the GP on the latents or the MLP, whichever the run keeps) and trains it briefly:
how fast a prediction runs does not depend on how well the model was trained. Then, in fresh processes:
- `SimulGen-VAE.py --predict=many.csv --out=fields<format>` of --designs new designs (seeded), --repeats times per
  format, and once more with a quarter of the designs: wall time from start to exit (designs/s of the whole process,
  every field written), peak resident memory (the child's ru_maxrss), which must not grow with the designs;
- the bare model: the same conditioner and decoder on the same designs, in the batches --predict uses, nothing
  written and no start-up counted (the issue's target: the whole process within 1.4x of it).
The output files are deleted after each run (20,000 designs are 4.4 GB). On a small machine the disk's write-back
and other processes move the figures by 10-20 % from run to run: the median and the spread are reported.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cases import Size, pulse_parameters, write_case  # noqa: E402

# runs the command given after it and prints its peak resident memory (kB), that process's alone
OWN_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
BARE_MODEL = """
import sys, time, json
sys.path.insert(0, {repo!r})
import numpy as np, torch
from modules.commands.predict import FieldPrediction, prediction_batch_size, read_inputs
from modules.storage.model_files import load_surrogate
device = torch.device({device!r})
surrogate, facts, config = load_surrogate("model_save/latent_conditioner", device)
inputs, _, _ = read_inputs({designs!r}, config, facts)
prediction = FieldPrediction(surrogate, device)
shape = (len(inputs), config.n_steps_used, config.n_nodes_used)
batch = prediction_batch_size(prediction, inputs, shape, 0, device)
prediction(inputs[:batch])  # warm-up, as --predict's first batch is not timed apart either
prediction.seconds = 0.0
for start in range(0, len(inputs), batch):
    prediction(inputs[start:start + batch])
print(json.dumps({{"seconds": prediction.seconds, "batch": batch, "kept": facts["choice"]["kept"]}}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", type=int, default=20000, help="new designs to predict (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per output format (default 3)")
    parser.add_argument("--formats", nargs="+", default=[".npy"], choices=[".npy", ".h5"],
                        help="output formats to time (default .npy)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--epochs", type=int, default=2, help="VAE and conditioner training epochs (default 2)")
    parser.add_argument("--workdir", type=Path, help="where the case is built (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        report = measure(folder, args)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def measure(folder: Path, args) -> dict:
    case = folder / "case"
    write_case(case, "pulse", Size(), epochs=args.epochs, lc_epochs=args.epochs)
    began = time.perf_counter()
    run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--preset=1", f"--device={args.device}"], case)
    trained = time.perf_counter() - began
    designs = {}
    for count in (args.designs, max(1, args.designs // 4)):
        designs[count] = folder / f"designs_{count}.csv"
        np.savetxt(designs[count], pulse_parameters(count, seed=7), delimiter=",", header="x0,y0,theta,v,D",
                   comments="", fmt="%.8g")
    bare = json.loads(run([sys.executable, "-c", BARE_MODEL.format(repo=str(REPO), device=args.device,
                                                                   designs=str(designs[args.designs]))],
                          case).splitlines()[-1])
    runs = []
    for suffix in args.formats:
        for count, repeats in ((args.designs, args.repeats), (max(1, args.designs // 4), 1)):
            for _ in range(repeats):
                runs.append({"format": suffix, "designs": count, **predict_once(case, designs[count], suffix,
                                                                                  args.device)})
    full = [row for row in runs if row["designs"] == args.designs]
    return {"case": "pulse, 24 steps x 2,304 nodes, filters 256 128 64 32", "conditioner": bare["kept"],
            "device": args.device, "designs": args.designs, "training_seconds": round(trained, 1),
            "bare_model_seconds": round(bare["seconds"], 3), "bare_model_designs_per_second":
                round(args.designs / bare["seconds"]), "batch": bare["batch"], "runs": runs,
            "median_designs_per_second": round(statistics.median(row["designs_per_second"] for row in full)),
            "median_ratio_to_bare_model": round(statistics.median(row["seconds"] for row in full)
                                                / bare["seconds"], 2),
            "load_average_at_start": os.getloadavg()[0]}


def predict_once(case: Path, designs: Path, suffix: str, device: str) -> dict:
    """One --predict in a fresh process: wall seconds start to exit, designs/s, the child's peak resident memory."""
    out = case.parent / f"fields{suffix}"
    began = time.perf_counter()
    said = run([sys.executable, "-c", OWN_PEAK, sys.executable, str(REPO / "SimulGen-VAE.py"), f"--predict={designs}",
                f"--out={out}", f"--device={device}"], case)
    seconds = time.perf_counter() - began
    peak_kb = int(said.splitlines()[-1])
    count = sum(1 for _ in open(designs)) - 1
    written = out.stat().st_size
    for path in (out, out.with_name(f"{out.stem}_report.json")):
        path.unlink()
    return {"seconds": round(seconds, 2), "designs_per_second": round(count / seconds),
            "peak_rss_gb": round(peak_kb / 2**20, 3), "written_gb": round(written / 1e9, 2)}


def run(command, folder: Path) -> str:
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {folder}:\n{result.stderr[-3000:]}")
    return result.stdout


def markdown(report: dict) -> str:
    lines = [f"--predict of {report['designs']:,} designs ({report['case']}; conditioner: {report['conditioner']}; "
             f"{report['device']}; batches of {report['batch']}):",
             f"bare model: {report['bare_model_seconds']} s ({report['bare_model_designs_per_second']:,} designs/s)",
             "", "| format | designs | whole process s | designs/s | peak RSS GB | written GB |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['format']} | {row['designs']:,} | {row['seconds']} | {row['designs_per_second']:,} | "
              f"{row['peak_rss_gb']} | "
              f"{row['written_gb']} |" for row in report["runs"]]
    lines.append(f"\nmedian {report['median_designs_per_second']:,} designs/s, whole process / bare model = "
                 f"{report['median_ratio_to_bare_model']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
