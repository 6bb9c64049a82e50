"""DDP: real torchrun with the gloo backend trains the same model as one process, and writes each output once."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import (NETWORK_ALONE, REPO, column, design_parameters, free_port, one_and_two_processes, run_program,
                      smooth_fields, write_case, write_conditions)
from modules import cli
from modules.cli import main
from modules.data import case as case_module
from modules.machine.device import Runtime
from modules.machine.processes import shard

spec = importlib.util.spec_from_file_location("launch_ddp", REPO / "launch_ddp.py")
launch_ddp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_ddp)


@pytest.mark.slow
def test_two_gloo_processes_accumulating_half_batches_train_the_model_of_one_process_with_whole_batches(tmp_path):
    """Real torchrun with gloo: 2 processes, each taking its shard of every batch of 2 designs and accumulating 2
    such micro-batches per optimiser step (all-reduced only in the step's last one), train the model of 1 process
    with batches of 4; rank 0 alone speaks and writes."""
    for name in ("one", "two"):
        write_case(tmp_path / name, n=14, epochs=3, extra=NETWORK_ALONE)
    condition = tmp_path / "two" / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("Batch_size 4", "Batch_size 2") + "grad_accum_steps 2\n")
    _, double = one_and_two_processes(tmp_path)
    assert "torch.distributed.run --nproc_per_node=2" in double.stdout
    assert "gradient accumulation over 2 batch(es)" in double.stdout
    assert double.stdout.count("Training on cpu x 2 processes") == 1  # rank 0 alone speaks
    # Compared as a whole, not tensor by tensor: a conv bias that feeds a GroupNorm has a near-zero gradient, and
    # Adam turns the float noise of a different summation order into full-size steps there (one process run with
    # 1 and with 2 threads differs the same way).
    one = torch.load(tmp_path / "one" / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two" / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    difference = sum(torch.sum((one[k].float() - two[k].float()) ** 2) for k in one).sqrt()
    assert difference <= 1e-4 * sum(torch.sum(one[k].float() ** 2) for k in one).sqrt()
    single_losses, double_losses = (column(tmp_path / name / "output" / "metrics.csv", "train/loss")
                                    for name in ("one", "two"))
    assert np.allclose(single_losses, double_losses, rtol=1e-5)
    recon_one = np.load(tmp_path / "one" / "model_save" / "xs.npy")
    recon_two = np.load(tmp_path / "two" / "model_save" / "xs.npy")
    assert np.allclose(recon_one, recon_two, atol=1e-3)
    rows = (tmp_path / "two" / "output" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("epoch,")  # one writer: one header, one row per epoch
    assert not (tmp_path / "two" / "archive").exists()
    assert np.load(tmp_path / "two" / "model_save" / "latent_vectors.npy").shape == (14, 8)


def test_a_one_design_batch_on_two_ranks_keeps_both_in_step():
    positions = np.array([5])
    assert shard(positions, Runtime(torch.device("cpu"), 0, 2)) == (positions, 2.0)
    local, weight = shard(positions, Runtime(torch.device("cpu"), 1, 2))
    assert weight == 0.0 and list(local) == [5]


@pytest.mark.parametrize("batch, world", [(7, 3), (8, 2), (2, 4)])
def test_shards_cover_the_batch_once_and_weights_restore_the_batch_mean(batch, world):
    positions = np.arange(100, 100 + batch)
    shards = [shard(positions, Runtime(torch.device("cpu"), rank, world)) for rank in range(world)]
    used = [p for local, weight in shards if weight for p in local]
    assert sorted(used) == list(positions)
    # DDP averages the ranks' gradients: (1/K) * sum_r weight_r * mean_r must equal the batch mean.
    per_design = np.random.default_rng(0).normal(size=batch)
    ranks_mean = sum(w * per_design[local - 100].mean() for local, w in shards if w) / world
    assert ranks_mean == pytest.approx(per_design.mean())


def test_use_ddp_without_torchrun_is_a_clear_error(case, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--use_ddp"]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (case / "model_save").exists()


def test_launch_ddp_refuses_a_bad_config_before_starting_processes(tmp_path):
    write_case(tmp_path, extra="Batch_size -3\n")
    result = run_program([sys.executable, str(REPO / "launch_ddp.py"), "--gpus=2"], tmp_path)
    assert result.returncode == 2
    assert "Running:" not in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: input_data/condition.txt:")


def test_launch_ddp_builds_the_torchrun_command_from_its_flags():
    args = launch_ddp.build_parser().parse_args(["--gpus=4", "--preset=2", "--size=large", "--load_all=1",
                                                  "--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3",
                                                  "--master_port=1234"])
    command = launch_ddp.torchrun_command(args)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    for part in ("--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=1234",
                 "--use_ddp", "--preset=2", "--size=large", "--load_all=1"):
        assert part in command
    assert "--lc_only=1" in launch_ddp.torchrun_command(launch_ddp.build_parser().parse_args(["--gpus=2",
                                                                                               "--lc_only=1"]))
    assert launch_ddp.torchrun_command(launch_ddp.build_parser().parse_args(["--gpus=2", "--quiet"]))[-1] == "--quiet"
    assert "--quiet" not in launch_ddp.torchrun_command(launch_ddp.build_parser().parse_args(["--gpus=2"]))
    resumed = launch_ddp.torchrun_command(launch_ddp.build_parser().parse_args(["--gpus=2", "--resume"]))
    assert "--resume=last" in resumed and cli.build_parser().parse_args(["--resume=last"]).resume == cli.AUTO_RESUME
    assert "--resume=run/last.pt" in launch_ddp.torchrun_command(launch_ddp.build_parser().parse_args(
        ["--gpus=2", "--resume=run/last.pt"]))


@pytest.mark.parametrize("extra, flags, words", [
    # the original SimulGenVAE's condition.txt names another VAE to train through; a full run refuses it
    ("input_type csv\nparam_dir p.csv\nuse_e2e_training 1\ne2e_vae_model_path elsewhere/vae\n", [],
     "e2e_vae_model_path names another VAE"),
    ("input_type image\nparam_dir images\n", [], "image folder not found"),
    ("", ["--lc_only=1"], "input_type is none"),
    ("input_type csv\nparam_dir p.csv\n", ["--lc_only=1"], "p.csv"),
    ("", ["--resume"], "checkpoints/last.pt"),
], ids=["other-vae", "no-images", "lc-only-without-conditioner", "lc-only-missing-csv", "resume-without-checkpoint"])
def test_launch_ddp_refuses_what_the_main_script_refuses_without_starting_a_process(tmp_path, monkeypatch, capsys,
                                                                                    extra, flags, words):
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path, extra=extra)
    monkeypatch.setattr(launch_ddp, "run_forwarding_sigterm", lambda command: pytest.fail("torchrun was started"))
    assert launch_ddp.main(["--gpus=2", *flags]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and words in error
    assert sorted(path.name for path in tmp_path.iterdir()) == [".simulgen.lock", "input_data", "preset.txt"]


def test_launch_ddp_checks_a_preloading_case_without_preloading_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path, extra="load_all 1\n")
    monkeypatch.setattr(case_module, "check_preload_fits", lambda *args: pytest.fail("the launcher preloaded"))
    monkeypatch.setattr(case_module, "make_batches", lambda array, indices, scaler, runtime, preload: pytest.fail(
        "the launcher preloaded") if preload else None)
    started = []
    monkeypatch.setattr(launch_ddp, "run_forwarding_sigterm", lambda command: started.append(command) or 0)
    assert launch_ddp.main(["--gpus=2"]) == 0
    assert "--load_all" not in " ".join(started[0])  # the workers read load_all 1 from condition.txt themselves


def test_launch_ddp_refuses_the_original_launcher_s_flag_and_names_ours(capsys):
    assert launch_ddp.main(["--gpus=2", "--train_latent_conditioner_only=1"]) == 2
    assert capsys.readouterr().err == ("error: command line: --train_latent_conditioner_only is the original "
                                       "SimulGenVAE launcher's flag. Fix: use --lc_only=1\n")


def test_launch_ddp_refuses_size_with_lc_only(capsys):
    assert launch_ddp.main(["--gpus=2", "--lc_only=1", "--size=large"]) == 2
    assert "--size sets the VAE" in capsys.readouterr().err


class RecordingBatches:
    """Wraps a batch source and records which positions a rank asked for."""

    def __init__(self, source):
        self.source, self.asked = source, []

    def __len__(self):
        return len(self.source)

    def batches(self, order):
        self.asked.extend(list(positions) for positions in order)
        return self.source.batches(order)


def test_each_rank_reads_only_its_shard_of_every_batch(case, monkeypatch):
    """train_epoch on 'rank r of 2' asks the data source for rank r's shard only; the two ranks cover the epoch."""
    import dataclasses

    import torch.distributed as dist

    from modules.config import load_config
    from modules.data.batches import batch_order
    from modules.data.case import prepare_case
    from modules.training.guard import Guard, StopRequest
    from modules.training.loop import train_epoch
    from modules.training.optimizer_step import Updater, make_optimizer
    from modules.training.state import Progress
    from modules.training.vae_training import VAETraining, build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        config = load_config(1)
        asked = {}
        for rank in (0, 1):
            runtime = Runtime(torch.device("cpu"), rank, 2)
            prepared = prepare_case(config, runtime)
            recorder = RecordingBatches(prepared.train)
            model = build_model(config, prepared, runtime)
            updater = Updater(model, make_optimizer(model.parameters(), 1e-3, 0.0), runtime, grad_clip=0)
            job = VAETraining(model, dataclasses.replace(prepared, train=recorder), config, runtime)
            train_epoch(job, model, updater, Guard(config, runtime, StopRequest()), Progress(), config, runtime)
            asked[rank] = recorder.asked
    finally:
        dist.destroy_process_group()
    global_batches = batch_order(len(prepared.train), config.batch_size, True, config.seed, 0)
    assert len(global_batches[-1]) == 1  # 9 training designs in batches of 4: rank 1 idles (weight 0) at the end
    for rank in (0, 1):
        expected = [list(p[rank::2]) or list(p[:1]) for p in global_batches]
        assert [list(p) for p in asked[rank]] == expected
    trained_on = [p for rank in (0, 1) for batch in global_batches for p in batch[rank::2]]
    assert sorted(trained_on) == list(range(len(prepared.train)))


@pytest.mark.slow
def test_a_conditioner_ensemble_trains_end_to_end_under_two_gloo_processes_like_one(tmp_path):
    """The conditioner's training (an ensemble of 2 MLPs, end to end through the frozen decoder) shards its batches
    like the VAE's: 2 processes train the conditioner of 1; the main process alone chooses, calibrates and saves. Then
    --lc_only=1 through launch_ddp retrains it alone on the saved VAE, the earlier conditioner archived once."""
    parameters = design_parameters(14, seed=3)
    for name in ("one", "two"):
        write_case(tmp_path / name, n=14, epochs=2, data=smooth_fields(14, 6, 20, parameters=parameters),
                   extra="input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 3\nuse_e2e_training 1\n"
                         "latent_conditioner_dropout_rate 0\nlatent_conditioner_batch 4\nlatent_gp 0\nlatent_rbf 0\n"
                         "lc_ensemble 2\n"
                         + NETWORK_ALONE)  # the VAEs the conditioners train on must match too (see NETWORK_ALONE)
        write_conditions(tmp_path / name, parameters)
    _, double = one_and_two_processes(tmp_path)
    assert double.stdout.count("Training the MLP conditioner") == 1
    assert double.stdout.count("The ensemble of 2 MLPs") == 1
    one = torch.load(tmp_path / "one" / "model_save" / "latent_conditioner", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two" / "model_save" / "latent_conditioner", weights_only=True)["state_dict"]
    assert any(key.startswith("members.1.") for key in two)
    difference = sum(torch.sum((one[k] - two[k]) ** 2) for k in one).sqrt()
    assert difference <= 1e-3 * sum(torch.sum(one[k] ** 2) for k in one).sqrt()
    assert len((tmp_path / "two" / "output" / "conditioner_metrics.csv").read_text().splitlines()) == 1 + 3
    again = run_program([sys.executable, str(REPO / "launch_ddp.py"), "--gpus=2", "--lc_only=1",
                         f"--master_port={free_port()}"], tmp_path / "two")
    assert again.returncode == 0, again.stderr
    assert "--lc_only=1" in again.stdout and again.stdout.count("The ensemble of 2 MLPs") == 1
    assert "Training on cpu x 2 processes" not in again.stdout  # the VAE is read, not trained again
    assert len(list((tmp_path / "two" / "archive").glob("*/model_save/latent_conditioner"))) == 1
    retrained = torch.load(tmp_path / "two" / "model_save" / "latent_conditioner", weights_only=True)["state_dict"]
    assert retrained.keys() == two.keys()
    assert len((tmp_path / "two" / "output" / "conditioner_metrics.csv").read_text().splitlines()) == 1 + 3


def test_leaving_the_process_group_frees_ddp_wrappers_first():
    """A DDP wrapper sits in a reference cycle; freed only at interpreter exit, its gloo work can abort the process
    (seen once as a rank killed by SIGABRT). stop_runtime collects it while the interpreter is alive."""
    import gc
    import weakref

    import torch.distributed as dist

    from modules.machine.processes import stop_runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    collecting = gc.isenabled()
    gc.disable()  # no automatic collection may hide the cycle
    try:
        wrapper = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
        wrapper(torch.ones(2, 3)).sum().backward()
        alive = weakref.ref(wrapper)
        cycle = {"wrapper": wrapper}
        cycle["itself"] = cycle  # whether DDP's own cycles form depends on the torch version and what ran before
        del wrapper, cycle
        assert alive() is not None
        stop_runtime()
        assert alive() is None and not dist.is_initialized()
    finally:
        if collecting:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
