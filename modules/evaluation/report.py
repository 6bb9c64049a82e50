"""Every report of an evaluation (evaluation.evaluation.Evaluation), each a view of the same numbers: what is
written to output/ and what is printed.

- reconstruction_error.json: the VAE against POD on the validation designs (after the VAE trains);
- prediction_report.json and .md: the conditioner against the baselines (after the conditioner trains);
- evaluation.json (every number), evaluation.md (the tables a person reads) and memorization.json (at the end of
  every run, and --evaluate), with the evaluation plots when --plot is 0 or 1.
"""
import logging

import numpy as np

from modules.config.keys import LOSS_NAMES
from modules.evaluation import figures
from modules.evaluation.metrics import as_percent
from modules.models.conditioners import CONDITIONERS, FEATURE_FRAME, NEURAL_FIELD, conditioner_label
from modules.storage.atomic import save_json, save_text
from modules.storage.paths import OUTPUT_DIR, PREDICTION_REPORT
from modules.uncertainty.spread import calibration_words

log = logging.getLogger(__name__)

# why POD + RBF is missing where the designs are defined by parameters (evaluation.baselines)
NO_SPLINE = ("the training designs do not determine a thin-plate spline (too few for the parameters, two at the same "
             "parameters, or all on a hyperplane of them)")

RECONSTRUCTION_REPORT = OUTPUT_DIR / "reconstruction_error.json"
EVALUATION_JSON = OUTPUT_DIR / "evaluation.json"
EVALUATION_MD = OUTPUT_DIR / "evaluation.md"
MEMORIZATION_JSON = OUTPUT_DIR / "memorization.json"
STEPS_IN_TABLE = 10  # evenly spaced time steps in the .md table (the .json and the plot have every step)


def conditioner_kind(facts: dict) -> str:
    """'MLP', 'CNN, end to end', 'ensemble of 5 MLPs', 'GP on latents', ... of a saved conditioner (its file's
    facts)."""
    kind = conditioner_label(facts["spec"]["kind"], facts["spec"]["members"])
    return kind + (", end to end" if trained_end_to_end(facts) else "")


def trained_end_to_end(facts: dict) -> bool:
    """Whether a saved conditioner was trained through the decoder (only the network input_type trains is: a GP or
    an RBF on the latents is fitted, never; a neural field has a decoder of its own)."""
    trained = {row.kind for row in CONDITIONERS.values()}
    return bool(facts["config"]["use_e2e_training"]) and facts["spec"]["kind"] in trained


# ------------------------------------------------------------------------------------------------ reconstruction
def reconstruction_report(evaluation) -> dict:
    """The VAE against POD with as many numbers per design (and as many as its main latent) and the mean field, on
    the validation designs: mean relative L2 errors."""
    config, case = evaluation.config, evaluation.case
    errors = evaluation.encoding.errors.relative_l2()
    vae_val, vae_train = errors[case.val_indices], errors[case.train_indices]
    pod = {0: evaluation.baselines["mean_field"], config.main_latent_dim: evaluation.baselines["pod_main"],
           config.latent_size: evaluation.baselines["pod"]}
    return {
        "metric": "mean relative L2 error of the whole [T, M] field, physical units",
        "n_train": len(case.train_indices), "n_val": len(case.val_indices),
        "latent_numbers_per_design": config.latent_size,
        "vae_val": float(vae_val.mean()), "vae_val_median": float(np.median(vae_val)),
        "vae_val_worst": float(vae_val.max()), "vae_train": float(vae_train.mean()),
        "pod_val": {str(rank): float(pod[rank].relative_l2().mean()) for rank in sorted(pod)},
        "pod_note": "POD rank r keeps r numbers per design; rank 0 is the training mean field",
        "pod_rank_cap": len(case.train_indices) - 1,
        "vae_val_per_design": {int(i): float(e) for i, e in zip(case.val_indices, vae_val)},
    }


def write_reconstruction_report(evaluation) -> dict:
    report = reconstruction_report(evaluation)
    save_json(RECONSTRUCTION_REPORT, report)
    size = report["latent_numbers_per_design"]
    log.info(f"Validation reconstruction error (mean relative L2, physical units, {report['n_val']} designs):")
    log.info(f"  VAE ({size} latent numbers per design): {as_percent(report['vae_val'])}   (training designs: "
             f"{as_percent(report['vae_train'])})")
    for rank, error in report["pod_val"].items():
        label = "mean field (POD rank 0)" if rank == "0" else f"POD rank {rank}"
        capped = "  (rank capped by the training-set size)" if int(rank) > report["pod_rank_cap"] else ""
        log.info(f"  {label}: {as_percent(error)}{capped}")
    log.info(f"  written to {RECONSTRUCTION_REPORT}")
    return report


# ---------------------------------------------------------------------------------------------------- prediction
def prediction_report(evaluation) -> dict:
    """The conditioner against POD + GPR, POD + RBF, the nearest training design and the mean field on the validation
    designs (which neither network trained on), with the VAE's own reconstruction of them: the floor for any conditioner
    through this decoder. Mean relative L2 errors."""
    config, case, baselines = evaluation.config, evaluation.case, evaluation.baselines
    facts = evaluation.conditioner.facts
    predicted = evaluation.prediction.relative_l2()
    worst = int(np.argmax(predicted))
    means = {name: float(baselines[name].relative_l2().mean()) if name in baselines else None
             for name in ("pod_gpr", "pod_rbf", "nearest_neighbour", "mean_field")}
    by_images, no_spline = "; not applicable: designs are defined by images", f"; not applicable: {NO_SPLINE}"
    return {
        "metric": "mean relative L2 error of the whole [T, M] field, physical units, validation designs",
        "input_type": facts["config"]["input_type"],
        "end_to_end": trained_end_to_end(facts),
        "conditioner": conditioner_kind(facts), "conditioner_choice": facts["choice"],
        "ensemble": facts["ensemble"],
        "n_train": len(case.train_indices), "n_val": len(case.val_indices),
        "latent_numbers_per_design": config.latent_size,
        "conditioner_val": float(predicted.mean()), "conditioner_val_median": float(np.median(predicted)),
        "conditioner_val_worst": float(predicted[worst]),
        "conditioner_val_worst_design": int(case.val_indices[worst]),
        "vae_reconstruction_val": float(evaluation.encoding.errors.relative_l2()[case.val_indices].mean()),
        "baselines": means,
        "baseline_notes": {
            "pod_gpr": f"POD of the training fields with {config.latent_size} modes, coefficients regressed on the "
                       "parameters by a Gaussian process" + ("" if means["pod_gpr"] is not None else by_images),
            "pod_rbf": "the same POD coefficients interpolated by a thin-plate spline on the parameters"
                       + ("" if means["pod_rbf"] is not None else by_images if means["pod_gpr"] is None
                          else no_spline),
            "nearest_neighbour": "the field of the training design with the closest condition",
            "mean_field": "the training designs' mean field, whatever the design"},
        "conditioner_val_per_design": {int(i): float(e) for i, e in zip(case.val_indices, predicted)},
    }


def write_prediction_report(evaluation) -> dict:
    report = prediction_report(evaluation)
    save_json(PREDICTION_REPORT.with_suffix(".json"), report)
    save_text(PREDICTION_REPORT.with_suffix(".md"), prediction_markdown(report))
    log.info(f"Validation prediction error (mean relative L2, physical units, {report['n_val']} designs never trained "
             "on):")
    for label, value in prediction_rows(report):
        log.info(f"  {label}: {value}")
    log.info(f"  written to {PREDICTION_REPORT.with_suffix('.json')} and .md")
    return report


def prediction_rows(report: dict) -> list:
    def percent(value):
        return "n/a (designs are defined by images)" if value is None else as_percent(value)
    baselines = report["baselines"]
    spline = baselines["pod_rbf"]  # None: images, or parameters that determine no spline
    spline = ("n/a (the training designs determine no thin-plate spline)" if spline is None
              and baselines["pod_gpr"] is not None else percent(spline))
    return [(f"conditioner ({report['conditioner']})", f"{percent(report['conditioner_val'])} (median "
             f"{as_percent(report['conditioner_val_median'])}, worst {as_percent(report['conditioner_val_worst'])} "
             "on design "
             f"{report['conditioner_val_worst_design']})"),
            ("VAE reconstruction of the same designs (the floor through this decoder)",
             percent(report["vae_reconstruction_val"])),
            (f"POD ({report['latent_numbers_per_design']} modes) + Gaussian-process regression",
             percent(baselines["pod_gpr"])),
            (f"POD ({report['latent_numbers_per_design']} modes) + thin-plate-spline interpolation", spline),
            ("nearest training design in condition space", percent(baselines["nearest_neighbour"])),
            ("training mean field", percent(baselines["mean_field"]))]


def prediction_markdown(report: dict) -> str:
    lines = ["# Prediction of unseen designs", "",
             f"{report['metric']}: {report['n_val']} validation designs, {report['n_train']} training designs.", "",
             "| predictor | mean relative L2 |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in prediction_rows(report)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- evaluation
def write_evaluation(evaluation, config, time_spent: dict | None = None) -> dict:
    """evaluation.json and .md, memorization.json, the printed summary and, with --plot 0/1, the evaluation plots;
    returns the report. config: the current one (plot settings). time_spent: the training run's time on each part of
    the surrogate, kept or discarded (storage.runs.time_spent), reported as it is; None after --evaluate alone."""
    log.info(f"Evaluating {evaluation.vae_file} on {len(evaluation.case.val_indices)} validation designs ...")
    report = {**evaluation_report(evaluation), "time_spent": time_spent}
    save_json(MEMORIZATION_JSON, report["memorization"])
    say_memorization(report["memorization"])
    if config.plot < 2:
        report["plots"] = [str(path) for path in figures.evaluation_plots(evaluation, report, config,
                                                                          show=config.plot == 0)]
    write_evaluation_report(report)
    return report


def say_memorization(report: dict) -> None:
    samples, held = report["samples_nearest_distance"], report["heldout_nearest_distance"]
    log.info(f"Memorization check ({report['n_samples']} prior samples, {report['n_heldout']} held-out designs; "
             f"relative L2 distance to the nearest of {report['n_train']} training designs):")
    log.info(f"  samples: median {as_percent(samples['median'])}, 5th percentile {as_percent(samples['p5'])}; "
             "held-out designs: median "
             f"{as_percent(held['median'])}, 5th percentile {as_percent(held['p5'])}")
    log.info(f"  {report['share_closer_than_heldout_p5']:.0%} of the samples are nearer a training design than 95 % of "
             f"new designs are: {report['verdict']} (written to {MEMORIZATION_JSON})")


def evaluation_report(evaluation) -> dict:
    """output/evaluation.json: reconstruction and prediction tables of predictors, the memorization check, active
    units; plain JSON."""
    config, case = evaluation.config, evaluation.case
    n_nodes = evaluation.n_nodes
    reconstruction = {"vae": evaluation.encoding.errors.subset(case.val_indices).summary(n_nodes),
                      **{name: evaluation.baselines[name].summary(n_nodes) for name in ("pod", "mean_field")}}
    report = {
        "metrics": "relative L2 = ||predicted - simulated|| / ||simulated|| over a design's whole [T, M] field; "
                   "max_abs_error = largest |predicted - simulated| of each variable; per_step relative_l2 = over "
                   "the designs, at each time step (null where the simulated field is zero), rms_error = root mean "
                   "square error at each step; all in physical units, on the validation designs unless named",
        "n_train": len(case.train_indices), "n_val": len(case.val_indices), "n_steps": case.array.sample_shape[0],
        "n_nodes": n_nodes, "latent_numbers_per_design": config.latent_size,
        "vae_runs_on": "fields" if evaluation.vae.codec is None else "snapshot codes",
        "labels": labels(evaluation),
        "reconstruction": reconstruction,
        "reconstruction_training_designs": evaluation.encoding.errors.subset(case.train_indices).summary(
            n_nodes, per_step=False),
        "prediction": prediction_section(evaluation, n_nodes),
        "uncertainty": uncertainty_section(evaluation),
        "likelihood": likelihood_section(evaluation),
        "memorization": evaluation.memorization,
        "active_units": {group: {"active": values["active"], "units": values["units"], "kl": values["kl"]}
                         for group, values in evaluation.latent_summary.items()},
    }
    report["warnings"] = not_learnt_warnings(report)
    return report


NOT_LEARNT_RATIO = 0.9  # an error above 90 % of the mean field's: the model has learnt next to nothing of the case


def not_learnt_warnings(report: dict) -> list:
    """A sentence for the VAE's reconstruction and for the conditioner's prediction of the validation designs when
    either is not clearly better than the training designs' mean field (what a model that learnt nothing gives):
    a short trial run, a learning rate that diverged, or a case the settings do not suit."""
    warnings = []
    baseline = report["reconstruction"]["mean_field"]["relative_l2"]["mean"]
    checks = [("VAE's reconstruction", report["reconstruction"]["vae"]["relative_l2"]["mean"],
               "more Training_epochs, or a lower LearningR")]
    if report["prediction"] is not None and "conditioner" in report["prediction"]:  # it may be left out (a note)
        checks.append(("conditioner's prediction", report["prediction"]["conditioner"]["relative_l2"]["mean"],
                       "more n_epoch, or a lower latent_conditioner_lr"))
    for what, error, fix in checks:
        if error >= NOT_LEARNT_RATIO * baseline:
            compared = "worse than" if error > baseline else "hardly better than"
            warnings.append(f"the {what} of the validation designs ({as_percent(error)}) is {compared} the training "
                            f"designs' mean field ({as_percent(baseline)}), which knows nothing of a design: this "
                            f"model has not learnt the case. Try {fix}; see the loss curves")
    return warnings


def uncertainty_section(evaluation) -> dict | None:
    """The prediction's uncertainty as the conditioner's training calibrated it on the validation designs
    (uncertainty.calibration) and, for an ensemble, its mean against its members; None without a conditioner."""
    if evaluation.conditioner is None:
        return None
    facts = evaluation.conditioner.facts
    kept = {"kept_instead": f"the {conditioner_label(facts['spec']['kind'])}"}  # what an ensemble not kept lost to
    if facts["spec"]["kind"] in (NEURAL_FIELD.kind, FEATURE_FRAME.kind) and not facts["spec"].get("spread_kind"):
        return {"note": f"no uncertainty: the {conditioner_label(facts['spec']['kind'])} kept as the conditioner "
                        "carries none (latent_gp 1 or latent_rbf 1 gives it one)", "ensemble": facts["ensemble"],
                **kept}
    if (facts["calibration"] or {}).get("no_spread"):
        return {"note": "no uncertainty: " + calibration_words(facts["calibration"]), "ensemble": facts["ensemble"],
                **kept}
    if facts["calibration"] is None:
        return {"note": "no calibrated uncertainty: the conditioner file holds no calibration, as files written before "
                        "calibration existed do (retrain it with --lc_only=1)", "ensemble": facts["ensemble"], **kept}
    return {**facts["calibration"], "ensemble": facts["ensemble"], **kept}


def uncertainty_lines(section: dict | None) -> list:
    """The evaluation.md section on the prediction's uncertainty."""
    if section is None:
        return []
    lines = ["## Uncertainty of the prediction", ""]
    ensemble = section.get("ensemble")
    if ensemble:
        members = ensemble["members_val"]
        kept = "" if ensemble["kept"] else f" (not kept: {section['kept_instead']} predicts better)"
        lines += [f"The {ensemble['label']}{kept} predicts the validation designs with a mean relative L2 error of "
                  f"{as_percent(ensemble['ensemble_val'])}; its members alone {as_percent(min(members))} to "
                  f"{as_percent(max(members))} (mean "
                  f"{as_percent(np.mean(members))}).", ""]
    if "note" in section:
        return lines + [section["note"] + ".", ""]
    words = calibration_words(section)
    lines += [words[0].upper() + words[1:] + ".", "",
              "| band | expected | before calibration | after (each design held out) |", "|---|---|---|---|"]
    coverage = section["coverage"]
    for band, nominal in coverage["nominal"].items():
        after = "n/a" if coverage["calibrated"] is None else f"{coverage['calibrated'][band]:.1%}"
        lines.append(f"| +-{band} | {nominal:.1%} | {coverage['raw'][band]:.1%} | {after} |")
    return lines + ["", "`--predict ... --samples=K` writes the calibrated standard deviation (OUT_std.npy).", ""]


def likelihood_section(evaluation) -> dict:
    """The reconstruction term the VAE was trained with (training.losses): a fixed alpha, or the likelihood whose
    noise scale per variable training set (its last value, in scaled and physical units)."""
    config = evaluation.config
    if config.fixed_recon_weight is not None:
        return {"alpha": config.fixed_recon_weight, "model": f"fixed weight on the mean {LOSS_NAMES[config.loss_type]}"}
    scaled = evaluation.vae.noise_std.cpu().double().numpy()
    model = "Gaussian" if config.loss_type == 1 else "Laplace"
    if evaluation.vae.codec is not None:  # on the snapshot codec's codes: one scale, in standardised code units
        return {"alpha": "auto", "model": model, "noise_std_codes": scaled.tolist()}
    return {"alpha": "auto", "model": model, "noise_std_scaled": scaled.tolist(),
            "noise_std_physical": evaluation.case.scaler.physical_spread(scaled).tolist()}


def likelihood_words(likelihood: dict) -> str:
    if likelihood["alpha"] != "auto":
        return f"alpha {likelihood['alpha']:g} ({likelihood['model']})"
    if "noise_std_codes" in likelihood:
        return (f"alpha auto: a {likelihood['model']} likelihood on the snapshot codec's codes with a noise scale of "
                f"{likelihood['noise_std_codes'][0]:.3g} (standardised code units)")
    noise = ", ".join(f"{value:.3g}" for value in likelihood["noise_std_physical"])
    return (f"alpha auto: a {likelihood['model']} likelihood with a noise scale of {noise} per variable "
            f"(physical units)")


def labels(evaluation) -> dict:
    size = evaluation.config.latent_size
    kind = ""
    if evaluation.conditioner is not None:
        kind = conditioner_kind(evaluation.conditioner.facts)
    on = "" if evaluation.vae.codec is None else ", on the snapshot codec's codes"
    return {"vae": f"VAE ({size} latent numbers per design{on})", "pod": f"POD, {size} modes",
            "mean_field": "training mean field", "conditioner": f"conditioner ({kind})",
            "pod_gpr": f"POD ({size} modes) + Gaussian-process regression",
            "pod_rbf": f"POD ({size} modes) + thin-plate-spline interpolation",
            "nearest_neighbour": "nearest training design in condition space"}


def prediction_section(evaluation, n_nodes: int) -> dict | None:
    """Predictors of unseen designs from their conditions; None when input_type is none."""
    if evaluation.conditions is None:
        return None
    prediction = evaluation.prediction  # first: reading the conditioner sets prediction_note
    section = {"note": evaluation.prediction_note}
    if prediction is not None:
        section["conditioner"] = prediction.summary(n_nodes)
    for name in ("pod_gpr", "pod_rbf", "nearest_neighbour", "mean_field"):
        if name in evaluation.baselines:
            section[name] = evaluation.baselines[name].summary(n_nodes)
    if "pod_gpr" not in evaluation.baselines:
        section["note_pod_gpr"] = "not applicable: designs are defined by images, not parameters"
    elif "pod_rbf" not in evaluation.baselines:
        section["note_pod_rbf"] = f"POD + thin-plate spline not applicable: {NO_SPLINE}"
    return section


def write_evaluation_report(report: dict) -> None:
    """The files and the printed summary; each of report's warnings (not_learnt_warnings) last, loudly, on stderr."""
    save_json(EVALUATION_JSON, report)
    save_text(EVALUATION_MD, evaluation_markdown(report))
    log.info(f"Evaluation ({report['n_val']} validation designs, physical units): mean relative L2 / mean max-abs "
             "error")
    for section in ("reconstruction", "prediction"):
        for name, summary in predictors(report, section):
            log.info(f"  {section} {report['labels'][name]}: {as_percent(summary['relative_l2']['mean'])} / "
                     f"{summary['max_abs_error'][0]['mean']:.4g} (worst design {summary['relative_l2']['max_design']}: "
                     f"{as_percent(summary['relative_l2']['max'])})")
    log.info(f"  the VAE's reconstruction term: {likelihood_words(report['likelihood'])}")
    if report.get("time_spent"):
        log.info(f"  time: {time_spent_words(report['time_spent'])}")
    log.info(f"  written to {EVALUATION_JSON} and {EVALUATION_MD.name}")
    for warning in report.get("warnings", []):
        log.warning(f"WARNING: {warning}")


def predictors(report: dict, section: str) -> list:
    """[(name, summary)] of a section, in the table's order."""
    return [(name, value) for name, value in (report[section] or {}).items() if isinstance(value, dict)]


def evaluation_markdown(report: dict) -> str:
    lines = ["# Evaluation", "", *[f"**Warning: {warning}.**\n" for warning in report.get("warnings", [])],
             report["metrics"] + ".", "",
             f"{report['n_val']} validation designs (never trained on), {report['n_train']} training designs, "
             f"{report['n_steps']} time steps x {report['n_nodes']} nodes.", ""]
    lines += predictor_table("Reconstruction of the validation designs", report, "reconstruction")
    training = report["reconstruction_training_designs"]["relative_l2"]
    lines += [f"The VAE on its training designs: mean {as_percent(training['mean'])}, median "
              f"{as_percent(training['median'])}.", "",
              f"The VAE's reconstruction term: {likelihood_words(report['likelihood'])}.", ""]
    if report["prediction"] is not None:
        lines += predictor_table("Prediction of unseen designs from their conditions", report, "prediction")
        lines += [f"{note}." for key, note in report["prediction"].items() if key.startswith("note") and note]
        lines += [""]
        lines += uncertainty_lines(report.get("uncertainty"))
    if report.get("time_spent"):
        lines += time_spent_lines(report["time_spent"])
    lines += worst_designs(report)
    lines += per_step_table(report)
    lines += memorization_lines(report["memorization"])
    lines += ["## Active latent units (validation designs)", "", "| group | active / units | KL (nats) |",
              "|---|---|---|"]
    lines += [f"| {group} | {values['active']} / {values['units']} | {values['kl']:.4g} |"
              for group, values in report["active_units"].items()]
    return "\n".join(lines) + "\n"


def time_spent_words(spent: dict) -> str:
    discarded = [f"{part} {values['seconds']:.0f} s" for part, values in spent["parts"].items() if not values["kept"]]
    return (f"{spent['kept_s']:.0f} s on the parts of the surrogate kept, {spent['discarded_s']:.0f} s on candidates "
            "discarded" + (f" ({', '.join(discarded)})" if discarded else ""))


def time_spent_lines(spent: dict) -> list:
    lines = ["## Time spent on the surrogate", "", f"Training: {time_spent_words(spent)}.", "",
             "| part | seconds | kept |", "|---|---|---|"]
    lines += [f"| {part} | {values['seconds']:.1f} | {'yes' if values['kept'] else 'no'} |"
              for part, values in spent["parts"].items()]
    return lines + [""]


def predictor_table(title: str, report: dict, section: str) -> list:
    lines = [f"## {title}", "", "| predictor | mean relative L2 | median | worst (design) | mean max-abs | "
             "worst max-abs (design) |", "|---|---|---|---|---|---|"]
    for name, summary in predictors(report, section):
        relative = summary["relative_l2"]
        absolute = "; ".join(f"{value['mean']:.4g}" for value in summary["max_abs_error"])
        worst_absolute = "; ".join(f"{value['max']:.4g} ({value['max_design']})"
                                   for value in summary["max_abs_error"])
        lines.append(f"| {report['labels'][name]} | {as_percent(relative['mean'])} | "
                     f"{as_percent(relative['median'])} | "
                     f"{as_percent(relative['max'])} ({relative['max_design']}) | {absolute} | {worst_absolute} |")
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
            f"median {as_percent(samples['median'])}; of {memorization['n_heldout']} held-out designs: median "
            f"{as_percent(heldout['median'])}. {memorization['share_closer_than_heldout_p5']:.0%} of the samples are "
            "nearer "
            f"a training design than 95 % of new designs are: {memorization['verdict']}.", ""]
