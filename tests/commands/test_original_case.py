"""A case folder written as the original SimulGenVAE (github.com/leesihun/SimulGen-VAE) expects it: its preset.txt
and condition.txt layout and keys (header line, RESERVED and Stretch lines, '%' and "'" section lines, tabs, a
Windows editor's byte-order mark and CRLF line ends, param_dir /images, e2e_vae_model_path, LC_alpha), the dataset
as dataset1.pickle in the case folder itself, and geometry images. It must train unchanged, with --lc_only=0 and then
--lc_only=1, with one note per difference and no warning."""
import pickle
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, design_image, design_parameters, smooth_fields

N_DESIGNS, N_STEPS, N_NODES, KEPT_STEPS = 16, 6, 20, 4

PRESET = """data_No, init_beta_divisior, num_filter_enc, latent_conditioner_filter
1
0
16 8
8 16
"""

# The original's condition.txt (input_data/condition.txt of its main branch), with this test's sizes and epochs.
CONDITION = f"""Common params
Dim1\t\t{N_DESIGNS} # number of parameters
Dim2\t\t{N_STEPS} # number of timesteps
Dim3\t\t{N_NODES} # num nodes
num_var 1
RESERVED\t0
RESERVED\t0
RESERVED\t0
'
%LSH-VAE parameters
Training_epochs\t3
Batch_size\t4
LearningR\t0.001
Latent_dim\t4\t# Hierarchical latent Dim1
Latent_dim_end\t8 # Main latent Dim1
Loss_type\t1\t# 1: MSE, 2, MAE, 3: smoothL1, 4: Huber
Stretch\t0
RESERVED\t0
RESERVED\t0
alpha\t\t1000000
RESERVED\t0
RESERVED\t0
Recon_iter\t1
% For shortend_dataset(GPU_RAM_OUT)
Dim2_red\t\t{KEPT_STEPS}
Dim3_start      0
Dim3_end\t\t{N_NODES}
'
%LatentConditioner
num_param\t0
param_dir\t/images
n_epoch\t3
latent_conditioner_lr\t0.001\t# Increased to learn full latent range
latent_conditioner_batch\t64\t# Reduced for more gradient noise (regularization)
latent_conditioner_weight_decay\t1e-5\t# Reduced to allow fuller range learning
latent_conditioner_dropout_rate\t0.2\t# High dropout to prevent overfitting on small dataset
use_spatial_attention\t1\t# 1=on - enable spatial attention for better features
input_type\timage\t#image, csvs
param_data_type .png
'
%End-to-End Training Configuration
use_e2e_training\t1\t# 0=disabled, 1=enabled - use end-to-end training
e2e_loss_function\tHuber   #MSE, MAE, Huber, SmoothL1 - loss function for reconstruction
e2e_vae_model_path\tmodel_save/SimulGen-VAE\t# path to pre-trained VAE model
use_latent_regularization\t1\t# 0=disabled, 1=enabled - add latent space regularization
LC_alpha    1000
latent_reg_weight\t0.001   #increased from 0.001 for better latent guidance
"""


@pytest.fixture
def original_case(tmp_path):
    (tmp_path / "input_data").mkdir()
    (tmp_path / "preset.txt").write_bytes(PRESET.replace("\n", "\r\n").encode())
    (tmp_path / "input_data" / "condition.txt").write_bytes(b"\xef\xbb\xbf" + CONDITION.replace("\n", "\r\n").encode())
    parameters = design_parameters(N_DESIGNS, seed=5)
    with open(tmp_path / "dataset1.pickle", "wb") as handle:  # in the case folder, as the original reads it
        pickle.dump(smooth_fields(N_DESIGNS, N_STEPS, N_NODES, parameters=parameters), handle)
    (tmp_path / "images").mkdir()
    for number, (amplitude, phase) in enumerate(parameters, start=1):
        Image.fromarray(design_image(amplitude, phase)).save(tmp_path / "images" / f"{number}.png")
    return tmp_path


def run(folder, *flags):
    return subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--preset=1", *flags], cwd=folder,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


@pytest.mark.slow
def test_an_original_case_folder_trains_unchanged_with_a_note_per_difference(original_case):
    full = run(original_case, "--lc_only=0")
    assert full.returncode == 0, full.stderr[-3000:]
    notes = full.stderr.splitlines()
    # notes only: no config warning (': warning:'), no key suggestion, no traceback
    assert ": warning:" not in full.stderr and "did you mean" not in full.stderr and "Traceback" not in full.stderr
    assert any("keys of the original SimulGenVAE that this version has no use for are ignored: Common (line 1), "
               "RESERVED (lines 6, 7, 8, 18, 19, 21, 22), Stretch (line 17)" in note for note in notes)
    assert any("param_dir /images does not exist; using images in the case folder" in note for note in notes)
    assert any("LC_alpha 1000 (the original's weight of the field loss) is read as latent_reg_weight 0.001 / 1000 = "
               "1e-06" in note for note in notes)
    assert any("image_size auto: the images are 16 x 16 pixels" in note for note in notes)
    assert "validation designs of the first 4 of 6 steps (0-3)" in full.stdout  # Dim2_red: the original's meaning
    assert memory_phases(full.stdout) == ["the setup (data checks, scaler)", "the POD basis", "the VAE's training",
                                          "the VAE's evaluation (latents, baselines, memorization)",
                                          "the conditioner's training", "the evaluation report"]
    vae = torch.load(original_case / "model_save" / "SimulGen-VAE", weights_only=True)
    assert vae["config"]["n_steps_used"] == KEPT_STEPS and vae["config"]["steps_spacing"] == "first"
    assert vae["config"]["latent_reg_weight"] == pytest.approx(1e-6) and vae["config"]["image_size"] == 16
    assert (original_case / "model_save" / "latent_conditioner").exists()

    conditioner_only = run(original_case, "--lc_only=1")
    assert conditioner_only.returncode == 0, conditioner_only.stderr[-3000:]
    assert ": warning:" not in conditioner_only.stderr and "Traceback" not in conditioner_only.stderr
    assert "end to end through the frozen decoder" in conditioner_only.stdout
    assert memory_phases(conditioner_only.stdout) == ["the setup (data checks, latents)", "the conditioner's training",
                                                      "the evaluation"]


def memory_phases(stdout: str) -> list:
    """The phases a run's "Memory: <phase> peaked at X GB of private memory" lines name, each with a sane peak."""
    phases = []
    for line in stdout.splitlines():
        if line.startswith("Memory: "):
            said = re.fullmatch(r"Memory: (.+) peaked at (\d+\.\d\d) GB of private memory \((\d+\.\d\d) GB held at "
                                r"its end\)", line)
            assert said and 0.05 < float(said[3]) <= float(said[2]) < 8, line
            phases.append(said[1])
    return phases
