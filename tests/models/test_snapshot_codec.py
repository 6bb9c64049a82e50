"""The snapshot codec (field_codec_epochs): where the nodes' positions are known, a codec of each time step to a few
numbers is trained before the VAE, and the VAE runs on its codes when they reconstruct the validation designs better
than POD at the VAE's latent size. What it promises: the VAE still takes and gives fields; it starts from exactly
the reconstruction that was compared; a codec that loses is dropped and changes nothing; the codec stays frozen while
the VAE trains; a model on codes is saved, reloaded, reported, resumed and exported like any other."""
import json
import re
from contextlib import chdir
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import (NETWORK_ALONE, Died, column, die_on_call, one_and_two_processes, said, stop_at_step,
                      write_case)
from modules.cli import main
from modules.config import load_config
from modules.data.case import prepare_case
from modules.machine.device import Runtime
from modules.models.neural_field import WARP
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.storage.model_files import load_model
from modules.training import vae_training
from modules.training.loop import Step
from modules.training.codec_choice import CANDIDATES
from modules.training.vae_training import build_model

SIDE, STEPS, DESIGNS = 10, 6, 32


def travelling_pulse(n=DESIGNS, seed=0):
    """[n, STEPS, SIDE * SIDE] float32: a Gaussian pulse that starts at (x0, y0) and moves in a straight line (angle,
    speed per design) over a SIDE x SIDE grid (row-major, as grid_shape reads it); and the parameters [n, 4]."""
    rng = np.random.default_rng(seed)
    x0, y0, angle, speed = (rng.uniform(0.3, 0.7, n), rng.uniform(0.3, 0.7, n), rng.uniform(0, 2 * np.pi, n),
                            rng.uniform(0.2, 0.4, n))
    rows, columns = np.meshgrid(np.linspace(0, 1, SIDE), np.linspace(0, 1, SIDE), indexing="ij")
    time = np.linspace(0, 1, STEPS)[None, :, None]
    centre_x = (x0[:, None] + speed[:, None] * np.cos(angle)[:, None] * time[..., 0])[..., None]
    centre_y = (y0[:, None] + speed[:, None] * np.sin(angle)[:, None] * time[..., 0])[..., None]
    distance = (columns.ravel() - centre_x) ** 2 + (rows.ravel() - centre_y) ** 2
    fields = np.exp(-distance / (2 * 0.08 ** 2)) + 0.5
    return fields.astype(np.float32), np.stack([x0, y0, angle, speed], axis=1)


def pulse_case(folder, epochs=2, extra="", codec_epochs=150):
    fields, parameters = travelling_pulse()
    write_case(folder, n=DESIGNS, t=STEPS, m=SIDE * SIDE, epochs=epochs, data=fields,
               extra=f"grid_shape {SIDE} {SIDE}\nfield_codec_epochs {codec_epochs}\n" + extra)
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("alpha 1e4", "alpha auto"))  # the default likelihood
    return parameters


def write_parameters(folder, parameters):
    np.savetxt(folder / "input_data" / "parameters.csv", parameters, delimiter=",", header="x0,y0,angle,speed",
               comments="", fmt="%.17g")


def prepared(folder):
    with chdir(folder):
        config = load_config(1)
        return config, prepare_case(config, Runtime(torch.device("cpu")))


def scaled(case, designs):
    return torch.from_numpy(case.scaler.transform(case.array.read(designs)))


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """The pulse case and the model build_model starts it with, what it said, its config and case."""
    folder = tmp_path_factory.mktemp("pulse")
    pulse_case(folder)
    config, case = prepared(folder)
    with chdir(folder), said() as lines:
        model = build_model(config, case, Runtime(torch.device("cpu"))).eval()
    return model, lines, config, case


@pytest.mark.slow
def test_on_a_travelling_pulse_the_vae_runs_on_codes_and_starts_from_what_was_compared(pulse):
    model, said, config, case = pulse
    choice = [line for line in said if line.startswith("The validation designs from")]
    assert len(choice) == 1 and choice[0].endswith("the VAE runs on the codec's codes"), said
    codec_error, pod_error = (float(number) for number in re.search(
        r"mean squared error (\S+) \(scaled units\) through the snapshot codec against (\S+) for POD with 16 modes",
        choice[0]).groups())
    assert codec_error < pod_error
    # the codec is the race's winner: the least error a quarter of the way through
    race = next(line for line in said if line.startswith("The snapshot codec after 38 of 150 passes"))
    errors = [float(error) for error in re.search(r"mean squared error (\S+) / (\S+) / (\S+) / (\S+) against",
                                                  race).groups()]
    code, modulation = CANDIDATES[int(np.argmin(errors))]
    assert race.endswith(f"going on with codes {code} {modulation}")
    assert model.codec is not None and (model.spec.codec, model.spec.codec_modulation) == (code, modulation)
    val = scaled(case, case.val_indices)
    with torch.no_grad():
        out = model(val, sample=False)
        codes = model(val, sample=False, decode=False)["recon"]
    assert out["recon"].shape == val.shape and codes.shape == (len(val), STEPS, code)
    # every node is compared on this small mesh: the starting VAE's error is exactly the codec's that was said
    assert float(((out["recon"] - val) ** 2).mean()) == pytest.approx(codec_error, rel=1e-3)
    # and the starting state is the codec through the codes' design POD: the codes' posterior means decode to it
    assert torch.allclose(model.decode(out["main_mean"], out["level_latents"]), out["recon"], atol=1e-5)
    assert torch.allclose(model.codec.decode(codes), out["recon"], atol=1e-6)


@pytest.mark.slow
def test_the_codes_are_standardised_on_the_training_designs(pulse):
    model, _, _, case = pulse
    with torch.no_grad():
        codes = model.encode_data(scaled(case, case.train_indices)).flatten(0, 1)
    assert torch.allclose(codes.mean(0), torch.zeros(model.spec.codec), atol=1e-4)
    assert torch.allclose(codes.std(0), torch.ones(model.spec.codec), atol=1e-4)


@pytest.mark.slow
def test_training_on_codes_takes_its_loss_on_codes_and_never_moves_the_codec(pulse, tmp_path):
    model, _, config, case = pulse
    runtime = Runtime(torch.device("cpu"))
    codec_before = {name: value.clone() for name, value in model.codec.state_dict().items()}
    model = HierarchicalVAE(model.spec)
    model.load_state_dict(pulse[0].state_dict())
    job = vae_training.VAETraining(model, case, config, runtime)
    assert job.n_parts == 3 + config.n_levels + 1  # one likelihood scale: the codes'
    batch = next(job.training_batches(0, [(np.arange(4), 1.0)]))
    step_loss, parts = job.batch_loss(model, batch, Step(0, 1, 0.0, torch.Generator()))
    # nats per code value
    assert step_loss.detach().item() == pytest.approx(float(parts[0]) / (STEPS * model.spec.codec), rel=1e-6)
    assert all(not weight.requires_grad for weight in model.codec.parameters())
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step_loss.backward()
    optimiser.step()
    assert all(torch.equal(codec_before[name], value) for name, value in model.codec.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(model.decoder.parameters(), pulse[0].decoder.parameters()))


@pytest.mark.slow
def test_end_to_end_training_on_codes_compares_codes_and_never_decodes_the_nodes(pulse, monkeypatch):
    from types import SimpleNamespace

    import torch.nn.functional as F

    from modules.data.scaling import ColumnScaler
    from modules.models.latents import split_latents
    from modules.models.surrogate import Surrogate
    from modules.training.conditioner_training import conditioner_loss
    model, _, config, case = pulse
    fields = scaled(case, case.train_indices[:3])
    latents = torch.randn(3, config.latent_size, generator=torch.Generator().manual_seed(0))
    scaler = ColumnScaler(np.zeros(config.latent_size), np.full(config.latent_size, 0.5))
    conditioner_case = SimpleNamespace(vae=model, targets=latents,
                                       decoder=Surrogate(model, case.scaler, latent_scaler=scaler))
    settings = SimpleNamespace(lc_ensemble=1, use_e2e_training=1, e2e_loss_function="MSE", huber_delta=1.0,
                               use_latent_regularization=0)
    monkeypatch.setattr(model.codec, "decode", lambda *args, **kwargs: pytest.fail("decoded every node"))
    loss, (latent_mse, e2e_loss) = conditioner_loss(lambda inputs: latents, conditioner_case, None,
                                                    torch.arange(3), fields, settings, Runtime(torch.device("cpu")))
    with torch.no_grad():
        codes = model.decode(*split_latents(latents * 0.5, model.spec), decode=False)
    assert codes.shape == (3, STEPS, model.spec.codec)
    assert float(loss.detach()) == float(e2e_loss) == pytest.approx(float(F.mse_loss(codes, model.encode_data(fields))))


# reads: the codecs whose codes each read of the designs gives (the race scores the first alone, then the others in
# one read; the codec that went on is compared with POD in one more)
@pytest.mark.parametrize("floor, margin, spread, said_first, said_last, passes, reads", [
    (None, None, None, "No snapshot codec: POD with 16 modes reconstructs the validation designs with a mean squared "
     "error", "the VAE runs on the fields", 0, []),
    (0.0, float("inf"), None, "The validation designs from 16 numbers each: mean squared error",
     "the fields (the codec is dropped)", 35, [1, 3, 1]),  # four codecs raced for 5 passes, the best 15 more, dropped
    (0.0, 1.0, float("inf"), "The snapshot codec after 5 of 20 passes, codes 4 warp / 8 warp / 16 warp / 8 shift: "
     "mean squared error", "more than 1 times worse, it is stopped and the VAE runs on the fields", 20, [1, 3]),
    (0.0, 1.0, None, "The snapshot codec after 5 of 20 passes, codes 4 warp / 8 warp / 16 warp / 8 shift: mean "
     "squared error", "/ not fitted / not fitted / not fitted against", 5, [1]),  # the first, hopeless, ends the race
], ids=["not-fitted-below-the-floor", "fitted-and-dropped", "stopped-as-losing", "stopped-after-the-first"])
def test_on_a_smooth_family_the_codec_is_not_kept_and_changes_nothing(tmp_path, monkeypatch, floor, margin, spread,
                                                                      said_first, said_last, passes, reads):
    """POD is exact on this family: below CODEC_FLOOR no codec is fitted at all; one fitted anyway loses to POD and
    is dropped, or, losing by more than LOSING_MARGIN a quarter of the way through its passes, is stopped there (and
    where the race's first codec loses by more than RACE_SPREAD times that, the others are not fitted). Either way the
    VAE starts as it does without a codec."""
    from modules.training import codec_choice, field_fitter
    if floor is not None:
        monkeypatch.setattr(codec_choice, "CODEC_FLOOR", floor)
    if margin is not None:
        monkeypatch.setattr(codec_choice, "LOSING_MARGIN", margin)
    if spread is not None:
        monkeypatch.setattr(codec_choice, "RACE_SPREAD", spread)
    made, real = [], field_fitter.sampled_pass
    monkeypatch.setattr(field_fitter, "sampled_pass", lambda *args, **kwargs: made.append(1) or real(*args, **kwargs))
    read, real_read = [], codec_choice.encoded_designs
    monkeypatch.setattr(codec_choice, "encoded_designs",
                        lambda codecs, *args: read.append(len(codecs)) or real_read(codecs, *args))
    for name, epochs in (("tried", 20), ("not", 0)):
        write_case(tmp_path / name, n=16, t=6, m=20, extra=f"grid_shape 4 5\nfield_codec_epochs {epochs}\n")
    models = []
    with said() as lines:
        for name in ("tried", "not"):
            config, case = prepared(tmp_path / name)
            with chdir(tmp_path / name):
                models.append(build_model(config, case, Runtime(torch.device("cpu"))))
    said_about_codec = [line for line in lines if "the VAE runs on" in line or "No snapshot codec" in line]
    assert said_about_codec[0].startswith(said_first) and len(said_about_codec) == 1
    assert said_last in said_about_codec[0] and said_about_codec[0].endswith("the VAE runs on the fields" if
                                                                             passes == 5 else said_last)
    assert len(made) == passes and read == reads
    assert models[0].codec is None
    # the same fresh network (the seed is set by train_vae, not here: compare what POD decides)
    first, second = models[0].state_dict(), models[1].state_dict()
    for name in ("pod.modes", "pod.scales", "pod.node_modes", "noise_std", "encoder.node_projection.weight"):
        assert torch.equal(first[name], second[name]), name


def test_without_node_positions_no_codec_is_tried_and_that_is_said(tmp_path):
    write_case(tmp_path, n=12, t=6, m=20, extra="field_codec_epochs 20\n")
    config, case = prepared(tmp_path)
    with chdir(tmp_path), said() as lines:
        model = build_model(config, case, Runtime(torch.device("cpu")))
    assert model.codec is None
    assert any(line.startswith("note: no snapshot codec: where the nodes are is not known") for line in lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A whole run on the pulse (VAE on codes, MLP conditioner on its 4 parameters), 3 epochs, a checkpoint each."""
    folder = tmp_path_factory.mktemp("trained")
    parameters = pulse_case(folder, epochs=3, extra="n_epoch 2\nlatent_gp 0\nlatent_rbf 0\nfield_conditioner_epochs 0\n"
                                                   "input_type csv\nparam_dir input_data/parameters.csv\n")
    write_parameters(folder, parameters)
    with chdir(folder):
        assert main([]) == 0
    return folder


@pytest.mark.slow
def test_a_model_on_codes_is_saved_reloaded_and_reported(trained):
    model, config, scaler = load_model(trained / "model_save" / "SimulGen-VAE")
    assert model.codec is not None and (model.spec.codec, model.spec.codec_modulation) in CANDIDATES
    report = json.loads((trained / "output" / "evaluation.json").read_text())
    assert set(report["likelihood"]) == {"alpha", "model", "noise_std_codes"}
    assert report["likelihood"]["noise_std_codes"] == pytest.approx(model.noise_std.tolist())
    assert "likelihood on the snapshot codec's codes" in (trained / "output" / "evaluation.md").read_text()
    # the race's other codecs are time on discarded candidates, the kept codec's fit time on the surrogate kept
    parts = report["time_spent"]["parts"]
    assert parts["snapshot codecs outraced"]["kept"] is False and parts["snapshot codec"]["kept"] is True
    assert parts["snapshot codecs outraced"]["seconds"] > 0 and parts["snapshot codec"]["seconds"] > 0
    # the reported reconstruction error is the reloaded model's own, on the fields
    with chdir(trained):
        config, case = prepared(trained)
    val = case.array.read(case.val_indices)
    with torch.no_grad():
        recon = scaler.inverse(model(torch.from_numpy(scaler.transform(val)), sample=False)["recon"].numpy())
    errors = np.linalg.norm((recon - val).reshape(len(val), -1), axis=1) / np.linalg.norm(val.reshape(len(val), -1),
                                                                                          axis=1)
    reported = json.loads((trained / "output" / "reconstruction_error.json").read_text())
    assert reported["vae_val"] == pytest.approx(float(errors.mean()), rel=1e-4)


@pytest.mark.slow
def test_a_run_on_codes_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(trained, tmp_path,
                                                                                         monkeypatch, capsys):
    """Stopped in epoch 2 (24 training designs, batches of 4: 6 steps an epoch), resumed: the codec comes back from
    the checkpoint (no second fit) and the run ends where the uninterrupted one did."""
    import signal

    import modules.training.guard as guard
    parameters = pulse_case(tmp_path, epochs=3, extra="n_epoch 2\nlatent_gp 0\nlatent_rbf 0\n"
                                                      "field_conditioner_epochs 0\ninput_type csv\n"
                                                      "param_dir input_data/parameters.csv\n")
    write_parameters(tmp_path, parameters)
    real = stop_at_step(monkeypatch, 8)
    with chdir(tmp_path):
        assert main([]) == 128 + signal.SIGTERM
        checkpoint = torch.load("checkpoints/last.pt", weights_only=True)
        assert checkpoint["spec"]["codec"] and "codec.field.out.weight" in checkpoint["state_dict"]
        capsys.readouterr()
        monkeypatch.setattr(guard.Guard, "after_step", real)
        assert main(["--resume"]) == 0
    said = capsys.readouterr().out
    assert "Resuming from checkpoints/last.pt: epoch 1, step 2" in said and "Training a snapshot codec" not in said
    one = torch.load(trained / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", ["its 4th pass", "the comparison after its last pass"])
def test_a_run_killed_in_the_codecs_fit_resumes_it_to_the_weights_of_an_uninterrupted_run(trained, tmp_path,
                                                                                          monkeypatch, capsys,
                                                                                          killed_in):
    """The codec's fit is saved after every pass: a run killed before the VAE's first checkpoint (in the fit, or
    after it) and resumed with --resume continues the fit where it stood, in the same run record, and ends with the
    VAE of an uninterrupted run, bit for bit; --checkpoints=list calls the fit's file resumable."""
    from modules.storage.model_format import FIT_FORMAT
    from modules.training import codec_choice, field_fitter
    parameters = pulse_case(tmp_path, epochs=3, extra="n_epoch 2\nlatent_gp 0\nlatent_rbf 0\n"
                                                      "field_conditioner_epochs 0\ninput_type csv\n"
                                                      "param_dir input_data/parameters.csv\n")
    write_parameters(tmp_path, parameters)
    # the 4th pass: in the race's first fit (codes 4 warp); code_bases: its 5th call, after the race's four
    module, name, call = ((field_fitter, "sampled_pass", 4) if killed_in == "its 4th pass" else
                          (codec_choice, "code_bases", 5))
    with chdir(tmp_path):
        real = die_on_call(monkeypatch, module, name, call)
        with pytest.raises(Died):
            main([])
        monkeypatch.setattr(module, name, real)
        saved = {path.name: torch.load(path, weights_only=True) for path in Path("checkpoints").glob("snapshot_*")}
        if module is field_fitter:
            assert saved.keys() == {"snapshot_codec_fit_warp_4.pt"}
            file, made = "snapshot_codec_fit_warp_4.pt", 3
        else:  # the race's four fits, paused after 38 passes; the winner went on to its 150th
            assert sorted(fit["passes_made"] for fit in saved.values()) == [38, 38, 38, 150]
            file, made = next((file, 150) for file, fit in saved.items() if fit["passes_made"] == 150)
        assert {(fit["format"], fit["fit_of"]) for fit in saved.values()} == {(FIT_FORMAT, "snapshot codec")}
        capsys.readouterr()
        assert main(["--checkpoints=list"]) == 0
        assert (f"resumable     checkpoints/{file}  (a snapshot codec's fit after {made} of 150 "
                "passes: --resume continues it, then the VAE)") in capsys.readouterr().out
        assert main(["--resume"]) == 0
    said = capsys.readouterr().out
    assert f"Continuing the snapshot codec's fit after pass {made} (checkpoints/{file})" in said
    assert f"Run {saved[file]['run_id']}: recorded" in said and len(list((tmp_path / "runs").iterdir())) == 1
    one = torch.load(trained / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)


@pytest.mark.parametrize("spoil, words", [
    (lambda folder: (folder / "checkpoints" / "snapshot_codec_fit_warp_4.pt").write_bytes(b"PK\x03\x04 not whole"),
     "cannot be loaded safely"),
    (lambda folder: (folder / "input_data" / "condition.txt").write_text(
        (folder / "input_data" / "condition.txt").read_text().replace("Latent_dim 4", "Latent_dim 6")),
     "was written by another config (Latent_dim 4 -> 6)"),
], ids=["damaged", "another-config"])
def test_resume_of_a_codec_fit_that_is_damaged_or_of_another_config_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                                           capsys, spoil, words):
    """--resume of a run stopped in the codec's fit refuses, in one line and changing nothing, a fit file that cannot
    be read or one written with settings that may not change on resume."""
    from modules.training import codec_choice, field_fitter
    write_case(tmp_path, n=16, t=6, m=20, extra="grid_shape 4 5\nfield_codec_epochs 6\n")
    monkeypatch.setattr(codec_choice, "CODEC_FLOOR", 0.0)  # this smooth family's POD is below both: fit it anyway
    monkeypatch.setattr(codec_choice, "LOSING_MARGIN", float("inf"))
    real = die_on_call(monkeypatch, field_fitter, "sampled_pass", 3)
    with chdir(tmp_path):
        with pytest.raises(Died):
            main([])
        monkeypatch.setattr(field_fitter, "sampled_pass", real)
        spoil(tmp_path)
        before = sorted(str(path) for path in tmp_path.rglob("*"))
        capsys.readouterr()
        assert main(["--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoints/snapshot_codec_fit_warp_4.pt" in error[0] and words in error[0]
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_a_model_on_codes_exports_to_onnx_and_matches_predict(trained, tmp_path, capsys):
    with chdir(trained):
        assert main([f"--export={tmp_path / 'surrogate.onnx'}"]) == 0
    assert "matches --predict" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "surrogate.onnx"), providers=["CPUExecutionProvider"])
    fields = session.run(["fields"], {"parameters": np.zeros((2, 4), dtype=np.float32) + 0.5})[0]
    assert fields.shape == (2, STEPS, SIDE * SIDE) and np.isfinite(fields).all()


def test_the_warp_modulation_starts_as_the_shift_one_and_its_code_stretches_and_reweights_the_field():
    """WARP's amplitudes and coordinate map start at zero: the network computes what the shift-only one with the
    same weights computes. A code whose map is (s - 1) I draws the shift-only field at s x; an amplitude a on the
    last sine layer scales what the output layer reads."""
    from modules.models.neural_field import SHIFT, NeuralFieldNodes
    torch.manual_seed(0)
    points = torch.rand(30, 2).numpy()
    shift, warp = NeuralFieldNodes(3, 30, 1, modulation=SHIFT), NeuralFieldNodes(3, 30, 1, modulation=WARP)
    assert warp.load_state_dict(shift.state_dict(), strict=False).missing_keys == [
        "amplitudes.weight", "amplitudes.bias", "warp.weight", "warp.bias"]
    for network in (shift, warp):
        network.set_coordinates(points)
    codes = torch.randn(2, 4, 3)
    with torch.no_grad():
        assert torch.allclose(warp(codes), shift(codes), atol=1e-6)
        warp.warp.bias.copy_(torch.tensor([0.25, 0.0, 0.0, 0.25]))  # (I + D) x = 1.25 x
        stretched = NeuralFieldNodes(3, 30, 1, modulation=SHIFT)
        stretched.load_state_dict(shift.state_dict())
        stretched.coordinates.mul_(1.25)
        assert torch.allclose(warp(codes), stretched(codes), atol=1e-5)
        assert not torch.allclose(warp(codes), shift(codes), atol=1e-3)
        warp.warp.bias.zero_()
        warp.amplitudes.bias[-128:] = 1.0  # the last sine layer's features doubled
        doubled = NeuralFieldNodes(3, 30, 1, modulation=SHIFT)
        doubled.load_state_dict(shift.state_dict())
        doubled.out.weight.mul_(2)
        assert torch.allclose(warp(codes), doubled(codes), atol=1e-5)


@pytest.mark.slow
def test_a_version_3_model_on_codes_reads_with_a_shift_only_codec(trained, tmp_path):
    """Version 4 added the codec's modulation: a version 3 file (no codec_modulation, no warp or amplitude weights)
    reads as a shift-only codec, which decodes as a warp codec with those weights at zero does."""
    from modules.models.neural_field import SHIFT
    current = torch.load(trained / "model_save" / "SimulGen-VAE", weights_only=True)
    older = {**current, "format_version": 3,
             "spec": {key: value for key, value in current["spec"].items() if key != "codec_modulation"},
             "state_dict": {key: value for key, value in current["state_dict"].items()
                            if ".warp." not in key and ".amplitudes." not in key}}
    torch.save(older, tmp_path / "v3")
    model, _, _ = load_model(tmp_path / "v3")
    assert model.spec.codec_modulation == SHIFT and model.codec.field.warp is None
    zeroed = {key: (torch.zeros_like(value) if ".warp." in key or ".amplitudes." in key else value)
              for key, value in current["state_dict"].items()}
    warp = HierarchicalVAE(ModelSpec.from_dict(current["spec"]))
    warp.load_state_dict(zeroed)
    codes = torch.randn(2, STEPS, model.spec.codec)
    with torch.no_grad():
        assert torch.allclose(model.codec.decode(codes), warp.codec.decode(codes), atol=1e-6)


def test_an_old_model_file_without_a_codec_reads_as_one_on_the_fields():
    spec = ModelSpec.from_dict({"n_steps": 4, "n_nodes": 6, "projection_rank": 3, "filters": [8], "main_latent_dim": 2,
                                "level_latent_dim": 2, "blocks_per_level": 1, "head_hidden": 8})
    assert spec.codec == 0 and spec.data_spec() is spec and HierarchicalVAE(spec).codec is None


def test_a_negative_field_codec_epochs_is_refused_in_one_line(tmp_path, capsys):
    pulse_case(tmp_path, codec_epochs=-1)
    with chdir(tmp_path):
        assert main([]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "field_codec_epochs" in error[0] and "must be >= 0" in error[0]


@pytest.mark.slow
def test_two_gloo_processes_train_on_codes_like_one_process(tmp_path):
    """Every rank fits the same codec and makes the same choice; the VAE on codes then trains as DDP trains any VAE
    (the network alone, as tests/machine/test_distributed.py compares it)."""

    for name in ("one", "two"):
        pulse_case(tmp_path / name, epochs=2, extra=NETWORK_ALONE, codec_epochs=30)
    _, double = one_and_two_processes(tmp_path)
    assert double.stdout.count("Training a snapshot codec") == 1
    assert "the VAE runs on the codec's codes" in double.stdout
    one = torch.load(tmp_path / "one" / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two" / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    assert all(torch.equal(one[name], two[name]) for name in one if name.startswith("codec."))
    # every tensor but the biases of the convolutions that feed a GroupNorm (body.2): their gradient is near zero and
    # Adam turns the float noise of another summation order into full-size steps (tests/machine/test_distributed.py)
    compared = [name for name in one if not name.endswith("body.2.bias")]
    difference = sum(torch.sum((one[k].float() - two[k].float()) ** 2) for k in compared).sqrt()
    assert difference <= 1e-5 * sum(torch.sum(one[k].float() ** 2) for k in compared).sqrt()
    losses = [column(tmp_path / name / "output" / "metrics.csv", "train/loss") for name in ("one", "two")]
    assert np.allclose(*losses, rtol=1e-5)
