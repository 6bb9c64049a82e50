"""The latent conditioner end to end: full run, --lc_only, the three input types, end-to-end training, --predict."""
import dataclasses
import hashlib
import json
import shutil
from contextlib import chdir

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import design_parameters, said, smooth_fields, tensorboard_dir, write_case, write_conditions
from modules.cli import main
from modules.storage.case_lock import LOCK_FILE

N_DESIGNS, N_NEW = 24, 6
CONDITIONER = """input_type {input_type}
param_dir {param_dir}
n_epoch 60
latent_conditioner_batch 6
latent_conditioner_lr 0.003
latent_conditioner_dropout_rate 0.0
image_size 16
vit_patch_size 4
vit_dim 32
vit_depth 2
vit_heads 4
"""
VAE_FILES = ("model_save/SimulGen-VAE", "model_save/latent_vectors.npy", "model_save/xs.npy", "model_save/scaler.json",
             "model_save/split.json", "checkpoints/best.pt", "checkpoints/last.pt", "output/metrics.csv",
             "output/reconstruction_error.json")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_conditioner(folder, input_type, param_dir, extra=""):
    """Rewrite the conditioner block of condition.txt (the VAE keys stay as they are)."""
    path = folder / "input_data" / "condition.txt"
    text = path.read_text().split("input_type")[0]
    text = text if text.endswith("\n") else text + "\n"
    settings = CONDITIONER.format(input_type=input_type, param_dir=param_dir)
    if input_type == "csv":  # image and ViT keys would only draw "no effect" notes
        settings = "".join(line + "\n" for line in settings.splitlines() if not line.startswith(("image", "vit")))
    elif input_type == "image":
        settings = "".join(line + "\n" for line in settings.splitlines() if not line.startswith("vit"))
    path.write_text(text + settings + extra)


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """A tiny case whose designs are defined by 2 parameters (CSV and images), trained in one full run with the
    CSV conditioner, the MLP (latent_gp 0: the GP candidate has tests of its own). New designs (never trained on) and
    their true fields are kept in new/."""
    folder = tmp_path_factory.mktemp("conditioned")
    parameters = design_parameters(N_DESIGNS + N_NEW, seed=3)
    fields = smooth_fields(N_DESIGNS + N_NEW, 6, 20, parameters=parameters)
    write_case(folder, n=N_DESIGNS, epochs=60, data=fields[:N_DESIGNS])
    write_conditions(folder, parameters[:N_DESIGNS])
    write_conditions(folder, parameters[N_DESIGNS:], images="new/images", csv="new/parameters.csv")
    np.save(folder / "new" / "fields.npy", fields[N_DESIGNS:])
    set_conditioner(folder, "csv", "input_data/parameters.csv", "latent_gp 0\nlatent_rbf 0\n")
    with chdir(folder):
        assert main(["--plot=1"]) == 0
    return folder


@pytest.fixture
def copy_of(conditioned, tmp_path):
    """A private copy of the trained case, for tests that train or write more."""
    target = tmp_path / "case"
    shutil.copytree(conditioned, target)
    return target


def report(folder):
    return json.loads((folder / "output" / "prediction_report.json").read_text())


def relative_error(predicted, true):
    return np.linalg.norm((predicted - true).reshape(len(true), -1), axis=1) / np.linalg.norm(
        true.reshape(len(true), -1), axis=1)


# ------------------------------------------------------------------------------------------------- full run, CSV
@pytest.mark.slow
def test_full_run_trains_the_vae_then_the_conditioner_and_reports_it_next_to_baselines(conditioned):
    folder = conditioned
    assert (folder / "model_save" / "SimulGen-VAE").exists() and (folder / "model_save" / "latent_conditioner").exists()
    result = report(folder)
    assert result["input_type"] == "csv" and result["n_val"] == 6 and result["n_train"] == 18
    assert set(result["baselines"]) == {"pod_gpr", "pod_rbf", "nearest_neighbour", "mean_field"}
    assert all(isinstance(value, float) for value in result["baselines"].values())
    assert result["conditioner_val"] < 0.5 * result["baselines"]["mean_field"]
    assert result["vae_reconstruction_val"] <= result["conditioner_val"] * 1.5
    assert "| conditioner (MLP)" in (folder / "output" / "prediction_report.md").read_text()


@pytest.mark.slow
def test_the_run_ends_with_an_evaluation_of_both_models_against_the_same_baselines(conditioned):
    evaluation = json.loads((conditioned / "output" / "evaluation.json").read_text())
    prediction, result = evaluation["prediction"], report(conditioned)
    assert set(prediction) == {"note", "conditioner", "pod_gpr", "pod_rbf", "nearest_neighbour", "mean_field"}
    assert prediction["note"] is None
    assert prediction["conditioner"]["relative_l2"]["mean"] == pytest.approx(result["conditioner_val"], rel=1e-5)
    for name in ("pod_gpr", "pod_rbf", "nearest_neighbour", "mean_field"):
        assert prediction[name]["relative_l2"]["mean"] == pytest.approx(result["baselines"][name], rel=1e-4)
    assert prediction["conditioner"]["worst_designs"][0]["design"] == result["conditioner_val_worst_design"]
    assert evaluation["labels"]["conditioner"] == "conditioner (MLP)"
    for name in ("evaluation_prediction_fields", "latent_space"):
        assert (conditioned / "output" / f"{name}.png").stat().st_size > 10_000
    run = json.loads(next((conditioned / "runs").glob("*/run.json")).read_text())
    assert run["results"]["pod_gpr_val_error"] == pytest.approx(result["baselines"]["pod_gpr"])
    assert run["results"]["pod_rbf_val_error"] == pytest.approx(result["baselines"]["pod_rbf"])
    assert run["results"]["conditioner_best_val_loss"] > 0 and run["results"]["vae_epochs"] == 60


@pytest.mark.slow
def test_conditioner_logs_to_its_own_csv_and_tensorboard_run(conditioned):
    rows = (conditioned / "output" / "conditioner_metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train/loss") and 2 <= len(rows) <= 61
    events = EventAccumulator(str(tensorboard_dir(conditioned, "conditioner")))
    events.Reload()
    assert {"train/loss", "val/loss", "val/latent_mse", "lr"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("val/loss")) == len(rows) - 1
    for name in ("prediction_samples.png", "conditioner_loss_curves.png"):
        with Image.open(conditioned / "output" / name) as image:
            assert image.format == "PNG"


@pytest.mark.slow
def test_the_best_validation_epoch_is_the_conditioner_kept(conditioned):
    best = torch.load(conditioned / "checkpoints" / "conditioner_best.pt", weights_only=True)
    kept = torch.load(conditioned / "model_save" / "latent_conditioner", weights_only=True)
    losses = [float(row.split(",")[4]) for row in
              (conditioned / "output" / "conditioner_metrics.csv").read_text().splitlines()[1:]]
    header = (conditioned / "output" / "conditioner_metrics.csv").read_text().splitlines()[0].split(",")
    assert header[4] == "val/loss"
    progress = best["training"]["progress"]
    assert progress["best_val_loss"] == pytest.approx(min(losses), rel=1e-6)
    assert progress["epoch"] == progress["best_epoch"] == 1 + int(np.argmin(losses))
    assert all(torch.equal(best["state_dict"][k], kept["state_dict"][k]) for k in kept["state_dict"])


@pytest.mark.slow
def test_a_csv_case_keeps_whichever_of_the_mlp_gp_and_rbf_predicts_better_and_says_so(copy_of, capsys):
    assert report(copy_of)["conditioner_choice"] is None  # latent_gp 0, latent_rbf 0: the MLP alone
    set_conditioner(copy_of, "csv", "input_data/parameters.csv")  # latent_gp 1 and latent_rbf 1, the defaults
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 0
    choice = report(copy_of)["conditioner_choice"]
    errors = choice["validation_relative_l2"]
    assert set(errors) == {"mlp", "gpr", "rbf"} and choice["kept"] == min(errors, key=errors.get)
    label = {"mlp": "MLP", "gpr": "GP on latents", "rbf": "RBF on latents"}[choice["kept"]]
    assert f"Kept the {label} as the conditioner" in capsys.readouterr().out
    assert report(copy_of)["conditioner"] == label
    kept = torch.load(copy_of / "model_save" / "latent_conditioner", weights_only=True)
    assert kept["spec"]["kind"] == choice["kept"]
    records = [json.loads(path.read_text()) for path in (copy_of / "runs").glob("*/run.json")]
    assert [record["results"]["conditioner_kept"] for record in records if record["kind"] == "conditioner"] == [label]
    assert json.loads((copy_of / "output" / "evaluation.json").read_text())["labels"]["conditioner"] == \
        f"conditioner ({label})"


@pytest.mark.slow
def test_a_latent_gp_conditioner_predicts_new_designs_and_is_evaluated_like_any_other(copy_of, tmp_path, capsys):
    """Against an untrained MLP (which predicts the mean latents) the GP is kept; --predict and --evaluate then run
    through it, and it predicts new designs far better than the mean field."""
    from modules.config import load_config
    from modules.data.conditions import read_conditions
    from modules.machine.device import Runtime
    from modules.models.conditioners import build_conditioner
    from modules.storage.model_files import save_conditioner
    from modules.training.conditioner_choice import best_candidate
    from modules.training.conditioner_training import conditioner_facts, conditioner_spec, prepare_conditioner_case
    with chdir(copy_of):
        config = load_config(1)
        case = prepare_conditioner_case(config, Runtime(torch.device("cpu")), read_conditions(config),
                                        "model_save/SimulGen-VAE")
        spec = conditioner_spec(config, case)
        config = dataclasses.replace(config, latent_gp=1)  # the case trained its MLP alone
        kept, kept_spec, choice = best_candidate(build_conditioner(spec), spec, case, config)
        assert choice["kept"] == "gpr" and kept_spec.gp_points == len(case.fields.train_indices)
        save_conditioner("model_save/latent_conditioner", kept, kept_spec, {
            **conditioner_facts(config, case), "choice": choice, "ensemble": None, "calibration": None,
            "design_range": None})  # not calibrated, no reference: the choice alone is under test
        assert main([f"--predict={copy_of / 'new' / 'parameters.csv'}", f"--out={tmp_path / 'gp.npy'}"]) == 0
        assert main(["--evaluate"]) == 0
    assert "Kept the GP on latents as the conditioner" in capsys.readouterr().out
    truth = np.load(copy_of / "new" / "fields.npy")
    mean_field = np.load(copy_of / "input_data" / "dataset1.npy").mean(axis=0, keepdims=True)
    error = relative_error(np.load(tmp_path / "gp.npy"), truth)
    assert error.mean() < 0.5 * relative_error(np.broadcast_to(mean_field, truth.shape), truth).mean()
    evaluation = json.loads((copy_of / "output" / "evaluation.json").read_text())
    assert evaluation["labels"]["conditioner"] == "conditioner (GP on latents)"
    assert evaluation["prediction"]["conditioner"]["relative_l2"]["mean"] < \
        evaluation["prediction"]["mean_field"]["relative_l2"]["mean"]


@pytest.mark.slow
def test_a_gp_that_cannot_be_fitted_leaves_the_trained_network_as_the_conditioner(conditioned, monkeypatch, capsys):
    from modules.config import load_config
    from modules.data.conditions import read_conditions
    from modules.machine.device import Runtime
    from modules.models import gaussian_process
    from modules.models.conditioners import build_conditioner
    from modules.training.conditioner_choice import best_candidate
    from modules.training.conditioner_training import conditioner_spec, prepare_conditioner_case

    def singular(self, *args):
        raise np.linalg.LinAlgError("matrix is singular")
    monkeypatch.setattr(gaussian_process.GPRConditioner, "fit", singular)
    with chdir(conditioned):
        config = load_config(1)
        case = prepare_conditioner_case(config, Runtime(torch.device("cpu")), read_conditions(config),
                                        "model_save/SimulGen-VAE")
    spec = conditioner_spec(config, case)
    network = build_conditioner(spec)
    with said() as lines:
        kept, kept_spec, choice = best_candidate(network, spec, case, dataclasses.replace(config, latent_gp=1))
    assert kept is network and kept_spec == spec
    assert {**choice, "fit_seconds": None} == {"kept": "mlp", "gp_failed": "LinAlgError: matrix is singular",
                                               "fit_seconds": None}
    assert "warning: the GP on latents could not be fitted (LinAlgError: matrix is singular); it is not a " \
        "candidate" in lines


@pytest.mark.slow
def test_predict_new_designs_from_a_csv_beats_the_mean_field(conditioned, tmp_path, capsys):
    out = tmp_path / "fields.npy"
    with chdir(conditioned):
        assert main([f"--predict={conditioned / 'new' / 'parameters.csv'}", f"--out={out}"]) == 0
    predicted, true = np.load(out), np.load(conditioned / "new" / "fields.npy")
    assert predicted.shape == true.shape == (N_NEW, 6, 20)
    mean_field = np.load(conditioned / "input_data" / "dataset1.npy").mean(axis=0, keepdims=True)
    assert relative_error(predicted, true).mean() < 0.5 * relative_error(mean_field.repeat(N_NEW, 0), true).mean()
    assert "designs/s" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_names_the_designs_outside_the_training_range_and_still_predicts_them(conditioned, tmp_path, capsys):
    train = json.loads((conditioned / "model_save" / "split.json").read_text())["train"]
    rows = (conditioned / "input_data" / "parameters.csv").read_text().splitlines()
    (tmp_path / "new.csv").write_text(f"{rows[0]}\n{rows[1 + train[0]]}\n9.5,1.0\n")  # a training design, then far
    with chdir(conditioned):
        assert main([f"--predict={tmp_path / 'new.csv'}", f"--out={tmp_path / 'p.npy'}"]) == 0
    error = capsys.readouterr().err
    assert error.startswith("warning: 1 of 2 designs lie outside what the conditioner was trained on")
    assert "row 2: amplitude = 9.5 outside [" in error and str(tmp_path / "p_report.json") in error
    assert np.load(tmp_path / "p.npy").shape == (2, 6, 20)  # predicted all the same
    placed = json.loads((tmp_path / "p_report.json").read_text())["designs"]
    assert [row["outside"] for row in placed] == [False, True]
    nearest = placed[0]["spaces"]["parameters"]
    assert nearest["nearest_training_design"] == train[0] and nearest["distance"] < 1e-9
    assert placed[1]["spaces"]["parameters"]["distance_ratio"] > 2


@pytest.mark.slow
def test_predict_gives_the_same_fields_with_and_without_a_csv_header(conditioned, tmp_path):
    source = (conditioned / "new" / "parameters.csv").read_text().splitlines()
    (tmp_path / "plain.csv").write_text("\n".join(source[1:]) + "\n")
    with chdir(conditioned):
        assert main([f"--predict={conditioned / 'new' / 'parameters.csv'}", f"--out={tmp_path / 'a.npy'}"]) == 0
        assert main([f"--predict={tmp_path / 'plain.csv'}", f"--out={tmp_path / 'b.npy'}"]) == 0
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


@pytest.mark.slow
def test_predict_refuses_a_csv_with_the_wrong_columns_and_keeps_the_output_free(conditioned, tmp_path, capsys):
    (tmp_path / "three.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "swapped.csv").write_text("phase,amplitude\n1,2\n")
    with chdir(conditioned):
        assert main([f"--predict={tmp_path / 'three.csv'}", f"--out={tmp_path / 'o.npy'}"]) == 2
        assert "three.csv: has 3 columns but the conditioner was trained on 2 parameters" in capsys.readouterr().err
        assert main([f"--predict={tmp_path / 'swapped.csv'}", f"--out={tmp_path / 'o.npy'}"]) == 2
        assert "trained on amplitude, phase" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_a_single_network_whose_draws_do_not_move_refuses_samples_and_suggest_in_one_line(conditioned, tmp_path,
                                                                                          capsys):
    """On this rank-2 family the VAE keeps its POD start, whose levels' POD modes are empty: the decoder prior's
    spread, the MLP's only one, moves no value. The run says so, and --samples and --suggest are refused rather than
    given an error bar of zero."""
    facts = torch.load(conditioned / "model_save" / "latent_conditioner", weights_only=True)
    assert facts["calibration"]["no_spread"] and facts["calibration"]["source"] == "decoder"
    with chdir(conditioned):
        for flags in ([f"--predict={conditioned / 'new' / 'parameters.csv'}", f"--out={tmp_path / 'p.npy'}",
                       "--samples=4"], ["--suggest=2", f"--out={tmp_path / 'next.csv'}"]):
            assert main(flags) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and "latent_conditioner: has no uncertainty" in error
            assert "lc_ensemble 5" in error
    assert not list(tmp_path.iterdir())
    assert "no uncertainty" in json.loads((conditioned / "output" / "evaluation.json").read_text())[
        "uncertainty"]["note"]


@pytest.mark.slow
def test_samples_are_written_with_their_mean_and_std_and_are_repeatable(copy_of, tmp_path):
    """With a spread to draw from: the conditioner retrained as an ensemble of 2 MLPs on the same VAE."""
    condition = copy_of / "input_data" / "condition.txt"
    condition.write_text(condition.read_text() + "lc_ensemble 2\n")
    source = copy_of / "new" / "parameters.csv"
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 0
        assert main([f"--predict={source}", f"--out={tmp_path / 'p.npy'}", "--samples=4"]) == 0
        assert main([f"--predict={source}", f"--out={tmp_path / 'q.npy'}", "--samples=4"]) == 0
    samples = np.load(tmp_path / "p_samples.npy")
    assert samples.shape == (N_NEW, 4, 6, 20)
    assert np.allclose(np.load(tmp_path / "p_mean.npy"), samples.mean(axis=1), atol=1e-5)
    prediction = np.load(tmp_path / "p.npy")  # OUT_std: the draws' root mean square deviation from the prediction
    assert np.allclose(np.load(tmp_path / "p_std.npy"), np.sqrt(np.mean((samples - prediction[:, None]) ** 2, axis=1)),
                       atol=1e-4)
    assert np.load(tmp_path / "p_std.npy").max() > 0  # the members' disagreement is really drawn
    spread = json.loads((tmp_path / "p_report.json").read_text())["designs"]
    assert [round(row["predicted_relative_std"], 6) for row in spread] == [
        round(float(np.linalg.norm(std) / np.linalg.norm(field)), 6)
        for std, field in zip(np.load(tmp_path / "p_std.npy"), prediction)]
    # the draws are centred on the prediction: the mean of 4 unbiased draws lies about half their rms deviation from
    # it (a bias would bring it near the whole deviation)
    off_centre = np.linalg.norm(np.load(tmp_path / "p_mean.npy") - prediction)
    assert off_centre < 0.75 * np.linalg.norm(np.load(tmp_path / "p_std.npy"))
    assert np.array_equal(samples, np.load(tmp_path / "q_samples.npy"))
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_samples_need_predict_and_predict_never_overwrites(conditioned, tmp_path, capsys):
    (tmp_path / "taken_mean.npy").write_bytes(b"keep")
    with chdir(conditioned):
        assert main(["--samples=3"]) == 2
        assert "--samples=3 needs --predict" in capsys.readouterr().err
        assert main([f"--predict={conditioned / 'new' / 'parameters.csv'}", f"--out={tmp_path / 'taken.npy'}",
                     "--samples=2"]) == 2
        assert main([f"--predict={conditioned / 'new' / 'parameters.csv'}", "--lc_only=1",
                     f"--out={tmp_path / 'x.npy'}"]) == 2
    assert (tmp_path / "taken_mean.npy").read_bytes() == b"keep" and not (tmp_path / "taken.npy").exists()


@pytest.mark.slow
def test_predict_refuses_a_conditioner_whose_vae_has_changed(copy_of, tmp_path, capsys):
    vae = copy_of / "model_save" / "SimulGen-VAE"
    payload = torch.load(vae, weights_only=True)
    payload["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, vae)
    with chdir(copy_of):
        assert main([f"--predict={copy_of / 'new' / 'parameters.csv'}", f"--out={tmp_path / 'o.npy'}"]) == 2
    assert "has changed since" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_leaves_out_a_conditioner_whose_vae_has_changed_and_says_why(copy_of, capsys):
    """Its conditions are read with the current config, not the stale conditioner's: without input_type there is no
    prediction section; with it, the section says why the conditioner is not scored."""
    vae = copy_of / "model_save" / "SimulGen-VAE"
    torch.save({**torch.load(vae, weights_only=True), "run_id": "another VAE"}, vae)  # other bytes, still loadable
    condition = copy_of / "input_data" / "condition.txt"
    csv_block = condition.read_text()
    condition.write_text(csv_block.split("input_type")[0])
    with chdir(copy_of):
        assert main(["--evaluate"]) == 0
        assert json.loads((copy_of / "output" / "evaluation.json").read_text())["prediction"] is None
        condition.write_text(csv_block)
        assert main(["--evaluate"]) == 0
    prediction = json.loads((copy_of / "output" / "evaluation.json").read_text())["prediction"]
    assert "conditioner" not in prediction and "pod_gpr" in prediction
    assert "is not evaluated: was trained with the VAE model_save/SimulGen-VAE, which has changed since" in \
        prediction["note"]


# ------------------------------------------------------------------------------------------------------ --lc_only
def test_lc_only_without_a_saved_vae_says_so_and_changes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path, n=N_DESIGNS)
    write_conditions(tmp_path, design_parameters(N_DESIGNS, seed=3))
    set_conditioner(tmp_path, "csv", "input_data/parameters.csv")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["--lc_only=1"]) == 2
    assert "model_save/SimulGen-VAE: model file not found" in capsys.readouterr().err
    assert (tmp_path / LOCK_FILE).read_text() == ""  # the case folder's lock, taken and let go
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != LOCK_FILE.name) == before


@pytest.mark.slow
def test_lc_only_trains_a_new_conditioner_and_leaves_the_vae_files_alone(copy_of):
    before = {name: digest(copy_of / name) for name in VAE_FILES}
    first_conditioner = digest(copy_of / "model_save" / "latent_conditioner")
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 0
    assert {name: digest(copy_of / name) for name in VAE_FILES} == before
    archived = list((copy_of / "archive").glob("*/model_save/latent_conditioner"))
    assert len(archived) == 1 and digest(archived[0]) == first_conditioner
    assert not list((copy_of / "archive").glob("*/model_save/SimulGen-VAE"))
    assert report(copy_of)["input_type"] == "csv"
    # a run of its own, recorded as a conditioner on the VAE of the first run, with the evaluation redone
    first, second = (json.loads(path.read_text()) for path in sorted((copy_of / "runs").glob("*/run.json")))
    assert first["kind"] == "vae+conditioner" and second["kind"] == "conditioner" and second["vae_run"] == first["id"]
    assert second["status"] == "finished" and "vae_epochs" not in second["results"]
    assert second["results"]["prediction_val_error"] == pytest.approx(report(copy_of)["conditioner_val"])
    assert len(list((copy_of / "archive").glob("*/output/evaluation.json"))) == 1
    assert (copy_of / "runs" / second["id"] / "evaluation.json").read_text() == \
        (copy_of / "output" / "evaluation.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("input_type, rgb", [("image", False), ("image", True), ("image_vit", False)])
def test_image_conditioners_train_with_lc_only_and_predict_from_a_folder_or_one_file(copy_of, tmp_path, input_type,
                                                                                       rgb):
    parameters = design_parameters(N_DESIGNS + N_NEW, seed=3)
    if rgb:
        write_conditions(copy_of, parameters[:N_DESIGNS], rgb=True)
        write_conditions(copy_of, parameters[N_DESIGNS:], images="new/images", csv="new/parameters.csv", rgb=True)
    set_conditioner(copy_of, input_type, "images")
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 0
        saved = torch.load("model_save/latent_conditioner", weights_only=True)
        assert saved["channels"] == (3 if rgb else 1) and saved["spec"]["kind"] == {"image": "cnn"}.get(input_type,
                                                                                                         "vit")
        assert main([f"--predict={copy_of / 'new' / 'images'}", f"--out={tmp_path / 'all.npy'}"]) == 0
        assert main([f"--predict={copy_of / 'new' / 'images' / 'design_002.png'}",
                     f"--out={tmp_path / 'one.npy'}"]) == 0
    result = report(copy_of)
    assert result["input_type"] == input_type
    assert result["baselines"]["pod_gpr"] is None and result["baselines"]["pod_rbf"] is None
    assert result["conditioner_val"] < result["baselines"]["mean_field"]
    everything, single = np.load(tmp_path / "all.npy"), np.load(tmp_path / "one.npy")
    assert everything.shape == (N_NEW, 6, 20) and np.allclose(single[0], everything[1], atol=1e-5)
    # the out-of-range check in the network's image features: a training image is inside, pixel noise is not
    train = json.loads((copy_of / "model_save" / "split.json").read_text())["train"]
    (tmp_path / "check").mkdir()
    shutil.copy(copy_of / "images" / f"design_{train[0] + 1:03d}.png", tmp_path / "check" / "a_training.png")
    noise = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3) if rgb else (16, 16), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "check" / "b_noise.png")  # nothing like a design
    with chdir(copy_of):
        assert main([f"--predict={tmp_path / 'check'}", f"--out={tmp_path / 'check.npy'}"]) == 0
    placed = json.loads((tmp_path / "check_report.json").read_text())["designs"]
    assert [(row["design"], row["outside"]) for row in placed] == [("a_training.png", False), ("b_noise.png", True)]
    assert all(values["nearest_training_design"] == train[0] for values in placed[0]["spaces"].values())
    assert placed[1]["spaces"]["pixels"]["distance_ratio"] > 2


@pytest.mark.parametrize("change, message", [
    (lambda folder: (folder / "images" / "design_005.png").unlink(), "design_005.png is missing"),
    (lambda folder: shutil.copy(folder / "images" / "design_001.png", folder / "images" / "design_025.png"),
     "design_025.png"),
])
@pytest.mark.slow
def test_a_wrong_image_count_stops_before_anything_moves(copy_of, capsys, change, message):
    change(copy_of)
    set_conditioner(copy_of, "image", "images")
    before = digest(copy_of / "model_save" / "latent_conditioner")
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 2
        assert main([]) == 2  # a full run checks the images before archiving the VAE too
    error = capsys.readouterr().err
    assert message in error and "images" in error
    assert digest(copy_of / "model_save" / "latent_conditioner") == before and not (copy_of / "archive").exists()


# --------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_training_runs_through_the_frozen_decoder(copy_of):
    before = {name: digest(copy_of / name) for name in VAE_FILES}
    set_conditioner(copy_of, "csv", "input_data/parameters.csv", "use_e2e_training 1\ne2e_loss_function Huber\n"
                    "use_latent_regularization 1\nlatent_reg_weight 0.01\nlatent_gp 0\nlatent_rbf 0\n")  # the network
    # is kept
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 0
    assert {name: digest(copy_of / name) for name in VAE_FILES} == before
    result = report(copy_of)
    assert result["end_to_end"] and result["conditioner_val"] < 0.5 * result["baselines"]["mean_field"]
    header = (copy_of / "output" / "conditioner_metrics.csv").read_text().splitlines()
    assert "val/field_loss" in header[0] and float(header[1].split(",")[header[0].split(",").index("val/field_loss")])


@pytest.mark.slow
def test_end_to_end_gradient_reaches_the_conditioner_only_through_the_decoder(conditioned):
    """With the latent term off, the loss depends on the conditioner only through the decoded field: a detached
    decoder path would leave the conditioner without gradient (and backward() would fail)."""
    from modules.config import load_config
    from modules.data.conditions import read_conditions
    from modules.machine.device import Runtime
    from modules.models.conditioners import build_conditioner
    from modules.training.conditioner_training import conditioner_loss, conditioner_spec, prepare_conditioner_case
    with chdir(conditioned):
        config = load_config(1)
        config = type(config).from_dict({**config.to_dict(), "use_e2e_training": 1, "use_latent_regularization": 0})
        runtime = Runtime(torch.device("cpu"))
        case = prepare_conditioner_case(config, runtime, read_conditions(config), "model_save/SimulGen-VAE")
    model = build_conditioner(conditioner_spec(config, case))
    designs = torch.as_tensor(case.fields.train_indices[:4])
    fields = next(case.fields.train.batches([np.arange(4)]))
    loss, (latent_mse, field_loss) = conditioner_loss(model, case, case.conditions[designs], designs, fields, config,
                                                      runtime)
    assert loss.item() == pytest.approx(field_loss.item()) and loss.item() != pytest.approx(latent_mse.item())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in case.vae.parameters())  # frozen: nothing flows into the VAE


@pytest.mark.slow
def test_e2e_vae_model_path_is_for_lc_only_and_is_the_vae_trained_through(copy_of, capsys):
    set_conditioner(copy_of, "csv", "input_data/parameters.csv", "use_e2e_training 1\n"
                    "e2e_vae_model_path elsewhere/SimulGen-VAE\n")
    with chdir(copy_of):
        assert main([]) == 2
        assert "a full run trains through the VAE it has just trained (model_save/SimulGen-VAE)" in \
            capsys.readouterr().err
        assert main(["--lc_only=1"]) == 2
        assert "elsewhere/SimulGen-VAE: model file not found" in capsys.readouterr().err
        shutil.copytree("model_save", "elsewhere")
        (copy_of / "model_save" / "SimulGen-VAE").unlink()  # proves the run reads the other VAE
        assert main(["--lc_only=1"]) == 0
        assert torch.load("model_save/latent_conditioner", weights_only=True)["vae_file"] == "elsewhere/SimulGen-VAE"


@pytest.mark.slow
def test_a_full_run_accepts_e2e_vae_model_path_naming_the_vae_it_writes(copy_of):
    """The original SimulGenVAE's condition.txt ships e2e_vae_model_path model_save/SimulGen-VAE."""
    set_conditioner(copy_of, "csv", "input_data/parameters.csv", "use_e2e_training 1\nlatent_gp 0\nlatent_rbf 0\n"
                    "e2e_vae_model_path model_save/SimulGen-VAE\n")
    with chdir(copy_of):
        assert main([]) == 0
    assert torch.load(copy_of / "model_save" / "latent_conditioner", weights_only=True)["vae_file"] == \
        "model_save/SimulGen-VAE"


@pytest.mark.slow
def test_a_conditioner_whose_validation_loss_is_never_finite_is_not_kept(copy_of, monkeypatch, capsys):
    from modules.training.conditioner_training import ConditionerTraining
    monkeypatch.setattr(ConditionerTraining, "validate", lambda self: {"loss": float("nan"), "latent_mse": float("nan"),
                                                                       "field_loss": 0.0})
    set_conditioner(copy_of, "csv", "input_data/parameters.csv", "lc_patience 0\n")
    with chdir(copy_of):
        assert main(["--lc_only=1"]) == 2
    assert "conditioner training is unstable in epoch 1: the validation loss is nan, after 3 restore(s)" in \
        capsys.readouterr().err
    assert not (copy_of / "model_save" / "latent_conditioner").exists()
    assert len(list((copy_of / "archive").glob("*/model_save/latent_conditioner"))) == 1  # the earlier one is kept


@pytest.mark.slow
def test_a_full_run_reads_the_data_once_per_pass_for_all_its_reports(copy_of, monkeypatch):
    """The reconstruction report, the prediction report and the evaluation are views of one evaluation: the design
    Gram matrix, the encoding of every design, the baselines' streamed pass, the memorization check and the
    conditioner's pass over the validation designs are each made once."""
    import collections

    import modules.evaluation.evaluation as evaluation
    calls = collections.Counter()
    for name in ("design_gram", "make_batches", "score_combinations", "memorization_check"):
        original = getattr(evaluation, name)
        monkeypatch.setattr(evaluation, name, lambda *args, name=name, original=original, **kwargs:
                            calls.update([name]) or original(*args, **kwargs))
    predicted, predict = [], evaluation.Evaluation.predict
    monkeypatch.setattr(evaluation.Evaluation, "predict",
                        lambda self, designs: predicted.extend(int(d) for d in designs) or predict(self, designs))
    with chdir(copy_of):
        assert main(["--plot=2"]) == 0
    assert calls == {"design_gram": 1, "make_batches": 1, "score_combinations": 1, "memorization_check": 1}
    val = json.loads((copy_of / "model_save" / "split.json").read_text())["val"]
    assert sorted(predicted) == sorted(val)  # each validation design once
    assert report(copy_of)["baselines"]["mean_field"] == pytest.approx(
        json.loads((copy_of / "output" / "reconstruction_error.json").read_text())["pod_val"]["0"])


@pytest.mark.slow
@pytest.mark.parametrize("input_type", ["csv", "image_vit"])
def test_the_speed_options_apply_to_end_to_end_conditioner_training(copy_of, monkeypatch, capsys, input_type):
    """bf16 autocast, gradient checkpointing (of the conditioner and of the frozen decoder it trains through) and
    accumulation over 2 batches: the conditioner trains and still beats the mean field."""
    from modules.models import grad_checkpointing as recompute
    from modules.models.vae import Decoder, HierarchicalVAE

    # as with a VAE whose trained network was kept: its decoder runs in every step (at the kept POD start it adds
    # exactly zero and is skipped, test_pod_path)
    monkeypatch.setattr(HierarchicalVAE, "residual_is_zero", lambda self: False)
    checkpointed = set()
    real_checkpoint = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda block, *args, **kwargs: checkpointed.add(
        type(getattr(block, "__self__", block)).__name__) or real_checkpoint(block, *args, **kwargs))
    set_conditioner(copy_of, input_type, "input_data/parameters.csv" if input_type == "csv" else "images",
                    "use_e2e_training 1\n" + ("latent_gp 0\nlatent_rbf 0\n" if input_type == "csv" else ""))
    # the network is kept
    with chdir(copy_of):
        assert main(["--lc_only=1", "--amp=bf16", "--grad_checkpointing", "--grad_accum_steps=2"]) == 0
    assert "precision bf16" in capsys.readouterr().out
    block = {"csv": "MLPBlock", "image_vit": "TransformerBlock"}[input_type]
    assert block in checkpointed and "DecoderLevel" in checkpointed and Decoder.__name__ not in checkpointed
    result = report(copy_of)
    assert result["end_to_end"] and result["conditioner_val"] < result["baselines"]["mean_field"]
