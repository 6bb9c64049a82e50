"""Model files and checkpoints (storage.model_files, storage.model_format): every file holds its kind and format
version; files of format version 1, written by an earlier SimulGenVAE (tests/storage/format_v1), load and predict,
sample and reconstruct what that version did, to float32 rounding; a file of a newer version is refused in one line."""
import json
import math
import shutil
from contextlib import chdir

import numpy as np
import pytest
import torch

from conftest import REPO, as_version_1
from modules.cli import main
from modules.storage.model_format import CHECKPOINT_FORMAT, CONDITIONER_FORMAT, FORMAT_VERSION, MODEL_FORMAT, format_of

VERSION_1 = REPO / "tests" / "storage" / "format_v1"
EXPECTED = VERSION_1 / "expected"


@pytest.fixture
def version_1(tmp_path):
    """A copy of the version 1 files, so that nothing a test writes lands in the repository."""
    shutil.copytree(VERSION_1, tmp_path / "v1")
    return tmp_path / "v1"


def assert_as_recorded(values, recorded, name="") -> None:
    """values equal the recorded ones to float32 rounding: the same sums on another CPU (the recorded files come from
    one machine) may be added in another order and differ in the last bits; reading a file wrongly (a setting lost in
    the migration, another modulation, a scale dropped) moves them by far more than this."""
    recorded = np.asarray(recorded)
    np.testing.assert_allclose(values, recorded, rtol=1e-5, atol=1e-6 * float(np.abs(recorded).max()), err_msg=name)


def assert_predicted_as_recorded(got: dict, recorded: str) -> None:
    """--predict's outputs (predicted's) equal the recorded ones (EXPECTED/recorded*.npy): the prediction to float32
    rounding (assert_as_recorded); the draws, their mean and spread to a hundredth of the recorded spread. A draw is
    decoded away from the prediction, where a last-bit difference in the spread or the latents grows through the
    decoder (to about a thousandth of the spread between two CPUs, measured); other noise or a lost calibration scale
    moves the draws by about the spread itself."""
    spread = float(np.load(EXPECTED / f"{recorded}_std.npy").mean()) if "_std" in got else None
    for name, values in got.items():
        expected = np.load(EXPECTED / f"{recorded}{name}.npy")
        if name:
            np.testing.assert_allclose(values, expected, rtol=0, atol=0.01 * spread, err_msg=name)
        else:
            assert_as_recorded(values, expected, "prediction")


def same_report(got, recorded, key: str = "") -> bool:
    """Two JSON reports alike: the same keys, texts and flags; numbers equal to float32 rounding, but for a design's
    predicted_relative_std, which its draws give, to a hundredth of itself (assert_predicted_as_recorded)."""
    if isinstance(recorded, dict):
        return isinstance(got, dict) and got.keys() == recorded.keys() and all(
            same_report(got[name], recorded[name], name) for name in recorded)
    if isinstance(recorded, list):
        return isinstance(got, list) and len(got) == len(recorded) and all(
            same_report(one, other, key) for one, other in zip(got, recorded))
    if isinstance(recorded, float):
        tolerance = 1e-2 if key == "predicted_relative_std" else 1e-5
        return isinstance(got, (int, float)) and math.isclose(got, recorded, rel_tol=tolerance, abs_tol=1e-12)
    return got == recorded and type(got) is type(recorded)


def predicted(folder, out, source, *flags) -> dict:
    """--predict in folder; what it wrote, by the expected files' names."""
    with chdir(folder):
        assert main([f"--predict={source}", f"--out={out}.npy", *flags]) == 0
    names = ["", "_mean", "_samples", "_std"] if flags else [""]
    return {name: np.load(f"{out}{name}.npy") for name in names}


@pytest.mark.parametrize("kind, source, samples", [
    ("default", "new_designs.csv", True),        # the GP on the latents of a VAE on the fields
    ("ensemble", "new_designs.csv", True),
    ("cnn", "new/images", True),
    ("neural_field", "new_designs.csv", False),  # no uncertainty, so no samples
])
def test_a_version_1_conditioner_predicts_and_samples_what_it_did(version_1, tmp_path, kind, source, samples):
    if kind != "default":
        shutil.copy(version_1 / f"conditioner_{kind}", version_1 / "case" / "model_save" / "latent_conditioner")
    got = predicted(version_1 / "case", tmp_path / kind, source, *(["--samples=3"] if samples else []))
    assert_predicted_as_recorded(got, kind)
    assert same_report(json.loads((tmp_path / f"{kind}_report.json").read_text()),
                       json.loads((EXPECTED / f"{kind}_report.json").read_text()))


def test_a_version_1_vae_on_snapshot_codes_predicts_and_reconstructs_what_it_did(version_1, tmp_path):
    got = predicted(version_1 / "codec_case", tmp_path / "codec", "new_designs.csv", "--samples=3")
    assert_predicted_as_recorded(got, "codec_default")
    for case, expected in (("codec_case", "reconstruct_codec_vae"), ("case", "reconstruct_fields_vae")):
        with chdir(version_1 / case):
            assert main(["--reconstruct=new_fields.npy", f"--out={tmp_path / expected}.npy"]) == 0
        assert_as_recorded(np.load(tmp_path / f"{expected}.npy"), np.load(EXPECTED / f"{expected}.npy"), expected)


@pytest.mark.slow
def test_a_version_1_conditioner_checkpoint_is_resumable(version_1, capsys):
    with chdir(version_1 / "case"):
        assert main(["--checkpoints=list"]) == 0
        listed = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert ["resumable", "checkpoints/conditioner_last.pt"] in [line[:2] for line in listed]
        assert main(["--lc_only=1", "--resume"]) == 0  # a finished checkpoint: the choice, calibration and save
    saved = torch.load(version_1 / "case" / "model_save" / "latent_conditioner", weights_only=True)
    assert (saved["format"], saved["format_version"]) == (CONDITIONER_FORMAT, FORMAT_VERSION)
    vae = torch.load(version_1 / "case" / "model_save" / "SimulGen-VAE", weights_only=True)
    assert "format_version" not in vae and vae["format"] == MODEL_FORMAT + "-v1"  # --lc_only=1 leaves the VAE alone


def test_every_file_a_run_writes_holds_its_kind_and_the_current_format_version(demo):
    for path, kind in (("model_save/SimulGen-VAE", MODEL_FORMAT), ("checkpoints/last.pt", CHECKPOINT_FORMAT),
                       ("model_save/latent_conditioner", CONDITIONER_FORMAT),
                       ("checkpoints/conditioner_last.pt", CONDITIONER_FORMAT)):
        payload = torch.load(demo / path, weights_only=True)
        assert (payload["format"], payload["format_version"]) == (kind, FORMAT_VERSION), path


@pytest.mark.parametrize("path, flag", [("model_save/latent_conditioner", "--predict=new_designs.csv"),
                                        ("model_save/SimulGen-VAE", "--reconstruct=new_fields.npy")])
@pytest.mark.parametrize("change, words", [
    ({"format_version": FORMAT_VERSION + 1}, "was written by a newer version of SimulGenVAE"),
    ({"spec": []}, "is not a complete SimulGenVAE file"),  # a damaged version 1 file: its migration cannot read it
], ids=["newer", "damaged-older"])
def test_a_file_of_a_newer_version_or_a_damaged_older_one_is_refused_in_one_line(version_1, tmp_path, capsys, path,
                                                                                  flag, change, words):
    path = version_1 / "case" / path
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": format_of(payload), **change}, path)
    with chdir(version_1 / "case"):
        assert main([flag, f"--out={tmp_path / 'p.npy'}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{path.name}: {words}" in error
    assert not (tmp_path / "p.npy").exists()


def test_as_version_1_gives_what_version_1_wrote(version_1, demo):
    """The tests make older version 1 files by deleting entries from as_version_1(a current file): check that a
    current conditioner made so holds the entries a version 1 file of the same kind (a GP on latents) holds, with
    its kind's name and no version."""
    written = torch.load(version_1 / "case" / "model_save" / "latent_conditioner", weights_only=True)
    current = torch.load(demo / "model_save" / "latent_conditioner", weights_only=True)
    assert written["spec"]["kind"] == current["spec"]["kind"]
    made = as_version_1(current)
    assert made.keys() == written.keys() and made["format"] == written["format"]
    assert made["spec"].keys() == written["spec"].keys() and made["state_dict"].keys() == written["state_dict"].keys()


@pytest.mark.parametrize("version, added", [(2, ("encoder", "field_modulation", "frame")),
                                             (4, ("field_modulation", "frame")), (5, ("frame",))])
def test_an_older_conditioner_reads_with_what_its_version_meant_and_predicts_the_same(demo, tmp_path, version, added):
    """Version 3 added a conditioner spec's encoder, version 5 its neural field's modulation, version 6 its feature
    frame: a version 2, 4 or 5 file (the demo's, as that version wrote it) reads with encoder "", modulation "shift"
    and frame () and predicts what the current file predicts."""
    from modules.models.conditioners import ConditionerSpec
    from modules.storage.model_files import load_conditioner
    current = torch.load(demo / "model_save" / "latent_conditioner", weights_only=True)
    older = {**current, "format_version": version,
             "spec": {k: v for k, v in current["spec"].items() if k not in added}}
    torch.save(older, tmp_path / "older")
    network, facts = load_conditioner(tmp_path / "older")
    assert facts["format_version"] == FORMAT_VERSION == 6
    assert (facts["spec"]["encoder"], facts["spec"]["field_modulation"], facts["spec"]["frame"]) == ("", "shift", [])
    assert ConditionerSpec.from_dict(facts["spec"]) == ConditionerSpec.from_dict(current["spec"])
    inputs = torch.randn(3, current["spec"]["input_shape"][0])
    expected, _ = load_conditioner(demo / "model_save" / "latent_conditioner")
    assert torch.equal(network(inputs), expected(inputs))
