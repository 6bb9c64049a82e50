"""End to end: a short training run on a tiny case writes a usable model, logs, plots and an honest report."""
import hashlib
import json
import subprocess
import sys
from contextlib import chdir

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, metrics, smooth_fields, tensorboard_dir, write_case
from modules.cli import main
from modules.storage.model_files import load_model
from modules.training import loop, vae_training

EPOCHS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny case trained for EPOCHS epochs with plots saved; shared by the read-only tests below."""
    folder = tmp_path_factory.mktemp("trained")
    data = write_case(folder, n=16, t=6, m=20, epochs=EPOCHS)
    with chdir(folder):
        assert main(["--plot=1"]) == 0
    return folder, data


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saved_model_loads_weights_only_with_config_and_scaler(trained):
    folder, _ = trained
    payload = torch.load(folder / "model_save" / "SimulGen-VAE", weights_only=True)
    assert {"spec", "config", "scaler", "state_dict"} <= set(payload)
    model, config, scaler = load_model(folder / "model_save" / "SimulGen-VAE")
    assert config.epochs == EPOCHS and config.n_designs == 16
    assert json.loads((folder / "model_save" / "scaler.json").read_text())["data_min"] == scaler.data_min.tolist()


def test_latents_are_written_for_every_design_and_decode_to_the_reconstruction(trained):
    folder, data = trained
    main_latents = np.load(folder / "model_save" / "latent_vectors.npy")
    level_latents = np.load(folder / "model_save" / "xs.npy")
    assert main_latents.shape == (16, 8) and level_latents.shape == (16, 2, 4)
    model, _, scaler = load_model(folder / "model_save" / "SimulGen-VAE")
    with torch.no_grad():
        decoded = model.decode(torch.from_numpy(main_latents), torch.from_numpy(level_latents))
        direct = model(torch.from_numpy(scaler.transform(data)), sample=False)["recon"]
    assert torch.allclose(decoded, direct, atol=1e-5)


def test_best_and_last_checkpoints_are_kept(trained):
    folder, _ = trained
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    last_progress, best_progress = last["training"]["progress"], best["training"]["progress"]
    assert last_progress["epoch"] == EPOCHS and last_progress["finished"] and 0 <= best_progress["epoch"] <= EPOCHS
    assert {"optimizer", "grad_scaler", "rng", "progress"} <= set(last["training"])
    # the state kept reconstructs the validation designs best: no epoch logged does better than it
    scores = [float(r["val/recon_relative_l2"]) for r in metrics(folder)]
    assert best_progress["best_score"] <= min(scores)
    if best_progress["epoch"]:
        assert best_progress["best_score"] == pytest.approx(scores[best_progress["epoch"] - 1], rel=1e-6)
    assert best_progress["best_epoch"] == best_progress["epoch"] == last_progress["best_epoch"]


def test_metrics_csv_has_a_row_per_epoch_with_losses_kl_terms_beta_and_lr(trained):
    folder, _ = trained
    rows = metrics(folder)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert {"train/loss", "train/recon", "train/kl_main", "train/kl_level0", "train/kl_level1", "val/recon", "beta",
            "lr"} <= set(rows[0])
    assert float(rows[0]["beta"]) == pytest.approx(1e-4) and float(rows[-1]["beta"]) == 1.0
    rates = [float(r["lr"]) for r in rows]  # the rate each epoch trained with: the cosine ends low, no restart spike
    assert rates[-1] < 0.05 * max(rates) and rates[0] < max(rates)


def test_tensorboard_event_files_hold_the_logged_scalars(trained):
    folder, _ = trained
    events = EventAccumulator(str(tensorboard_dir(folder)))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/kl_main", "train/kl_level0", "train/kl_level1", "val/loss", "beta", "lr"} <= tags
    assert len(events.Scalars("train/loss")) == EPOCHS
    assert events.Scalars("beta")[-1].value == pytest.approx(1.0)


def test_plots_are_real_pngs(trained):
    folder, _ = trained
    for name in ("loss_curves.png", "reconstruction_samples.png"):
        with Image.open(folder / "output" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_reconstruction_beats_the_mean_field_and_is_reported_next_to_pod(trained):
    folder, _ = trained
    report = json.loads((folder / "output" / "reconstruction_error.json").read_text())
    assert report["latent_numbers_per_design"] == 8 + 2 * 4
    assert set(report["pod_val"]) == {"0", "8", "16"}
    assert report["vae_val"] < 0.5 * report["pod_val"]["0"]


def test_reconstruct_writes_physical_units_matching_the_model(trained, tmp_path):
    folder, data = trained
    source, out = tmp_path / "new.npy", tmp_path / "recon.npy"
    np.save(source, data[:5])
    with chdir(folder):
        assert main([f"--reconstruct={source}", f"--out={out}"]) == 0
        model, _, scaler = load_model("model_save/SimulGen-VAE")
    written = np.load(out)
    with torch.no_grad():
        expected = scaler.inverse(model(torch.from_numpy(scaler.transform(data[:5])), sample=False)["recon"].numpy())
    assert written.shape == (5, 6, 20)
    assert np.allclose(written, expected, atol=1e-5)
    assert abs(written.mean() - data[:5].mean()) < 0.1  # physical units (the data sit around 3), not scaled


def test_reconstruct_refuses_to_overwrite_and_bad_shapes(trained, tmp_path, capsys):
    folder, data = trained
    source, out = tmp_path / "new.npy", tmp_path / "exists.npy"
    np.save(source, data[:2])
    out.write_bytes(b"keep me")
    with chdir(folder):
        assert main([f"--reconstruct={source}", f"--out={out}"]) == 2
        assert out.read_bytes() == b"keep me"
        np.save(tmp_path / "wrong.npy", np.zeros((2, 5, 20), np.float32))
        assert main([f"--reconstruct={tmp_path / 'wrong.npy'}", f"--out={tmp_path / 'o.npy'}"]) == 2
    assert "matches neither" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_reconstruct_without_a_trained_model_is_a_clear_error(case, capsys):
    np.save("new.npy", np.zeros((1, 6, 20), np.float32))
    assert main(["--reconstruct=new.npy", "--out=o.npy"]) == 2
    assert "model_save/SimulGen-VAE: model file not found" in capsys.readouterr().err


def test_a_new_run_archives_the_previous_results(case):
    assert main([]) == 0
    first_model = digest(case / "model_save" / "SimulGen-VAE")
    assert main([]) == 0
    archived = list((case / "archive").glob("*/model_save/SimulGen-VAE"))
    assert len(archived) == 1 and digest(archived[0]) == first_model
    assert (archived[0].parents[1] / "output" / "metrics.csv").exists()


def test_bad_data_changes_nothing_already_on_disk(case, capsys):
    assert main([]) == 0
    before = {p: digest(p) for p in case.rglob("*") if p.is_file() and "input_data" not in p.parts}
    data = np.load("input_data/dataset1.npy")
    data[3, 2, 5] = np.nan
    np.save("input_data/dataset1.npy", data)
    assert main([]) == 2
    assert "design (sample index) 3" in capsys.readouterr().err
    after = {p: digest(p) for p in case.rglob("*") if p.is_file() and "input_data" not in p.parts}
    assert after == before and not (case / "archive").exists()


def test_a_run_of_three_epochs_raises_the_kl_weight_and_the_learning_rate_step_by_step(case, monkeypatch):
    seen = []
    original_loss = vae_training.vae_loss

    def recording_loss(outputs, target, config, beta, noise_std):
        if torch.is_grad_enabled():  # a training step (validation uses beta 1, without gradients)
            seen.append(beta)
        return original_loss(outputs, target, config, beta, noise_std)

    rates = []
    original_rate = loop.set_learning_rate
    monkeypatch.setattr(vae_training, "vae_loss", recording_loss)
    monkeypatch.setattr(loop, "set_learning_rate", lambda optimizer, lr: rates.append(lr) or original_rate(
        optimizer, lr))
    write_case(case, epochs=3)  # 9 training designs in batches of 4: 3 optimiser steps an epoch
    assert main([]) == 0
    betas = seen
    assert len(betas) == 9 and betas == sorted(betas) and betas[-1] == 1.0
    assert len(set(betas)) >= 6  # it moves inside epochs, not once an epoch
    assert max(later - earlier for earlier, later in zip(betas, betas[1:])) < 0.4  # once an epoch: 0.82 in one go
    assert len(set(rates)) > 3


def test_same_seed_same_run_and_another_seed_another_run(tmp_path):
    losses = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_case(tmp_path / name, epochs=3, extra=f"seed {seed}\n")
        with chdir(tmp_path / name):
            assert main([]) == 0
            losses.append([r["train/loss"] for r in metrics(tmp_path / name)])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_streamed_and_preloaded_data_train_identically(tmp_path):
    runs = []
    for load_all in (0, 1):
        write_case(tmp_path / str(load_all), epochs=3)
        with chdir(tmp_path / str(load_all)):
            assert main([f"--load_all={load_all}"]) == 0
            runs.append([(r["train/loss"], r["val/loss"]) for r in metrics(tmp_path / str(load_all))])
    assert runs[0] == runs[1]


def test_hdf5_case_trains_end_to_end(tmp_path):
    write_case(tmp_path, epochs=2, fmt="h5")
    with chdir(tmp_path):
        assert main([]) == 0
    assert np.load(tmp_path / "model_save" / "latent_vectors.npy").shape == (12, 8)


def test_init_beta_divisor_sets_the_first_kl_weight(tmp_path):
    write_case(tmp_path, epochs=2)
    preset = (tmp_path / "preset.txt").read_text().splitlines()
    preset[2] = "2"
    (tmp_path / "preset.txt").write_text("\n".join(preset) + "\n")
    with chdir(tmp_path):
        assert main([]) == 0
    assert float(metrics(tmp_path)[0]["beta"]) == pytest.approx(1e-6)


@pytest.mark.parametrize("extra", ["Loss_type 2\nRecon_iter 2\n", "Loss_type 3\n", "Loss_type 4\n",
                                   "augment_noise_std 0.01\naugment_amplitude 0.1\naugment_mixup_prob 0.5\n",
                                   "Dim2_red 4\nDim3_start 2\nDim3_end 18\nnum_var 2\n"])
def test_options_train_for_one_epoch(tmp_path, extra):
    write_case(tmp_path, epochs=1, extra=extra)
    with chdir(tmp_path):
        assert main([]) == 0
    model, config, _ = load_model(tmp_path / "model_save" / "SimulGen-VAE")
    assert model.spec.n_steps == config.n_steps_used and model.spec.n_nodes == config.n_nodes_used


def test_size_large_is_deeper_than_small(tmp_path):
    sizes = {}
    for size in ("small", "large"):
        write_case(tmp_path / size, epochs=1)
        with chdir(tmp_path / size):
            assert main([f"--size={size}"]) == 0
        model, _, _ = load_model(tmp_path / size / "model_save" / "SimulGen-VAE")
        sizes[size] = (model.spec.blocks_per_level, sum(p.numel() for p in model.parameters()))
    assert sizes["small"][0] == 1 and sizes["large"][0] == 2 and sizes["large"][1] > sizes["small"][1]


@pytest.mark.slow
def test_plot_0_on_a_headless_machine_saves_and_does_not_block(case, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["--plot=0"]) == 0
    assert "only saved" in capsys.readouterr().out
    assert (case / "output" / "loss_curves.png").exists()


@pytest.mark.slow
def test_quiet_prints_only_warnings_and_writes_every_file(case, capsys):
    (case / "input_data" / "condition.txt").write_text((case / "input_data" / "condition.txt").read_text()
                                                       + "zzzqqq 1\n")  # an unknown key: a warning
    assert main(["--quiet", "--plot=1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "warning: unknown key 'zzzqqq' is ignored" in captured.err
    assert (case / "model_save" / "SimulGen-VAE").exists() and (case / "output" / "evaluation.json").exists()
    assert (case / "output" / "loss_curves.png").exists()
    assert main(["--plot=2"]) == 0  # and the next command speaks again
    assert "Best validation reconstruction" in capsys.readouterr().out


def test_plot_2_makes_no_pngs(case):
    assert main(["--plot=2"]) == 0
    assert not list((case / "output").glob("*.png"))


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "-h"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--preset", "--plot", "--size", "--load_all", "--device", "--reconstruct", "--out"):
        assert flag in result.stdout


@pytest.mark.slow
def test_the_script_runs_from_a_case_folder_outside_the_checkout(tmp_path):
    write_case(tmp_path, epochs=1, data=smooth_fields(12, 6, 20, seed=4))
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--plot=1"], cwd=tmp_path,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model_save" / "SimulGen-VAE").exists() and (tmp_path / "output" / "loss_curves.png").exists()
    assert "POD rank" in result.stdout


def test_a_bad_flag_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--plot=5"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: command line: argument --plot")


@pytest.mark.parametrize("flags, words", [(["--reconstruct=a.npy", "--out=b.npy", "--size=large"], "--size"),
                                          (["--reconstruct=a.npy", "--out=b.npy", "--use_ddp"], "--use_ddp"),
                                          (["--out=b.npy"], "--out")])
def test_flags_the_chosen_mode_would_not_use_are_refused(case, capsys, flags, words):
    assert main(flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: command line:") and words in error
    assert not (case / "model_save").exists() and not (case / "b.npy").exists()
