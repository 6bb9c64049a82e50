"""The memorization check tells copies of training designs from new designs, and every training run reports it."""
import json
from contextlib import chdir

import numpy as np
import torch

from conftest import design_parameters, smooth_fields, write_case
from modules.cli import main
from modules.config import load_config
from modules.data.case import prepare_case
from modules.evaluation.memorization import (cross_products, nearest_from_inner_products, summarise_distances,
                                             write_prior_samples)
from modules.machine.device import Runtime
from modules.models.pod import design_gram
from modules.storage.model_files import load_model

N_DESIGNS = 40


def family_case(folder):
    """40 designs of one family (10 held out), read through the real dataset code."""
    write_case(folder, n=N_DESIGNS, epochs=1)
    with chdir(folder):
        return prepare_case(load_config(1), Runtime(torch.device("cpu")))


def nearest(fields, case, folder):
    """Nearest-training-design distances of fields [n, T, M], the way the check computes them for samples."""
    np.save(folder / "fields.npy", fields)
    norm2, cross = cross_products(folder / "fields.npy", case.array, case.train_indices)
    n_train = len(case.train_indices)
    return nearest_from_inner_products(norm2, cross, np.diag(split_gram(case))[:n_train])


def split_gram(case):
    return design_gram(case.array, np.concatenate([case.train_indices, case.val_indices]))


def heldout(case):
    gram, n_train = split_gram(case), len(case.train_indices)
    return nearest_from_inner_products(np.diag(gram)[n_train:], gram[n_train:, :n_train], np.diag(gram)[:n_train])


def test_copies_of_training_designs_are_reported_as_memorization(tmp_path):
    case = family_case(tmp_path)
    report = summarise_distances(nearest(case.array.read(case.train_indices[:10]), case, tmp_path), heldout(case),
                       len(case.train_indices))
    assert report["samples_nearest_distance"]["max"] < 1e-6 < report["heldout_nearest_distance"]["min"]
    assert report["share_closer_than_heldout_p5"] == 1.0 and "memorization" in report["verdict"]


def test_new_designs_of_the_family_are_not(tmp_path):
    case = family_case(tmp_path)
    new = smooth_fields(10, 6, 20, parameters=design_parameters(10, seed=5))  # the same family, other designs
    report = summarise_distances(nearest(new, case, tmp_path), heldout(case), len(case.train_indices))
    assert report["share_closer_than_heldout_p5"] <= 0.2 and report["verdict"].startswith("no sign")
    assert report["samples_nearest_distance"]["min"] > 1e-3


def test_distances_from_inner_products_match_direct_differences(tmp_path):
    case = family_case(tmp_path)
    fields = smooth_fields(3, 6, 20, parameters=design_parameters(3, seed=9))
    training = case.array.read(case.train_indices).reshape(len(case.train_indices), -1)
    direct = [min(np.linalg.norm(training - field.ravel(), axis=1) / np.linalg.norm(training, axis=1))
              for field in fields]
    assert np.allclose(nearest(fields, case, tmp_path), direct, rtol=1e-6)


def test_a_training_run_reports_memorization_with_repeatable_samples(tmp_path, capsys):
    write_case(tmp_path, n=16, epochs=2)
    with chdir(tmp_path):
        assert main([]) == 0
    report = json.loads((tmp_path / "output" / "memorization.json").read_text())
    assert report["n_samples"] == report["n_heldout"] == 4 and report["n_train"] == 12
    assert 0 < report["samples_nearest_distance"]["min"] <= report["samples_nearest_distance"]["max"] < np.inf
    assert "Memorization check (4 prior samples, 4 held-out designs" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "output").iterdir() if path.is_dir()) == []  # no temporary left
    model, _, scaler = load_model(tmp_path / "model_save" / "SimulGen-VAE")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    draws = [np.load(write_prior_samples(tmp_path / f"{name}.npy", model, scaler, 5, seed))
             for name, seed in (("first", 7), ("again", 7), ("other", 8))]
    assert draws[0].shape == (5, 6, 20)
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])
    assert torch.equal(torch.get_rng_state(), before)  # the run's own random stream is left alone
