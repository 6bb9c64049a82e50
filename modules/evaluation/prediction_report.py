"""How well the conditioner predicts the fields of designs it never saw, next to what a user would do without it.

All numbers are the mean relative L2 error of the whole [T, M] field in physical units, on the validation designs
(the VAE's validation designs, which neither the VAE nor the conditioner trained on). Written to
output/prediction_report.json and .md.
"""
import json

import numpy as np
import torch

from modules.evaluation import figures as plots
from modules.evaluation.baselines import nearest_neighbour_errors, pod_gpr_errors
from modules.data.batches import in_order
from modules.evaluation.reconstruction_report import relative_l2
from modules.models.latents import decode_latents
from modules.storage.paths import OUTPUT_DIR, PREDICTION_PLOT, PREDICTION_REPORT
from modules.models.pod import pod_errors


def evaluate_and_write(model, case, config, history, say=print) -> dict:
    """Score the conditioner and the baselines, write the report (and plots with --plot 0/1), return the report."""
    predicted, ceiling, samples = conditioner_errors(model, case, config)
    report = build_report(predicted, ceiling, baseline_errors(case, config), case, config)
    write_report(report, say)
    if config.plot < 2:
        plots.conditioner_plots(history, samples, OUTPUT_DIR, PREDICTION_PLOT, show=config.plot == 0, say=say)
    return report


@torch.no_grad()
def conditioner_errors(model, case, config):
    """Per validation design: the conditioner's error and the VAE's own reconstruction error (decoding the VAE's
    latents: the best any conditioner can do through this decoder). Also returns the first designs' fields for
    the plots."""
    model.eval()
    val_indices, scaler = case.fields.val_indices, case.fields.scaler
    predicted_errors, ceiling_errors, samples = [], [], None
    positions_list = list(in_order(len(val_indices), config.lc_batch_size))
    for positions, fields in zip(positions_list, case.fields.val.batches(positions_list)):
        designs = torch.as_tensor(val_indices[positions], device=case.conditions.device)
        true = scaler.inverse(fields.float().cpu().numpy())
        predicted = physical(case, decode_latents(case.vae, case.latent_scaler, model(case.conditions[designs])))
        ceiling = physical(case, decode_latents(case.vae, case.latent_scaler, case.targets[designs]))
        predicted_errors.append(relative_l2(predicted, true))
        ceiling_errors.append(relative_l2(ceiling, true))
        if samples is None:
            samples = (val_indices[positions][:plots.SAMPLES_SHOWN], true[:plots.SAMPLES_SHOWN],
                       predicted[:plots.SAMPLES_SHOWN])
    return np.concatenate(predicted_errors), np.concatenate(ceiling_errors), samples


def physical(case, scaled):
    return case.fields.scaler.inverse(scaled.float().cpu().numpy())


def baseline_errors(case, config) -> dict:
    """{name: per-validation-design errors or None}, from one streamed Gram matrix of the designs' fields."""
    order = np.concatenate([case.fields.train_indices, case.fields.val_indices])
    n_train = len(case.fields.train_indices)
    gram = case.fields.split_gram()  # already computed by the VAE's report when both trained in this run
    conditions = case.conditions.cpu().numpy()[order]  # standardised parameters, or image pixels
    errors = {"nearest_neighbour": nearest_neighbour_errors(gram, n_train, conditions),
              "mean_field": pod_errors(gram, n_train, [0])[0], "pod_gpr": None}
    if case.input_scaler is not None:
        errors["pod_gpr"] = pod_gpr_errors(gram, n_train, conditions, config.latent_size, config.seed)
    return errors


def build_report(predicted, ceiling, baselines, case, config) -> dict:
    val_indices = case.fields.val_indices
    worst = int(np.argmax(predicted))
    return {
        "metric": "mean relative L2 error of the whole [T, M] field, physical units, validation designs",
        "input_type": config.input_type, "end_to_end": bool(config.use_e2e_training),
        "n_train": len(case.fields.train_indices), "n_val": len(val_indices),
        "latent_numbers_per_design": config.latent_size,
        "conditioner_val": float(predicted.mean()), "conditioner_val_median": float(np.median(predicted)),
        "conditioner_val_worst": float(predicted[worst]), "conditioner_val_worst_design": int(val_indices[worst]),
        "vae_reconstruction_val": float(ceiling.mean()),
        "baselines": {name: None if errors is None else float(errors.mean()) for name, errors in baselines.items()},
        "baseline_notes": {
            "pod_gpr": f"POD of the training fields with {config.latent_size} modes, coefficients regressed on the "
                       "parameters by a Gaussian process" + ("" if baselines["pod_gpr"] is not None else
                                                             "; not applicable: designs are defined by images"),
            "nearest_neighbour": "the field of the training design with the closest condition",
            "mean_field": "the training designs' mean field, whatever the design"},
        "conditioner_val_per_design": {int(i): float(e) for i, e in zip(val_indices, predicted)},
    }


def write_report(report: dict, say=print) -> None:
    PREDICTION_REPORT.with_suffix(".json").write_text(json.dumps(report, indent=2))
    PREDICTION_REPORT.with_suffix(".md").write_text(markdown(report))
    say(f"Validation prediction error (mean relative L2, physical units, {report['n_val']} designs never trained "
        "on):")
    for label, value in table_rows(report):
        say(f"  {label}: {value}")
    say(f"  written to {PREDICTION_REPORT.with_suffix('.json')} and .md")


def table_rows(report: dict) -> list:
    def percent(value):
        return "n/a (designs are defined by images)" if value is None else f"{value:.4%}"
    baselines = report["baselines"]
    kind = {"csv": "MLP", "image": "CNN", "image_vit": "ViT"}[report["input_type"]]
    mode = ", end to end" if report["end_to_end"] else ""
    return [(f"conditioner ({kind}{mode})", f"{percent(report['conditioner_val'])} (median "
             f"{report['conditioner_val_median']:.4%}, worst {report['conditioner_val_worst']:.4%} on design "
             f"{report['conditioner_val_worst_design']})"),
            ("VAE reconstruction of the same designs (the floor through this decoder)",
             percent(report["vae_reconstruction_val"])),
            (f"POD ({report['latent_numbers_per_design']} modes) + Gaussian-process regression",
             percent(baselines["pod_gpr"])),
            ("nearest training design in condition space", percent(baselines["nearest_neighbour"])),
            ("training mean field", percent(baselines["mean_field"]))]


def markdown(report: dict) -> str:
    lines = ["# Prediction of unseen designs", "",
             f"{report['metric']}: {report['n_val']} validation designs, {report['n_train']} training designs.", "",
             "| predictor | mean relative L2 |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in table_rows(report)]
    return "\n".join(lines) + "\n"
