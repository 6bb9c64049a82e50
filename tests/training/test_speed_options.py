"""Mixed precision, gradient checkpointing, torch.compile, gradient accumulation and the adaptive device setup:
each option changes what actually runs, and each is reachable from the command line and condition.txt."""
import importlib.util
import sys
from contextlib import chdir

import pytest
import torch

from conftest import REPO, metrics, write_case
from modules.cli import main
from modules.config import load_config
from modules.errors import InputError
from modules.machine.device import Runtime, pick_precision, pick_readers, runtime_for
from modules.models import grad_checkpointing as recompute
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.models.grad_checkpointing import enable_grad_checkpointing
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.training.guard import Guard, StopRequest
from modules.training.optimizer_step import Updater, make_optimizer, micro_batches

SPEC = ModelSpec(n_steps=12, n_nodes=30, projection_rank=8, filters=(16, 16, 8), main_latent_dim=4,
                 level_latent_dim=2, blocks_per_level=2, head_hidden=16)


def trained_state(folder):
    """The weights at the end of training (the last checkpoint): the kept model may be the untrained starting state
    on the POD path, the same whatever the batching."""
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


def relative_difference(one: dict, two: dict) -> float:
    """||one - two|| / ||one|| over all tensors of two state dicts."""
    difference = sum(torch.sum((one[k].float() - two[k].float()) ** 2) for k in one).sqrt()
    return float(difference / sum(torch.sum(one[k].float() ** 2) for k in one).sqrt())


def train_in(folder, flags=(), n=11, epochs=2, batch=4):
    """A tiny case trained in-process (11 designs: 8 training, 3 validation)."""
    write_case(folder, n=n, epochs=epochs)
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("Batch_size 4", f"Batch_size {batch}"))
    with chdir(folder):
        assert main(list(flags)) == 0


# ------------------------------------------------------------------------------------------ precision choices
def test_amp_auto_is_float32_on_the_cpu_and_forced_precisions_are_kept():
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu)[0] is None
    assert pick_precision("off", cpu)[0] is None
    assert pick_precision("bf16", cpu)[0] is torch.bfloat16
    assert pick_precision("fp16", cpu)[0] is torch.float16


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_a_gpu_takes_bf16_where_supported_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert pick_precision("auto", torch.device("cuda", 0))[0] is expected


def test_amp_bf16_on_a_gpu_without_bf16_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    with pytest.raises(InputError, match="V100 has no bf16"):
        pick_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("cores, ranks, expected", [(16, 1, 4), (16, 4, 4), (16, 8, 2), (2, 1, 2), (2, 2, 2)])
def test_reader_threads_are_chosen_from_the_cores_unless_set(monkeypatch, cores, ranks, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    large, small = 4 * 2**30, 4 * 2**20
    assert pick_readers("auto", load_all=False, local_world_size=ranks, data_bytes=large) == (expected, "auto")
    assert pick_readers("auto", load_all=True, local_world_size=ranks, data_bytes=large) == (0, "data preloaded")
    assert pick_readers("auto", load_all=False, local_world_size=ranks, data_bytes=small) == \
        (0, "auto: the data is small (4 MB), read when needed")
    assert pick_readers("3", load_all=False, local_world_size=ranks, data_bytes=small) == (3, "num_workers set")


def test_the_device_setup_line_says_what_was_chosen(case):
    with chdir(case):
        config = load_config(1, {"amp": "bf16", "grad_checkpointing": 1, "grad_accum_steps": 3})
    runtime = runtime_for(torch.device("cpu"), config)
    assert runtime.amp_dtype is torch.bfloat16 and not runtime.pin_memory
    assert "precision bf16" in runtime.summary and "gradient checkpointing on" in runtime.summary
    assert "gradient accumulation over 3 batch(es)" in runtime.summary and "torch.compile off" in runtime.summary


def test_autocast_runs_the_forward_pass_in_the_chosen_precision_with_float32_kl_terms():
    model = HierarchicalVAE(SPEC)
    fields = torch.rand(3, 12, 30) - 0.5
    with Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16).autocast():
        out = model(fields)
    assert out["recon"].dtype == torch.bfloat16
    assert out["kl_main"].dtype == torch.float32 and out["kl_levels"].dtype == torch.float32
    with Runtime(torch.device("cpu")).autocast():
        assert model(fields)["recon"].dtype == torch.float32


def test_fp16_loss_scaling_skips_a_step_whose_gradient_overflowed():
    layer = torch.nn.Linear(4, 1)
    before = layer.weight.detach().clone()
    updater = Updater(layer, make_optimizer(layer.parameters(), 0.1, 0.0),
                      Runtime(torch.device("cpu"), amp_dtype=torch.float16), grad_clip=1.0)
    assert updater.scaler.is_enabled()
    scale = updater.scaler.get_scale()
    updater.backward(layer(torch.full((2, 4), float("inf"))).sum())
    assert updater.step() == 1.0
    assert torch.equal(layer.weight, before) and updater.scaler.get_scale() < scale
    updater.backward(layer(torch.ones(2, 4)).sum())
    assert updater.step() == 0.0
    assert not torch.equal(layer.weight, before)


def test_bf16_training_runs_and_differs_from_float32_by_rounding_only(tmp_path, capsys):
    train_in(tmp_path / "fp32", ["--amp=off"])
    train_in(tmp_path / "bf16", ["--amp=bf16"])
    assert "precision bf16 (amp bf16)" in capsys.readouterr().out
    fp32 = [float(row["train/recon"]) for row in metrics(tmp_path / "fp32")]
    bf16 = [float(row["train/recon"]) for row in metrics(tmp_path / "bf16")]
    assert fp32 != bf16  # autocast really ran
    # the first epoch differs by rounding (of the residual network: the POD path runs in float32 and fits this
    # smooth case almost exactly, so the error left is small and its rounding shows); later ones drift
    assert bf16[0] == pytest.approx(fp32[0], rel=0.15)
    assert bf16[-1] < bf16[0]  # and it trains
    assert all(v.dtype == torch.float32 for v in trained_state(tmp_path / "bf16").values())


# ------------------------------------------------------------------------------------ gradient checkpointing
def gradients(model, inputs, call):
    torch.manual_seed(0)
    model.zero_grad()
    call(model, inputs).float().pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, inputs, call) -> int:
    """Bytes autograd keeps for the backward pass (tensors saved outside checkpointed blocks)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call(model, inputs).float().pow(2).mean()
    return total


CASES = {
    "vae": (lambda: HierarchicalVAE(SPEC), lambda: torch.rand(3, 12, 30) - 0.5,
            lambda model, x: model(x, noise=torch.ones(len(x), model.noise_size))["recon"]),
    "mlp": (lambda: build_conditioner(ConditionerSpec("mlp", (5,), 10, (16, 32, 32), dropout=0.2)),
            lambda: torch.rand(4, 5), lambda model, x: model(x)),
    "cnn": (lambda: build_conditioner(ConditionerSpec("cnn", (1, 16, 16), 10, (8, 16), spatial_attention=True)),
            lambda: torch.rand(4, 1, 16, 16), lambda model, x: model(x)),
    "vit": (lambda: build_conditioner(ConditionerSpec("vit", (1, 16, 16), 10, (8,), vit_patch_size=4, vit_dim=16,
                                                      vit_depth=2, vit_heads=4, vit_drop_path=0.5)),
            lambda: torch.rand(4, 1, 16, 16), lambda model, x: model(x)),
}


@pytest.mark.parametrize("kind", CASES)
def test_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(kind):
    build, make_inputs, call = CASES[kind]
    torch.manual_seed(1)
    model, inputs = build().train(), make_inputs()
    plain = gradients(model, inputs, call)
    plain_bytes = saved_bytes(model, inputs, call)
    enable_grad_checkpointing(model)
    recomputed = gradients(model, inputs, call)
    assert plain.keys() == recomputed.keys()
    for name in plain:  # dropout and stochastic depth draw the same masks in the recomputation
        assert torch.allclose(plain[name], recomputed[name], rtol=1e-4, atol=1e-7), name
    assert saved_bytes(model, inputs, call) < 0.8 * plain_bytes


def test_grad_checkpointing_flag_reaches_the_model_and_changes_no_result(tmp_path, monkeypatch, capsys):
    train_in(tmp_path / "plain")
    calls = []
    real_checkpoint = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *args, **kwargs: calls.append(1) or
                        real_checkpoint(*args, **kwargs))
    train_in(tmp_path / "recompute", ["--grad_checkpointing"])
    assert calls and "gradient checkpointing on" in capsys.readouterr().out
    assert relative_difference(trained_state(tmp_path / "plain"), trained_state(tmp_path / "recompute")) < 1e-4


# ---------------------------------------------------------------------------------------- gradient accumulation
def test_micro_batch_weights_make_the_accumulated_gradient_the_groups_mean():
    group = torch.arange(7).numpy()
    parts = micro_batches(group, 3, Runtime(torch.device("cpu")))
    assert [list(p) for p, _ in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [w for _, w in parts] == pytest.approx([3 / 7, 3 / 7, 1 / 7])
    shards = micro_batches(group, 3, Runtime(torch.device("cpu"), rank=1, world_size=2))
    assert [list(p) for p, _ in shards] == [[1], [4], [6]]
    assert [w for _, w in shards] == pytest.approx([2 / 3 * 3 / 7, 2 / 3 * 3 / 7, 0.0])  # idle rank: weight 0


def test_two_accumulated_batches_of_4_train_like_one_batch_of_8(tmp_path):
    train_in(tmp_path / "eight", batch=8)
    train_in(tmp_path / "accumulated", ["--grad_accum_steps=2"])  # the case's Batch_size is 4
    train_in(tmp_path / "four")  # without accumulation, batches of 4 give another model
    one_batch = trained_state(tmp_path / "eight")
    accumulated = relative_difference(one_batch, trained_state(tmp_path / "accumulated"))
    assert accumulated < 1e-5 and relative_difference(one_batch, trained_state(tmp_path / "four")) > 30 * accumulated
    losses = {name: [float(row["train/loss"]) for row in metrics(tmp_path / name)] for name in ("eight", "accumulated",
                                                                                               "four")}
    assert losses["accumulated"] == pytest.approx(losses["eight"], rel=1e-5)
    assert losses["four"] != pytest.approx(losses["eight"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_compile_trains_through_a_compiled_graph_with_the_same_result(tmp_path, capsys):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_in(tmp_path / "eager", n=12, epochs=1, batch=3)  # 9 training designs: one batch shape
    train_in(tmp_path / "compiled", ["--compile"], n=12, epochs=1, batch=3)
    assert "torch.compile on" in capsys.readouterr().out
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert relative_difference(trained_state(tmp_path / "eager"), trained_state(tmp_path / "compiled")) < 1e-3
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- no host syncs
def test_an_epoch_copies_between_host_and_device_once_not_per_step(case, monkeypatch):
    """Counts the calls from the project's own code that would make the host wait for a GPU: copies to the host, and
    small copies from pageable memory to the device (PyTorch's optimiser reads its step counter, a CPU tensor, with
    .item(): not a device sync, and not the project's call)."""
    from modules.data.case import prepare_case
    from modules.training.loop import train_epoch
    from modules.training.state import Progress
    from modules.training.vae_training import VAETraining, build_model

    with chdir(case):
        config = load_config(1, {"load_all": 1})
        runtime = Runtime(torch.device("cpu"))
        prepared = prepare_case(config, runtime)
    model = build_model(config, prepared, runtime)
    updater = Updater(model, make_optimizer(model.parameters(), 1e-3, 0.0), runtime, config.grad_clip)
    syncs = []

    def counting(name, real):
        def method(self, *args, **kwargs):
            if str(REPO / "modules") in sys._getframe(1).f_code.co_filename:
                syncs.append(name)
            return real(self, *args, **kwargs)
        return method

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "as_tensor", counting("as_tensor", torch.as_tensor))
    guard = Guard(config, runtime, StopRequest())
    job = VAETraining(model, prepared, config, runtime)
    train_epoch(job, model, updater, guard, Progress(), config, runtime)
    guard.end_epoch()
    monkeypatch.undo()
    assert len(prepared.train) > 2 * config.batch_size  # several steps ran
    # to the device: the batches' positions and their designs (for the noise), each once for the whole epoch;
    # to the host: the epoch's averages, once, and the skipped-step counts, once (skipping itself stays on the device)
    assert syncs == ["as_tensor", "as_tensor", "cpu", "tolist", "tolist"]


# ----------------------------------------------------------------------------------------- keys, flags, launcher
def test_each_option_is_also_a_condition_key_and_the_flag_overrides_it(case, capsys):
    condition = case / "input_data" / "condition.txt"
    condition.write_text(condition.read_text() + "amp bf16\ngrad_checkpointing 1\ncompile 0\ngrad_accum_steps 2\n"
                         "num_workers 1\n")
    with chdir(case):
        config = load_config(1)
        assert (config.amp, config.grad_checkpointing, config.compile, config.grad_accum_steps, config.num_workers) \
            == ("bf16", 1, 0, 2, "1")
        overridden = load_config(1, {"amp": "off", "grad_checkpointing": 0, "grad_accum_steps": 1})
        assert (overridden.amp, overridden.grad_checkpointing, overridden.grad_accum_steps) == ("off", 0, 1)


@pytest.mark.parametrize("line, words", [("amp fp32", "amp = fp32 must be one of auto, bf16, fp16, off"),
                                         ("grad_accum_steps 0", "grad_accum_steps = 0 must be > 0"),
                                         ("num_workers many", "num_workers = many must be auto or a whole number"),
                                         ("compile 2", "compile = 2 must be one of 0, 1")])
def test_bad_option_values_are_one_line_naming_the_key(case, capsys, line, words):
    condition = case / "input_data" / "condition.txt"
    condition.write_text(condition.read_text() + line + "\n")
    with chdir(case):
        assert main([]) == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1 and not (case / "model_save").exists()


def test_speed_flags_are_refused_with_predict(case, capsys):
    with chdir(case):
        assert main(["--predict=x.csv", "--out=y.npy", "--amp=bf16"]) == 2
    assert "--amp only apply to training" in capsys.readouterr().err


def test_launch_ddp_passes_the_speed_flags_to_every_process():
    spec = importlib.util.spec_from_file_location("launch_ddp", REPO / "launch_ddp.py")
    launch_ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_ddp)
    args = launch_ddp.build_parser().parse_args(["--gpus=2", "--amp=bf16", "--grad_checkpointing", "--compile=0",
                                                 "--grad_accum_steps=4"])
    command = launch_ddp.torchrun_command(args)
    assert command[-4:] == ["--amp=bf16", "--grad_checkpointing=1", "--compile=0", "--grad_accum_steps=4"]
