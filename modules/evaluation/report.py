"""The evaluation (modules/evaluation.py) as output/evaluation.json (every number), output/evaluation.md (tables a
person reads) and a few printed lines."""
import json

import numpy as np

from modules.evaluation import figures as plots
from modules.evaluation.evaluation import evaluate_saved
from modules.storage.paths import MODEL_FILE, OUTPUT_DIR

EVALUATION_JSON = OUTPUT_DIR / "evaluation.json"
EVALUATION_MD = OUTPUT_DIR / "evaluation.md"
STEPS_IN_TABLE = 10  # evenly spaced time steps in the .md table (the .json and the plot have every step)
CONDITIONER_NAMES = {"csv": "MLP", "image": "CNN", "image_vit": "ViT"}


def build_report(evaluation) -> dict:
    """Plain JSON: reconstruction and prediction tables of predictors, the memorization check, active units."""
    config, case = evaluation.config, evaluation.case
    n_nodes = case.array.sample_shape[1]
    reconstruction = {"vae": evaluation.reconstruction.subset(case.val_indices).summary(n_nodes),
                      **{name: evaluation.baselines[name].summary(n_nodes) for name in ("pod", "mean_field")}}
    report = {
        "metrics": "relative L2 = ||predicted - simulated|| / ||simulated|| over a design's whole [T, M] field; "
                   "max_abs_error = largest |predicted - simulated| of each variable; per_step relative_l2 = over "
                   "the designs, at each time step (null where the simulated field is zero), rms_error = root mean "
                   "square error at each step; all in physical units, on the validation designs unless named",
        "n_train": len(case.train_indices), "n_val": len(case.val_indices), "n_steps": case.array.sample_shape[0],
        "n_nodes": n_nodes, "latent_numbers_per_design": config.latent_size,
        "labels": labels(evaluation),
        "reconstruction": reconstruction,
        "reconstruction_training_designs": evaluation.reconstruction.subset(case.train_indices).summary(
            n_nodes, per_step=False),
        "prediction": prediction_section(evaluation, n_nodes),
        "memorization": evaluation.memorization,
        "active_units": {group: {"active": values["active"], "units": values["units"], "kl": values["kl"]}
                         for group, values in evaluation.latent_summary.items()},
    }
    return report


def labels(evaluation) -> dict:
    size = evaluation.config.latent_size
    kind = ""
    if evaluation.conditioner_config is not None:
        facts_config = evaluation.conditioner_config
        kind = CONDITIONER_NAMES[facts_config["input_type"]] + (", end to end" if facts_config["use_e2e_training"]
                                                               else "")
    return {"vae": f"VAE ({size} latent numbers per design)", "pod": f"POD, {size} modes",
            "mean_field": "training mean field", "conditioner": f"conditioner ({kind})",
            "pod_gpr": f"POD ({size} modes) + Gaussian-process regression",
            "nearest_neighbour": "nearest training design in condition space"}


def prediction_section(evaluation, n_nodes: int) -> dict | None:
    """Predictors of unseen designs from their conditions; None when input_type is none."""
    if evaluation.conditions is None:
        return None
    section = {"note": evaluation.prediction_note}
    if evaluation.prediction is not None:
        section["conditioner"] = evaluation.prediction.summary(n_nodes)
    for name in ("pod_gpr", "nearest_neighbour", "mean_field"):
        if name in evaluation.baselines:
            section[name] = evaluation.baselines[name].summary(n_nodes)
    if "pod_gpr" not in evaluation.baselines:
        section["note_pod_gpr"] = "not applicable: designs are defined by images, not parameters"
    return section


def write_report(report: dict, say=print) -> None:
    EVALUATION_JSON.write_text(json.dumps(report, indent=2))
    EVALUATION_MD.write_text(markdown(report))
    say(f"Evaluation ({report['n_val']} validation designs, physical units): mean relative L2 / mean max-abs error")
    for section in ("reconstruction", "prediction"):
        for name, summary in predictors(report, section):
            say(f"  {section} {report['labels'][name]}: {summary['relative_l2']['mean']:.4%} / "
                f"{summary['max_abs_error'][0]['mean']:.4g} (worst design {summary['relative_l2']['max_design']}: "
                f"{summary['relative_l2']['max']:.4%})")
    say(f"  written to {EVALUATION_JSON} and {EVALUATION_MD.name}")


def predictors(report: dict, section: str) -> list:
    """[(name, summary)] of a section, in the table's order."""
    return [(name, value) for name, value in (report[section] or {}).items() if isinstance(value, dict)]


def markdown(report: dict) -> str:
    lines = ["# Evaluation", "", report["metrics"] + ".", "",
             f"{report['n_val']} validation designs (never trained on), {report['n_train']} training designs, "
             f"{report['n_steps']} time steps x {report['n_nodes']} nodes.", ""]
    lines += table("Reconstruction of the validation designs", report, "reconstruction")
    training = report["reconstruction_training_designs"]["relative_l2"]
    lines += [f"The VAE on its training designs: mean {training['mean']:.4%}, median {training['median']:.4%}.", ""]
    if report["prediction"] is not None:
        lines += table("Prediction of unseen designs from their conditions", report, "prediction")
        lines += [f"{note}." for key, note in report["prediction"].items() if key.startswith("note") and note]
        lines += [""]
    lines += worst_designs(report)
    lines += per_step_table(report)
    lines += memorization_lines(report["memorization"])
    lines += ["## Active latent units (validation designs)", "", "| group | active / units | KL (nats) |",
              "|---|---|---|"]
    lines += [f"| {group} | {values['active']} / {values['units']} | {values['kl']:.4g} |"
              for group, values in report["active_units"].items()]
    return "\n".join(lines) + "\n"


def table(title: str, report: dict, section: str) -> list:
    lines = [f"## {title}", "", "| predictor | mean relative L2 | median | worst (design) | mean max-abs | "
             "worst max-abs (design) |", "|---|---|---|---|---|---|"]
    for name, summary in predictors(report, section):
        relative = summary["relative_l2"]
        absolute = "; ".join(f"{value['mean']:.4g}" for value in summary["max_abs_error"])
        worst_absolute = "; ".join(f"{value['max']:.4g} ({value['max_design']})"
                                   for value in summary["max_abs_error"])
        lines.append(f"| {report['labels'][name]} | {relative['mean']:.4%} | {relative['median']:.4%} | "
                     f"{relative['max']:.4%} ({relative['max_design']}) | {absolute} | {worst_absolute} |")
    return lines + [""]


def worst_designs(report: dict) -> list:
    lines = ["## Worst validation designs", ""]
    for section, name in (("reconstruction", "vae"), ("prediction", "conditioner")):
        summary = (report[section] or {}).get(name)
        if summary:
            designs = ", ".join(f"{row['design']} ({row['relative_l2']:.3%})" for row in summary["worst_designs"])
            lines.append(f"- {report['labels'][name]}: {designs}")
    return lines + [""]


def per_step_table(report: dict) -> list:
    """Relative L2 error at STEPS_IN_TABLE evenly spaced time steps, one column per predictor."""
    prefix = {"reconstruction": "reconstruction:", "prediction": "prediction:"}
    columns = [(f"{prefix[section]} {report['labels'][name]}", summary["per_step"]["relative_l2"])
               for section in ("reconstruction", "prediction") for name, summary in predictors(report, section)]
    steps = sorted(set(np.linspace(0, report["n_steps"] - 1, STEPS_IN_TABLE).round().astype(int).tolist()))
    lines = ["## Relative L2 error per time step", "", "| step | " + " | ".join(label for label, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for step in steps:
        cells = ["n/a" if values[step] is None else f"{values[step]:.3%}" for _, values in columns]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines + [""]


def memorization_lines(memorization: dict) -> list:
    samples, heldout = memorization["samples_nearest_distance"], memorization["heldout_nearest_distance"]
    return ["## Memorization check (generation)", "",
            f"Distance (relative L2) of {memorization['n_samples']} prior samples to their nearest training design: "
            f"median {samples['median']:.4%}; of {memorization['n_heldout']} held-out designs: median "
            f"{heldout['median']:.4%}. {memorization['share_closer_than_heldout_p5']:.0%} of the samples are nearer "
            f"a training design than 95 % of new designs are: {memorization['verdict']}.", ""]


def evaluate_and_write(config, runtime, case=None, vae_file=MODEL_FILE, say=print) -> dict:
    """Evaluate the saved models (modules/evaluation.py), write the report and, with --plot 0/1, the plots;
    returns the report. config: the current one (plot settings); case: the VAE run's Case when it was just trained;
    vae_file: the VAE to evaluate (the one a conditioner-only run trained through)."""
    evaluation = evaluate_saved(config, runtime, case, vae_file, say)
    report = build_report(evaluation)
    if config.plot < 2:
        report["plots"] = [str(path) for path in plots.evaluation_plots(evaluation, report, config,
                                                                        show=config.plot == 0, say=say)]
    write_report(report, say)
    return report
