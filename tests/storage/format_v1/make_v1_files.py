"""Write model files in the format of commit 8e21e0a (format v1), with what that code predicts from them.

Run with that commit's code:  cd <checkout of 8e21e0a> && python make_v1_files.py OUT_FOLDER
"""
import shutil
import sys
from contextlib import chdir
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path.cwd() / "tests"))
from conftest import write_conditions  # noqa: E402
from modules.cli import main  # noqa: E402

N, T, GRID = 16, 6, 8
CONDITION = f"""\
Dim1 {N}
Dim2 {T}
Dim3 {GRID * GRID}
Training_epochs 3
Batch_size 4
LearningR 0.003
Latent_dim 4
Latent_dim_end 8
projection_rank 8
val_fraction 0.25
grid_shape {GRID} {GRID}
field_codec_epochs 0
input_type csv
param_dir input_data/parameters.csv
n_epoch 3
latent_conditioner_batch 4
field_conditioner_epochs 0
"""


def parameters(n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.5, 2.0, n), rng.uniform(0, np.pi, n)], axis=1)


def fields(params):
    """A bump that travels along x with the phase and grows with the amplitude: [n, T, GRID * GRID]."""
    x = np.linspace(0, 1, GRID)
    xx, yy = np.meshgrid(x, x)
    out = np.empty((len(params), T, GRID * GRID), np.float32)
    for i, (amplitude, phase) in enumerate(params):
        for t in range(T):
            centre = 0.2 + 0.6 * ((phase / np.pi + 0.1 * t) % 1.0)
            out[i, t] = (amplitude * np.exp(-((xx - centre) ** 2 + (yy - 0.5) ** 2) / 0.05)).ravel() + 1.0
    return out


def write_case(folder: Path, extra=""):
    (folder / "input_data").mkdir(parents=True)
    (folder / "preset.txt").write_text("data_No init_beta_divisor filters conditioner_filters\n1\n0\n16 8\n16 32\n")
    (folder / "input_data" / "condition.txt").write_text(CONDITION + extra)
    params = parameters(N, 0)
    np.save(folder / "input_data" / "dataset1.npy", fields(params))
    write_conditions(folder, params)
    new = parameters(4, 1)
    (folder / "new_designs.csv").write_text("amplitude,phase\n" + "".join(f"{a:.17g},{p:.17g}\n" for a, p in new))
    write_conditions(folder / "new", new, csv="unused.csv")
    np.save(folder / "new_fields.npy", fields(new))


def run(*argv):
    code = main(list(argv))
    assert code == 0, (argv, code)


def keep(name, target: Path, what=("model_save/latent_conditioner",)):
    for path in what:
        shutil.copy(path, target / f"{name}")


def predictions(name, target: Path, samples: bool, source="new_designs.csv"):
    run(f"--predict={source}", f"--out={target / f'{name}.npy'}", *(["--samples=3"] if samples else []))


def main_script(out: Path):
    out.mkdir(parents=True)
    import modules.training.conditioner_training as conditioner_training
    import modules.training.vae_training as vae_training

    # A VAE on the fields with the GP on the latents kept (the defaults), then other conditioners on it
    case = out / "case"
    write_case(case)
    expected = out / "expected"
    expected.mkdir()
    with chdir(case):
        run("--plot=2")
        shutil.copy("model_save/latent_conditioner", expected / "../conditioner_default")
        predictions("default", expected, samples=True)
        run("--reconstruct=new_fields.npy", f"--out={expected / 'reconstruct_fields_vae.npy'}")
        text = Path("input_data/condition.txt").read_text()
        Path("input_data/condition.txt").write_text(text.replace("latent_conditioner_batch 4",
                                                                 "latent_conditioner_batch 4\nlc_ensemble 2\nlatent_gp 0"))
        run("--lc_only=1")
        shutil.copy("model_save/latent_conditioner", expected / "../conditioner_ensemble")
        predictions("ensemble", expected, samples=True)
        Path("input_data/condition.txt").write_text(text.replace("input_type csv", "input_type image")
                                                    .replace("param_dir input_data/parameters.csv", "param_dir images"))
        run("--lc_only=1")
        shutil.copy("model_save/latent_conditioner", expected / "../conditioner_cnn")
        predictions("cnn", expected, samples=True, source="new/images")
        Path("input_data/condition.txt").write_text(text.replace("field_conditioner_epochs 0",
                                                                 "field_conditioner_epochs 2"))
        original = conditioner_training.validation_field_errors
        conditioner_training.validation_field_errors = lambda networks, *a: {
            kind: 0.0 if kind == "neural_field" else 1.0 for kind in networks}
        run("--lc_only=1")
        conditioner_training.validation_field_errors = original
        shutil.copy("model_save/latent_conditioner", expected / "../conditioner_neural_field")
        predictions("neural_field", expected, samples=False)
        Path("input_data/condition.txt").write_text(text)
        shutil.copy("model_save/latent_conditioner", "model_save/latent_conditioner.tmp")
        for leftover in ("runs", "archive", "output"):
            shutil.rmtree(leftover, ignore_errors=True)
    # the last lc_only run left its conditioner in model_save/: the case keeps the default one there
    shutil.copy(out / "conditioner_default", case / "model_save" / "latent_conditioner")
    (case / "model_save" / "latent_conditioner.tmp").unlink()

    # A VAE on snapshot codes (the codec kept), with the GP on its latents
    codec = out / "codec_case"
    write_case(codec, "")
    with chdir(codec):
        text = Path("input_data/condition.txt").read_text()
        Path("input_data/condition.txt").write_text(text.replace("field_codec_epochs 0", "field_codec_epochs 2"))
        vae_training.validation_errors = lambda *a: (0.0, 1.0)
        run("--plot=2")
        predictions("codec_default", expected, samples=True)
        run("--reconstruct=new_fields.npy", f"--out={expected / 'reconstruct_codec_vae.npy'}")
        for leftover in ("runs", "archive", "output"):
            shutil.rmtree(leftover, ignore_errors=True)


if __name__ == "__main__":
    main_script(Path(sys.argv[1]).resolve())
