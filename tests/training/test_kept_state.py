"""Which VAE state a run keeps (training.loop, training.vae_training): the one that reconstructs the validation designs
best by the report's measure, never a state whose lower loss (KL included) hides a worse reconstruction; a network
that has not beaten its starting state after start_patience epochs stops there; and the kept state is never worse
than POD at the same latent size on a near-linear family, where POD is exact to rounding."""
import json
import signal
import sys
from contextlib import chdir

import numpy as np
import pytest
import torch

from conftest import REPO, evaluation_report, metrics, said, stop_at_step, write_case
from modules.cli import main
from modules.training import vae_training

sys.path.insert(0, str(REPO / "bench"))
from cases import beam_fields, beam_parameters  # noqa: E402


REAL_VALIDATE = vae_training.VAETraining.validate
# float32 rounding of fields scaled to [-0.7, 0.7], through the POD path's two projections (node basis summed in
# float64, design modes): where POD itself is exact to the data's own rounding, the VAE's start is within this of it
FLOAT32_FLOOR = 1e-6


def scripted_validation(monkeypatch, scores):
    """VAETraining.validate as it is, but with recon_relative_l2 taken from scores in turn (the starting state's
    first) and a loss that falls at every call, so that the loss alone would keep the last epoch."""
    real, calls = REAL_VALIDATE, []

    def validate(self):
        stats = real(self)
        calls.append(1)
        return {**stats, "recon_relative_l2": scores[len(calls) - 1], "loss": stats["loss"] - 1e3 * len(calls)}

    monkeypatch.setattr(vae_training.VAETraining, "validate", validate)


def with_start_patience(folder, value: str):
    """The test case's condition.txt with start_patience value instead of the 0 the tests' cases give it."""
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("start_patience 0\n", f"start_patience {value}\n"))


def progress_of(path):
    return torch.load(path, weights_only=True)["training"]["progress"]


def test_the_vae_kept_is_the_state_that_reconstructs_best_whatever_the_loss(case, monkeypatch):
    write_case(case, epochs=5)
    scripted_validation(monkeypatch, [0.5, 0.9, 0.3, 0.6, 0.4, 0.35])  # epoch 2 reconstructs best
    with said() as lines:
        assert main([]) == 0
    best = progress_of("checkpoints/best.pt")
    assert (best["best_epoch"], best["best_score"], best["epoch"]) == (2, 0.3, 2)
    kept, saved_best = (torch.load(path, weights_only=True)["state_dict"]
                        for path in ("model_save/SimulGen-VAE", "checkpoints/best.pt"))
    assert all(torch.equal(kept[name], saved_best[name]) for name in kept)
    assert "Best validation reconstruction 30.0000% (mean relative L2 error): epoch 2; that VAE is kept" in lines
    assert [float(row["val/recon_relative_l2"]) for row in metrics(case)] == [0.9, 0.3, 0.6, 0.4, 0.35]


def test_the_start_is_kept_when_no_epoch_reconstructs_better_even_at_a_lower_loss(case, monkeypatch):
    write_case(case, epochs=3)
    scripted_validation(monkeypatch, [0.5, 0.5, 0.6, 0.7])  # a tie with the start is broken by the lower loss
    assert main([]) == 0
    assert progress_of("checkpoints/best.pt")["best_epoch"] == 1
    scripted_validation(monkeypatch, [0.5, 0.51, 0.6, 0.7])
    assert main([]) == 0
    assert progress_of("checkpoints/best.pt")["best_epoch"] == 0


def test_start_patience_stops_a_vae_that_has_not_beaten_its_start(case, monkeypatch):
    write_case(case, epochs=10)
    with_start_patience(case, "3")
    scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.55, 0.1])
    with said() as lines:
        assert main([]) == 0
    assert len(metrics(case)) == 3 and progress_of("checkpoints/last.pt")["finished"]
    assert progress_of("checkpoints/best.pt")["best_epoch"] == 0
    assert ("Early stop of the VAE at epoch 3: no epoch has beaten its starting state on the validation designs "
            "(recon_relative_l2 0.5; start_patience 3)") in lines


def test_start_patience_auto_is_a_quarter_of_the_epochs_and_at_least_ten(tmp_path):
    from modules.config import load_config
    for epochs, expected in ((30, 10), (41, 10), (200, 50), (300, 75)):
        write_case(tmp_path, epochs=epochs)
        with_start_patience(tmp_path, "auto")
        with chdir(tmp_path):
            assert load_config(1).start_patience == expected


def test_start_patience_does_not_stop_a_vae_that_has_beaten_its_start(case, monkeypatch):
    write_case(case, epochs=5)
    with_start_patience(case, "2")
    scripted_validation(monkeypatch, [0.5, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert main([]) == 0
    assert len(metrics(case)) == 5 and progress_of("checkpoints/best.pt")["best_epoch"] == 2


def test_a_checkpoint_that_did_not_record_the_kept_state_s_score_resumes_to_the_same_run(tmp_path, monkeypatch):
    """A checkpoint written before the kept state was chosen by its reconstruction has no best_score: the resumed run
    scores the state saved as the best, and ends as the uninterrupted run does."""
    import modules.training.guard as guard

    runs = {}
    for name in ("uninterrupted", "resumed"):
        write_case(tmp_path / name, n=20, epochs=3)  # 4 optimiser steps per epoch
        with chdir(tmp_path / name):
            if name == "resumed":
                real = stop_at_step(monkeypatch, 6)
                assert main([]) == 128 + signal.SIGTERM
                monkeypatch.setattr(guard.Guard, "after_step", real)
                for path in ("checkpoints/last.pt", "checkpoints/best.pt"):
                    payload = torch.load(path, weights_only=True)
                    del payload["training"]["progress"]["best_score"]
                    torch.save(payload, path)
                assert main(["--resume"]) == 0
            else:
                assert main([]) == 0
            runs[name] = (progress_of("checkpoints/last.pt"),
                          torch.load("model_save/SimulGen-VAE", weights_only=True)["state_dict"])
    (uninterrupted, kept), (resumed, resumed_kept) = runs["uninterrupted"], runs["resumed"]
    assert (resumed["best_epoch"], resumed["best_score"]) == (uninterrupted["best_epoch"], uninterrupted["best_score"])
    assert all(torch.equal(kept[name], resumed_kept[name]) for name in kept)


def test_on_a_near_linear_family_the_kept_vae_and_conditioner_are_no_worse_than_the_baselines(tmp_path):
    """The bench's beam (POD exact to rounding at 16 modes), small: the VAE kept reconstructs the validation designs no
    worse than POD with as many modes, and the conditioner kept predicts them no worse than the best baseline printed
    beside it (POD + GPR, POD + RBF among them); the neural field, far behind a quarter of the way through its fit,
    is stopped there."""
    n, steps, nodes = 48, 6, 40
    parameters = beam_parameters(n, seed=1)
    write_case(tmp_path, n=n, t=steps, m=nodes, epochs=30, data=beam_fields(parameters, steps, nodes),
               extra="input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 40\n"
                     "field_conditioner_epochs 8\nnode_coordinates input_data/nodes.npy\n")
    np.save(tmp_path / "input_data" / "nodes.npy", np.stack([np.linspace(0, 1, nodes), np.zeros(nodes)], 1))
    np.savetxt(tmp_path / "input_data" / "parameters.csv", parameters, delimiter=",", header="P,q,M,EI,gamma",
               comments="")
    with_start_patience(tmp_path, "auto")  # the default: here 10 epochs, a quarter of 30 being less
    with chdir(tmp_path):
        assert main([]) == 0
    report = evaluation_report(tmp_path)
    reconstruction = {name: errors["relative_l2"]["mean"] for name, errors in report["reconstruction"].items()}
    prediction = {name: errors["relative_l2"]["mean"] for name, errors in report["prediction"].items()
                  if isinstance(errors, dict)}
    assert reconstruction["vae"] <= max(reconstruction["pod"] * 1.01, FLOAT32_FLOOR), reconstruction
    assert {"pod_gpr", "pod_rbf"} <= set(prediction)
    baselines = min(error for name, error in prediction.items() if name != "conditioner")
    assert prediction["conditioner"] <= baselines * 1.01, prediction
    choice = json.loads((tmp_path / "output" / "prediction_report.json").read_text())["conditioner_choice"]
    stopped = choice["neural_field_stopped"]
    assert (stopped["passes"], stopped["of"]) == (2, 8) and "neural_field" not in choice["validation_relative_l2"]
    assert stopped["validation_relative_l2"] > 10 * stopped["best_rival_validation_relative_l2"]
    assert stopped["best_rival_validation_relative_l2"] == min(choice["validation_relative_l2"].values())

    # the time each part took, and whether it is part of the surrogate kept
    spent = report["time_spent"]
    kept_epoch = progress_of(tmp_path / "checkpoints" / "best.pt")["best_epoch"]
    assert {part: values["kept"] for part, values in spent["parts"].items()} == {
        "POD start": True, "VAE network": kept_epoch > 0, "MLP": report["labels"]["conditioner"].endswith("(MLP)"),
        "GP on latents": report["labels"]["conditioner"].endswith("(GP on latents)"),
        "RBF on latents": report["labels"]["conditioner"].endswith("(RBF on latents)"), "neural field": False}
    assert spent["kept_s"] + spent["discarded_s"] == pytest.approx(sum(v["seconds"] for v in spent["parts"].values()),
                                                                   abs=0.01)
    assert all(values["seconds"] > 0 for values in spent["parts"].values())
    assert "## Time spent on the surrogate" in (tmp_path / "output" / "evaluation.md").read_text()
