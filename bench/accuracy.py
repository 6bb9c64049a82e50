"""Accuracy benchmark: SimulGenVAE against POD and POD + GPR on several generated cases, trained as a user would.

    python bench/accuracy.py                                   # every case at full size (minutes each)
    python bench/accuracy.py --cases pulse --epochs 50 --json pulse.json
    python bench/accuracy.py --designs 24 --steps 6 --grid 8 --line 32 --epochs 2 --lc_epochs 2   # a smoke run
    python bench/accuracy.py --set pod_path 0 --set alpha 1e6 --workdir bench_free   # another setting, every case

Each case (bench/cases.py) is written into its own case folder under --workdir and trained with
`python SimulGen-VAE.py` there, defaults as shipped unless a flag here overrides them; the numbers come from the
run's own output/evaluation.json, on its validation designs (never trained on), in physical units:
- reconstruction: the VAE against POD with as many modes as the VAE has latent numbers per design;
- prediction from what defines a design: the conditioner against POD + Gaussian-process regression, POD + a
  thin-plate-spline interpolant, the nearest training design and the training mean field. For a case given by
  images (plate) the two POD surrogates read the exact parameters the images draw (bench/cases.py writes them).
Prints a markdown table (what docs/accuracy.md carries) and writes every number as JSON (--json, or after the table).
Never tune on one case: the point of the benchmark is to report all of them.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import REPO, Size, add_case_arguments, write_case  # noqa: E402

sys.path.insert(0, str(REPO))
from modules.models.conditioners import NETWORKS  # noqa: E402


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser)
    parser.add_argument("--epochs", type=int, default=0,
                        help="VAE epochs (Training_epochs); 0: the case's own (demo 300, plate 300, generated 200)")
    parser.add_argument("--lc_epochs", type=int, default=0,
                        help="conditioner epochs (n_epoch); 0: the case's own (demo 400, plate 200, generated 500)")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a condition.txt key for every case (repeatable): measure a setting on all of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated designs")
    parser.add_argument("--workdir", default="bench_accuracy", help="where the case folders are written")
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def run_case(name: str, args) -> dict:
    folder = Path(args.workdir) / name
    if folder.exists():
        raise SystemExit(f"error: {folder} exists. Fix: remove it or give another --workdir")
    size = Size(designs=args.designs, steps=args.steps, grid=args.grid, line=args.line)
    facts = write_case(folder, name, size, args.epochs, args.lc_epochs, args.seed, dict(args.set))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py")], cwd=folder, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    (folder / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"error: the {name} case failed (exit {done.returncode}); see {folder / 'run.log'}")
    report = json.loads((folder / "output" / "evaluation.json").read_text())
    reconstruction, prediction = report["reconstruction"], report["prediction"]
    choice = json.loads((folder / "output" / "prediction_report.json").read_text())["conditioner_choice"]
    if "parameters_csv" in facts:  # designs given by images: the POD surrogates from the parameters they draw
        prediction = {**prediction, **pod_on_parameters(folder, facts["parameters_csv"],
                                                        report["latent_numbers_per_design"])}
    return {**facts, "n_train": report["n_train"], "n_val": report["n_val"],
            "latent_numbers": report["latent_numbers_per_design"], "run_s": seconds,
            "vae_runs_on": report.get("vae_runs_on", "fields"),
            "vae": mean_l2(reconstruction["vae"]), "pod": mean_l2(reconstruction["pod"]),
            "conditioner_label": report["labels"]["conditioner"], "conditioner": mean_l2(prediction["conditioner"]),
            "kept": (choice or {}).get("kept"), "candidates": (choice or {}).get("validation_relative_l2"),
            "stopped": (choice or {}).get("neural_field_stopped"),
            "pod_gpr": mean_l2(prediction["pod_gpr"]),
            "pod_rbf": mean_l2(prediction["pod_rbf"]) if "pod_rbf" in prediction else None,
            "nearest_neighbour": mean_l2(prediction["nearest_neighbour"]),
            "mean_field": mean_l2(prediction["mean_field"]), "time_spent": report.get("time_spent")}


def pod_on_parameters(folder: Path, parameters_csv: str, rank: int) -> dict:
    """{"pod_gpr", "pod_rbf": {"relative_l2": {"mean": ...}}} on the run's own split (model_save/split.json), from
    the exact parameters in parameters_csv: for a case whose designs are given by images, what the run's report cannot
    print (it has no parameters) and a user who had them could do. The same functions as the report's lines."""
    from modules.data.scaling import ColumnScaler
    from modules.evaluation.baselines import baseline_weights, score_combinations
    from modules.models.pod import design_gram
    from modules.training.codec_choice import CodeArray

    array = CodeArray(np.load(folder / "input_data" / "dataset1.npy"))  # float32, as the case wrote it
    split = json.loads((folder / "model_save" / "split.json").read_text())
    seed = json.loads(next((folder / "runs").glob("*/config.json")).read_text())["seed"]  # the GPs' fits use it
    train, val = np.asarray(split["train"]), np.asarray(split["val"])
    order = np.concatenate([train, val])
    parameters = np.loadtxt(folder / parameters_csv, delimiter=",", skiprows=1)[order]
    parameters = ColumnScaler.fit(parameters[:len(train)]).transform(parameters)  # as the report standardises them
    weights = baseline_weights(design_gram(array, order), len(train), {"pod": rank}, parameters=parameters,
                               seed=seed)
    errors = score_combinations(array, train, val, {name: weights[name] for name in ("pod_gpr", "pod_rbf")
                                                    if name in weights}, n_vars=1)
    return {name: {"relative_l2": {"mean": float(np.mean(found.relative_l2()))}} for name, found in errors.items()}


def mean_l2(summary: dict) -> float:
    return summary["relative_l2"]["mean"]


def percent(value: float) -> str:
    """A relative error as a percentage, with two significant digits where two decimals would show 0.00 %."""
    return f"{value:.2%}" if value >= 1e-4 else f"{100 * value:.2g}%"


def table(rows: list) -> str:
    lines = ["| case | designs (train / val) | T x M | latent numbers | VAE reconstruction | POD, same size | "
             "conditioner prediction (kept; the other candidates) | POD + GPR | POD + RBF | nearest design | "
             "mean field | run | time on the kept surrogate / on discarded candidates |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        _, steps, nodes = row["shape"]
        kept = row["conditioner_label"].removeprefix("conditioner (").removesuffix(")")
        others = [f"{NETWORKS[kind].label} {percent(error)}" for kind, error in (row["candidates"] or {}).items()
                  if kind != row["kept"]]
        stopped = row.get("stopped")
        if stopped:
            others.append(f"neural field stopped after {stopped['passes']} of {stopped['of']} passes at "
                          f"{percent(stopped['validation_relative_l2'])}")
        on_codes = " (on snapshot codes)" if row["vae_runs_on"] == "snapshot codes" else ""
        spent = row.get("time_spent")
        split = f"{spent['kept_s']:.0f} s / {spent['discarded_s']:.0f} s" if spent else "not recorded"
        lines.append(f"| {row['case']} | {row['n_train']} / {row['n_val']} | {steps} x {nodes} | "
                     f"{row['latent_numbers']} | {percent(row['vae'])}{on_codes} | {percent(row['pod'])} | "
                     f"{percent(row['conditioner'])} "
                     f"({'; not kept: '.join([kept, *others])}) | {percent(row['pod_gpr'])} | "
                     f"{'n/a' if row.get('pod_rbf') is None else percent(row['pod_rbf'])} | "
                     f"{percent(row['nearest_neighbour'])} | {percent(row['mean_field'])} | {row['run_s']:.0f} s | "
                     f"{split} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    rows = []
    for name in args.cases:
        print(f"{name}: training ...", flush=True)
        rows.append(run_case(name, args))
    report = {"metric": "mean relative L2 error of the whole [T, M] field on the validation designs, physical "
                        "units", "rows": rows, "arguments": vars(args),
              "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    print(table(rows))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
