"""What preset.txt and input_data/condition.txt promise: how good files read, and how bad ones are refused."""
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, said, write_case
from modules.config import CONDITION_FILE, PRESET_FILE, load_config
from modules.config.settings import Config, changed_settings
from modules.errors import InputError

BASE = """\
Dim1 12
Dim2 6
Dim3 20
Training_epochs 2
"""


def write_condition(case, text):
    (case / CONDITION_FILE).write_text(text)


def load(case, text=None, warn=None, **kwargs):
    """load_config on the case folder, with condition.txt replaced by text when given; what it warns appended to the
    list warn, or, without warn, none allowed."""
    if text is not None:
        write_condition(case, text)
    with said(logging.WARNING) as lines:
        config = load_config(**kwargs)
    if warn is None:
        assert lines == [], f"unexpected warning: {lines}"
    else:
        warn.extend(lines)
    return config


def refused(case, text=None, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load(case, text, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------------------ good files
def test_demo_case_files_parse():
    with said(logging.WARNING) as lines:
        config = load_config(preset_path=REPO / PRESET_FILE, condition_path=REPO / CONDITION_FILE)
    assert lines == []
    assert (config.n_designs, config.n_steps, config.n_nodes) == (96, 24, 400)
    assert config.epochs == 300 and config.batch_size == 16 and config.lr == 0.002
    assert config.recon_weight == "auto" and config.loss_type == 1 and config.projection_rank == 64
    assert config.encoder_filters == (64, 64, 32) and config.conditioner_filters == (32, 64, 128, 256)
    assert config.input_type == "csv" and config.param_dir == "input_data/parameters.csv" and config.use_e2e_training
    assert (REPO / config.param_dir).exists()


def test_case_fixture_parses(case):
    config = load(case)
    assert (config.n_designs, config.n_steps, config.n_nodes, config.epochs) == (12, 6, 20, 2)
    assert config.batch_size == 4 and config.val_fraction == 0.25 and config.data_no == 1


def test_space_colon_tab_forms_and_comments_all_read(case):
    config = load(case, "% matlab-style comment\n' basic-style comment\n# hash comment\n\n"
                        "Dim1 12\nDim2: 6\nDim3\t20\t# trailing comment\nTraining_epochs:\t2\n  Batch_size   8  \n")
    assert (config.n_designs, config.n_steps, config.n_nodes, config.epochs, config.batch_size) == (12, 6, 20, 2, 8)


def test_exponent_and_plain_numbers_give_the_same_float(case):
    short = load(case, BASE + "alpha 1e6\n")
    long = load(case, BASE + "alpha 1000000\n")
    assert short.fixed_recon_weight == long.fixed_recon_weight == 1e6 and isinstance(short.fixed_recon_weight, float)
    assert short.recon_weight == long.recon_weight  # one setting: a checkpoint of one resumes with the other
    assert changed_settings(short.to_dict(), long) == []


def test_a_config_saved_before_a_key_existed_reads_as_it_was_meant(case):
    saved = load(case, BASE).to_dict()
    del saved["pod_path"]  # written before the POD path: the network alone
    saved["recon_weight"] = 1000000.0  # alpha was a float then
    config = Config.from_dict(saved)
    assert config.pod_path == 0 and config.recon_weight == "1000000.0" and config.fixed_recon_weight == 1e6


def test_whole_float_reads_as_int(case):
    batch = load(case, BASE + "Batch_size 16.0\n").batch_size
    assert batch == 16 and type(batch) is int


def test_keys_are_case_insensitive(case):
    config = load(case, "dim1 12\nDIM2 6\ndIm3 20\ntraining_EPOCHS 2\nbatch_size 5\n")
    assert (config.n_designs, config.n_steps, config.n_nodes, config.epochs, config.batch_size) == (12, 6, 20, 2, 5)


def test_defaults_are_filled(case):
    config = load(case, BASE)
    assert config.n_steps_used == 6 and config.node_start == 0 and config.node_end == 20
    assert config.n_nodes_used == 20 and config.n_vars == 1
    assert config.batch_size == 16 and config.loss_type == 1 and config.recon_weight == "auto" and config.seed == 42
    assert config.size == "small" and config.load_all == 0 and config.plot == 2 and config.device == "auto"


def test_init_beta_divisor_is_read(case):
    (case / PRESET_FILE).write_text("header\n1\n2.5\n16 8\n16 32\n")
    assert load(case).init_beta_divisor == 2.5


def test_preset_picks_its_block_and_tolerates_blank_lines(case):
    (case / PRESET_FILE).write_text("data_No init_beta_divisor filters conditioner_filters\n"
                                    "1\n0\n16 8\n16 32\n\n\n"
                                    "3\n4\n32, 16, 8\n8\n")
    first, second = load(case, preset_index=1), load(case, preset_index=2)
    assert (first.data_no, first.init_beta_divisor, first.encoder_filters, first.conditioner_filters) == (
        1, 0.0, (16, 8), (16, 32))
    assert (second.data_no, second.init_beta_divisor, second.encoder_filters, second.conditioner_filters) == (
        3, 4.0, (32, 16, 8), (8,))
    assert second.preset_index == 2 and second.n_levels == 3


# --------------------------------------------------------------------------------------------- command-line flags
def test_overrides_beat_the_file(case):
    write_condition(case, BASE + "size small\nload_all 0\n")
    config = load(case, overrides={"size": "large", "load_all": 1})
    assert config.size == "large" and config.load_all == 1


def test_none_overrides_are_ignored(case):
    config = load(case, BASE + "size large\nplot 1\n", overrides={"size": None, "plot": None, "device": None})
    assert config.size == "large" and config.plot == 1 and config.device == "auto"


@pytest.mark.parametrize("overrides", [{"device": "gpu"}, {"size": "huge"}, {"load_all": 7}])
def test_overrides_are_checked_like_file_values(case, overrides):
    refused(case, overrides=overrides)


# ------------------------------------------------------------------------------------------------------- bad files
def assert_names(error, path, line=None, fix_words=()):
    """The message says which file, which line (when there is one) and how to fix it."""
    text = str(error)
    assert str(path) in text and error.path == str(path)
    assert error.line == line
    if line is not None:
        assert f"{path}:{line}:" in text
    assert "Fix:" in text and error.fix
    for word in fix_words:
        assert word in error.fix


def test_missing_required_key_is_refused(case):
    error = refused(case, "Dim2 6\nDim3 20\nTraining_epochs 2\n")
    assert_names(error, CONDITION_FILE, fix_words=["Dim1"])
    assert "Dim1" in error.problem


def test_non_numeric_value_is_refused(case):
    error = refused(case, BASE + "Batch_size abc\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["Batch_size"])
    assert "abc" in error.problem


@pytest.mark.parametrize("line, key", [("Batch_size -4", "Batch_size"), ("Training_epochs 0", "Training_epochs")],
                         ids=["negative_batch_size", "zero_epochs"])
def test_non_positive_counts_are_refused(case, line, key):
    text = BASE.replace("Training_epochs 2\n", "") + line + "\n"
    error = refused(case, text)
    assert_names(error, CONDITION_FILE, line=4, fix_words=[key])
    assert "> 0" in error.problem


@pytest.mark.parametrize("value", ["0", "-1", "big"])
def test_alpha_is_auto_or_a_positive_number(case, value):
    error = refused(case, BASE + f"alpha {value}\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["alpha"])
    assert "auto or a number > 0" in error.problem


def test_the_original_simulgenvae_s_unused_keys_give_one_quiet_line(case):
    notes = []
    load(case, BASE + "RESERVED 0\nRESERVED 0\nStretch 0\nnum_aug_f 0\nrec_graph 0\n", warn=notes)
    assert notes == [f"{CONDITION_FILE}: note: keys of the original SimulGenVAE that this version has no use for are "
                     "ignored: RESERVED (lines 5, 6), Stretch (line 7), num_aug_f (line 8), rec_graph (line 9)"]


def test_the_original_simulgenvae_s_header_and_pipeline_keys_are_named_never_mistaken_for_ours(case):
    notes = []
    load(case, "Common params\n" + BASE + "mae_weight 0.1\nhier_weight 0.5\nuse_pca 0\n", warn=notes)
    assert len(notes) == 1
    assert "Common (line 1), mae_weight (line 6), hier_weight (line 7), use_pca (line 8)" in notes[0]
    assert "did you mean" not in notes[0]


E2E = "input_type csv\nparam_dir p.csv\nuse_e2e_training 1\nuse_latent_regularization 1\nlatent_reg_weight 0.001\n"


def test_lc_alpha_of_the_original_keeps_the_ratio_of_field_and_latent_weights(case):
    notes = []
    config = load(case, BASE + E2E + "LC_alpha 1000\n", warn=notes)
    assert config.latent_reg_weight == pytest.approx(1e-6)
    assert notes == [f"{CONDITION_FILE}:10: note: LC_alpha 1000 (the original's weight of the field loss) is read as "
                     "latent_reg_weight 0.001 / 1000 = 1e-06, which keeps the ratio of the two weights (AdamW's steps "
                     "barely depend on the loss's overall scale). To silence this, write 'latent_reg_weight 1e-06' and "
                     "remove LC_alpha"]
    assert load(case, BASE + E2E + "LC_alpha 1\n", warn=notes).latent_reg_weight == 0.001


def test_lc_alpha_without_latent_regularisation_is_said_to_have_no_effect(case):
    notes = []
    config = load(case, BASE + E2E.replace("use_latent_regularization 1", "use_latent_regularization 0")
                  + "LC_alpha 1000\n", warn=notes)
    assert config.latent_reg_weight == 0.001
    assert any("LC_alpha has no effect" in note for note in notes)
    assert not any("did you mean 'alpha'" in note for note in notes)


@pytest.mark.parametrize("value", ["0", "big"])
def test_a_bad_lc_alpha_names_its_line(case, value):
    error = refused(case, BASE + E2E + f"LC_alpha {value}\n")
    assert_names(error, CONDITION_FILE, line=10, fix_words=["LC_alpha"])
    twice = refused(case, BASE + E2E + "LC_alpha 10\nLC_alpha 1000\n")
    assert_names(twice, CONDITION_FILE, line=11, fix_words=["keep one"])


def write_images(folder, sizes):
    folder.mkdir()
    for number, (width, height) in enumerate(sizes, start=1):
        Image.fromarray(np.full((height, width), 40 * number, dtype=np.uint8)).save(folder / f"design_{number}.png")


IMAGES = "input_type image\nparam_dir images\n"


def test_image_size_auto_is_the_images_own_size_when_square_and_alike(case):
    write_images(case / "images", [(24, 24)] * 3)
    notes = []
    assert load(case, BASE + IMAGES, warn=notes).image_size == 24
    assert notes == [f"{CONDITION_FILE}: note: image_size auto: the images are 24 x 24 pixels and are used at that "
                     "size"]
    assert load(case, BASE + IMAGES + "image_size 32\n", warn=notes).image_size == 32
    assert load(case, BASE + IMAGES + "image_size AUTO\n", warn=notes).image_size == 24


def test_image_size_auto_resizes_to_the_original_s_256_when_images_differ(case):
    write_images(case / "images", [(24, 24), (32, 24)])
    notes = []
    assert load(case, BASE + IMAGES, warn=notes).image_size == 256
    assert len(notes) == 1 and "design_1.png 24 x 24, design_2.png 32 x 24) are not all square" in notes[0]
    assert "set image_size" in notes[0]


@pytest.mark.parametrize("size, settings, why", [
    (300, IMAGES, "larger than 256"),
    (24, "input_type image_vit\nparam_dir images\n", "not a multiple of vit_patch_size 16"),
])
def test_image_size_auto_takes_256_for_large_images_or_a_size_the_vit_cannot_cut(case, size, settings, why):
    write_images(case / "images", [(size, size)] * 2)
    notes = []
    assert load(case, BASE + settings, warn=notes).image_size == 256
    assert len(notes) == 1 and why in notes[0]


def test_image_size_auto_without_images_is_the_value_earlier_configs_hold(case):
    notes = []
    assert load(case, BASE, warn=notes).image_size == 256 and notes == []


def test_a_param_dir_with_a_leading_slash_is_the_case_folder_s_as_in_the_original(case):
    (case / "images").mkdir()
    notes = []
    assert load(case, BASE + "input_type image\nparam_dir /images\n", warn=notes).param_dir == "images"
    assert notes == [f"{CONDITION_FILE}: note: param_dir /images does not exist; using images in the case folder (the "
                     "original SimulGenVAE's paths are relative to it even with a leading /)"]
    real = load(case, BASE + f"input_type image\nparam_dir {case / 'images'}\n").param_dir
    assert real == str(case / "images")  # an absolute path that exists stays
    assert load(case, BASE + "input_type image\nparam_dir /elsewhere\n").param_dir == "/elsewhere"  # as given


def test_alpha_auto_needs_a_likelihood_loss(case):
    assert load(case, BASE + "Loss_type 2\n").fixed_recon_weight is None
    error = refused(case, BASE + "Loss_type 3\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["alpha"])
    assert "Loss_type 3" in error.problem
    assert load(case, BASE + "Loss_type 3\nalpha 1e6\n").fixed_recon_weight == 1e6


def test_unknown_loss_type_is_refused(case):
    error = refused(case, BASE + "Loss_type 5\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["Loss_type"])
    assert "1, 2, 3, 4" in error.problem


@pytest.mark.parametrize("line", ["Batch_size", "Batch_size:", "Batch_size   # sixteen"])
def test_key_without_value_is_refused(case, line):
    error = refused(case, BASE + line + "\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["Batch_size <value>"])
    assert "no value" in error.problem


def test_key_given_twice_is_refused(case):
    error = refused(case, BASE + "Batch_size 8\nbatch_size 4\n")
    assert_names(error, CONDITION_FILE, line=6)
    assert "twice" in error.problem and "Batch_size" in error.problem


def test_preset_out_of_range_lists_existing_presets(case):
    error = refused(case, preset_index=3)
    assert_names(error, PRESET_FILE, fix_words=["--preset"])
    assert "1..1" in error.problem and "3" in error.problem


def test_bad_preset_filter_line_is_refused(case):
    (case / PRESET_FILE).write_text("header\n1\n0\n64 x 32\n16 32\n")
    error = refused(case)
    assert_names(error, PRESET_FILE, line=4, fix_words=["numbers"])
    assert "64 x 32" in error.problem


def test_preset_file_not_header_plus_4k_lines_is_refused(case):
    (case / PRESET_FILE).write_text("header\n1\n0\n16 8\n16 32\n2\n")
    error = refused(case)
    assert_names(error, PRESET_FILE, fix_words=["4 lines"])
    assert "5 non-blank lines" in error.problem


@pytest.mark.parametrize("path", [PRESET_FILE, CONDITION_FILE], ids=["preset", "condition"])
def test_missing_file_is_refused(case, path):
    (case / path).unlink()
    error = refused(case)
    assert_names(error, path, fix_words=["case folder"])
    assert "not found" in error.problem


@pytest.mark.parametrize("extra, words", [
    ("Dim2_red 7\n", "Dim2_red"),
    ("Dim3_end 21\n", "Dim3_end"),
    ("Dim3_start 20\n", "Dim3_start"),
    ("num_var 3\n", "num_var"),
    ("beta_hold_fraction 0.9\nbeta_ramp_end_fraction 0.5\n", "beta_hold_fraction"),
], ids=["dim2_red_above_dim2", "crop_end_outside", "crop_start_at_end", "num_var_not_dividing", "beta_out_of_order"])
def test_inconsistent_keys_are_refused_at_the_offending_line(case, extra, words):
    error = refused(case, BASE + extra)
    assert_names(error, CONDITION_FILE, line=len(BASE.splitlines()) + 1, fix_words=[words])


def test_num_var_must_divide_the_kept_nodes_not_all_nodes(case):
    error = refused(case, BASE + "num_var 2\nDim3_start 1\n")
    assert "19 nodes kept" in error.problem
    assert load(case, BASE + "num_var 2\nDim3_start 2\n").n_nodes_used == 18


@pytest.mark.parametrize("value", ["1", "0"])
def test_val_fraction_must_leave_both_sides(case, value):
    error = refused(case, BASE + f"val_fraction {value}\n")
    assert_names(error, CONDITION_FILE, line=5, fix_words=["val_fraction"])


# ---------------------------------------------------------------------------------------------- warnings and notes
def test_unknown_key_warns_with_nearest_key(case):
    warnings = []
    config = load(case, BASE + "Batch_sise 8\n", warn=warnings)
    assert config.batch_size == 16
    assert len(warnings) == 1
    assert "Batch_sise" in warnings[0] and "did you mean 'Batch_size'" in warnings[0]
    assert f"{CONDITION_FILE}:5" in warnings[0]


def test_unknown_key_without_a_near_match_warns_without_guess(case):
    warnings = []
    load(case, BASE + "zzzqqq 1\n", warn=warnings)
    assert len(warnings) == 1 and "unknown key 'zzzqqq'" in warnings[0] and "did you mean" not in warnings[0]


def test_conditioner_key_gets_no_effect_note(case):
    warnings = []
    load(case, BASE + "n_epoch 100\n", warn=warnings)
    assert len(warnings) == 1
    assert "n_epoch" in warnings[0] and "no effect" in warnings[0] and "unknown" not in warnings[0]


# ------------------------------------------------------------------------------------------------ the command line
def test_cli_turns_bad_config_into_exit_2_and_one_line(case, capsys):
    from modules.cli import main

    write_condition(case, BASE + "Batch_size abc\n")
    assert main([]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error:") and str(CONDITION_FILE) in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (case / "output").exists() and not (case / "model_save").exists()


def test_cli_bad_device_flag_exits_2_on_a_gpu_machine(case, monkeypatch, capsys):
    import torch

    from modules.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--device=cuda:x"]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.slow
def test_script_exits_2_without_traceback(tmp_path):
    write_case(tmp_path, extra="Loss_type 5\n")
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--preset=1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(CONDITION_FILE) in lines[0]


# ------------------------------------------------------------------------------------------ latent-conditioner keys
@pytest.mark.parametrize("lines, line_no, words", [
    ("input_type csv\n", 5, "needs param_dir"),
    ("input_type csv\nparam_dir p.csv\nparam_data_type png\n", 7, "does not fit input_type csv"),
    ("input_type image\nparam_dir images\nparam_data_type .csv\n", 7, "does not fit input_type image"),
    ("input_type image_vit\nparam_dir images\nimage_size 64\nvit_patch_size 12\n", 8, "does not divide image_size"),
    ("input_type image_vit\nparam_dir images\nvit_dim 100\nvit_heads 8\n", 8, "vit_heads 8 does not divide"),
    ("use_e2e_training 1\n", 5, "input_type is none"),
    ("input_type mlp\n", 5, "must be one of none, csv, image, image_vit"),
    ("input_type csv\nparam_dir p.csv\ne2e_loss_function L2\n", 7, "must be one of MSE, MAE, Huber, SmoothL1"),
    ("latent_conditioner_dropout_rate 1\n", 5, "must be >= 0 and < 1"),
])
def test_conditioner_key_problems_name_the_line(case, lines, line_no, words):
    with pytest.raises(InputError) as error:
        load(case, BASE + lines)
    assert f"condition.txt:{line_no}:" in error.value.message() and words in error.value.message()


def test_conditioner_keys_are_typed_with_defaults(case):
    config = load(case, BASE + "input_type image\nparam_dir images\nparam_data_type JPG\nn_epoch 7\n")
    assert config.input_type == "image" and config.lc_epochs == 7 and config.condition_extension == ".jpg"
    assert config.image_size == 256 and config.lc_batch_size == 16 and config.use_e2e_training == 0
    assert load(case, BASE + "input_type csv\nparam_dir p.csv\n").condition_extension == ".csv"
    assert config.latent_size == 32 + 2 * 8


@pytest.mark.parametrize("lines, key, reason", [
    ("vit_depth 3\n", "vit_depth", "input_type is not image_vit"),
    ("input_type csv\nparam_dir p.csv\nimage_size 64\n", "image_size", "not an image type"),
    ("input_type csv\nparam_dir p.csv\ne2e_loss_function MAE\n", "e2e_loss_function", "use_e2e_training is 0"),
    ("input_type image\nparam_dir i\nuse_e2e_training 1\nlatent_reg_weight 1\n", "latent_reg_weight",
     "use_latent_regularization is 0"),
])
def test_a_key_that_cannot_act_in_this_setup_gets_a_note(case, lines, key, reason):
    warnings = []
    load(case, BASE + lines, warn=warnings)
    assert len(warnings) == 1 and f"'{key}' has no effect because" in warnings[0] and reason in warnings[0]


# ------------------------------------------------------------------------------- time steps for the encoder's levels
@pytest.mark.parametrize("filters, text, line, words, fix_words", [
    ("16 8", BASE + "Dim2_red 1\n", 5, ["Dim2_red = 1", "level 2 of 2", "width 8"], ["at least 3 time steps"]),
    ("16 8 8 8", BASE, 2, ["Dim2 = 6", "level 4 of 4", "16 8 8 8"], ["at least 9 time steps", "preset.txt"]),
    ("16 8 8 8", BASE.replace("Dim2 6", "Dim2 8"), 2, ["Dim2 = 8"], ["at least 9 time steps"]),
    ("8", BASE.replace("Dim2 6", "Dim2 1"), 2, ["Dim2 = 1", "level 1 of 1"], ["at least 2 time steps"]),
    ("16 4", BASE.replace("Dim2 6", "Dim2 2"), 2, ["Dim2 = 2", "width 4"], ["at least 3 time steps"]),
], ids=["dim2_red_1", "dim2_6_four_levels", "dim2_8_four_levels", "one_step_one_level", "dim2_2_width_4"])
def test_too_few_time_steps_for_the_encoder_levels_are_refused(case, filters, text, line, words, fix_words):
    (case / PRESET_FILE).write_text(f"header\n1\n0\n{filters}\n16 32\n")
    error = refused(case, text)
    assert_names(error, CONDITION_FILE, line=line, fix_words=fix_words)
    for word in words:
        assert word in error.problem


@pytest.mark.parametrize("filters, text", [
    ("16 8", BASE),  # conftest's write_case: lengths 6, 3
    ("16 8 8 8", BASE.replace("Dim2 6", "Dim2 9")),  # lengths 9, 5, 3, 2
    ("16 16", BASE + "Dim2_red 1\n"),  # 1 step, but two channels per GroupNorm group
    ("12", BASE.replace("Dim2 6", "Dim2 1")),  # gcd(12, 8) = 4 groups of 3 channels
    ("8 16", BASE.replace("Dim2 6", "Dim2 2")),  # the 1-step level is the 16-wide one
    ("64 64 32", BASE.replace("Dim2 6", "Dim2 24")),  # the demo case's preset
])
def test_enough_time_steps_for_the_encoder_levels_are_accepted(case, filters, text):
    (case / PRESET_FILE).write_text(f"header\n1\n0\n{filters}\n16 32\n")
    assert load(case, text).encoder_filters == tuple(int(word) for word in filters.split())


def test_time_step_check_refuses_exactly_what_the_model_cannot_run(case):
    """check_consistency against the real model: a train-mode step of one design fails exactly when it refuses."""
    import dataclasses

    import torch

    from modules.config.checks import check_consistency
    from modules.models.vae import HierarchicalVAE, ModelSpec

    base = load(case)
    for filters in [(8,), (16,), (12,), (16, 8), (16, 16), (8, 16), (16, 4), (16, 8, 8), (32, 16, 8, 4)]:
        for steps in range(1, 6):
            config = dataclasses.replace(base, n_steps=steps, n_steps_used=steps, encoder_filters=filters)
            try:
                check_consistency(config, CONDITION_FILE, {})
                accepted = True
            except InputError:
                accepted = False
            model = HierarchicalVAE(ModelSpec(n_steps=steps, n_nodes=6, projection_rank=4, filters=filters,
                                              main_latent_dim=4, level_latent_dim=2, blocks_per_level=1,
                                              head_hidden=8)).train()
            try:
                out = model(torch.randn(1, steps, 6))
                (out["recon"].sum() + out["kl_levels"].sum()).backward()
                runs = True
            except ValueError as error:
                assert "Expected more than 1 value" in str(error)
                runs = False
            assert accepted == runs, (filters, steps)
