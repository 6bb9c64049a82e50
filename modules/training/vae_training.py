"""The VAE's training: its job for the training loop (the loss of a batch, the validation numbers, the state a
checkpoint holds) and train_vae(), which runs it and saves the usable model.

Before it, the snapshot codec (models.snapshot_codec): where the nodes' positions are known and field_codec_epochs
> 0, build_model trains a codec on the training designs' snapshots (train_codec) and keeps it when its codes,
compressed to the VAE's K latent numbers per design by a POD of the code trajectories (what the VAE's POD path then
starts from), reconstruct the validation designs better than POD of the fields with K modes (what the VAE's POD path
starts from without it). The comparison says both errors; a codec that loses is dropped, so the VAE never starts
worse than POD at its latent size.
"""
import math
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from modules.data.augment import augment_batch
from modules.data.batches import in_order, on_device
from modules.data.case import Case, save_split
from modules.data.field_layout import node_positions, read_field_layout
from modules.data.scaling import HIGH, LOW
from modules.errors import InputError
from modules.evaluation import latent_health
from modules.models.neural_field import CODE, node_columns, sampled_pass
from modules.models.pod import design_pod_basis, pod_node_basis
from modules.models.pod_path import PODPath
from modules.models.snapshot_codec import SnapshotCodec
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.storage.model_files import read_payload, save_checkpoint, save_model
from modules.storage.paths import BEST_CHECKPOINT, LAST_CHECKPOINT, MODEL_DIR, MODEL_FILE, OUTPUT_DIR
from modules.training.distributed import any_rank, shard, sum_over_ranks
from modules.training.loop import run_training
from modules.training.losses import LOSS_NAMES, loss_of_uniform_error, optimal_noise_std, vae_loss, validation_loss
from modules.training.runtime import MemoryWatch, seed_everything
from modules.training.schedules import beta_at, lr_factor

CODEC_SNAPSHOTS = 64  # snapshots a step trains on, drawn at random across the training designs
CODEC_NODES = 256     # nodes of each variable a snapshot decodes in a step, at random (every node where fewer)
CODEC_LR = 1e-3       # Adam's peak learning rate, one-cycle schedule (10 % warm-up): the benchmark's


def train_vae(config, runtime, case: Case, run=None, resume=None, say=print, watch=None):
    """Train the VAE on a prepared case, from scratch or, with resume (a checkpoint path checked by
    training.state.read_checkpoint), from where that checkpoint stood. Every rank trains; the main process (given the
    run record, where its TensorBoard events go) then saves the best epoch's model, its scaler and the split in
    model_save/ and returns (the final Progress, the per-epoch log records); the other ranks return None. watch (a
    training.runtime.MemoryWatch) says the peak memory of the POD basis and of the training."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    watch = watch or MemoryWatch(runtime.device, None)
    with watch.phase("the POD basis" if resume is None else "the model"):
        model = build_model(config, case, runtime, pod_start=resume is None, say=say,
                            spec=None if resume is None else ModelSpec.from_dict(read_payload(resume)["spec"]))
    job = VAETraining(model, case, config, runtime, say)
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    say(f"Training on {runtime.device}{processes}: {len(case.train_indices)} training and "
        f"{len(case.val_indices)} validation designs of {case.array.crop.steps_said} x "
        f"{case.array.sample_shape[1]} nodes; {sum(p.numel() for p in job.model.parameters()):,} parameters")
    with watch.phase("the VAE's training"):
        progress, history = run_training(job, config, runtime, run, say, resume)
    if not runtime.is_main:
        return None
    alone = ": the frozen POD path alone" + ("" if job.model.codec is None else " on the snapshot codec's codes")
    kept = (f"epoch {progress.best_epoch}" if progress.best_epoch else
            "the starting state (no epoch of training did better on the validation designs"
            + (alone if job.model.pod is not None else "") + ")")
    say(f"Best validation loss {progress.best_val_loss:.4g}: {kept}; that VAE is kept")
    job.model.load_state_dict(read_payload(BEST_CHECKPOINT)["state_dict"])
    save_model(MODEL_FILE, job.model, config, case.scaler, run.id)
    case.scaler.save(MODEL_DIR / "scaler.json")
    save_split(MODEL_DIR / "split.json", case.train_indices, case.val_indices)
    return progress, history


def build_model(config, case: Case, runtime, pod_start=True, say=print, spec=None) -> HierarchicalVAE:
    """A fresh VAE whose node projections start as the training data's POD basis and, with pod_path 1, whose frozen
    POD path is the training designs' design POD (pod_start; a resumed run loads its weights and buffers instead, so
    the POD passes over the data are skipped, and gives its checkpoint's spec: with or without a codec).

    Where the nodes' positions are known and field_codec_epochs > 0, a snapshot codec is trained first and kept when
    it reconstructs the validation designs from the VAE's latent size better than POD does (chosen_codec,
    said either way); the VAE then runs on its codes, with all of the above in code space."""
    spec = spec or ModelSpec.from_config(config)
    if not pod_start:
        return HierarchicalVAE(spec).to(runtime.device)
    node_basis = pod_node_basis(case.array, case.train_indices, case.scaler, spec.projection_rank, config.seed)
    codec, code_space, field_design_basis = chosen_codec(config, case, runtime, spec, node_basis, say)
    if codec is None:
        model = HierarchicalVAE(spec)
        model.init_node_projections(*node_basis)
        if model.pod is not None:  # pod_modes is the latent size: a codec that lost was compared with this very POD
            if field_design_basis is None:
                field_design_basis = design_pod_basis(case.array, case.train_indices, case.scaler, *node_basis[:2],
                                                      spec.pod_modes)
            model.start_pod_path(*node_basis[:2], *field_design_basis)
        return model.to(runtime.device)
    model = HierarchicalVAE(replace(spec, codec=CODE)).to(runtime.device)
    model.codec.load_state_dict(codec.state_dict())
    code_node_basis, code_design_basis = code_space
    model.init_node_projections(*(part.to(runtime.device) for part in code_node_basis))
    if model.pod is not None:
        model.start_pod_path(*(part.to(runtime.device) for part in code_node_basis[:2]),
                             *(part.to(runtime.device) for part in code_design_basis[:3]), code_design_basis[3])
    return model


def chosen_codec(config, case: Case, runtime, spec: ModelSpec, node_basis, say):
    """(a trained snapshot codec, the VAE's starting bases in its code space (code_bases)) when one was trained and
    reconstructs the validation designs from spec.latent_size numbers each better than POD with as many modes;
    (None, None) otherwise. Said either way. Every DDP rank trains the same codec; rank 0's choice is everyone's.
    Third: the fields' design POD with spec.latent_size modes (models.pod.design_pod_basis) where the comparison
    computed it, so that a run that keeps the fields does not stream the data for it again; None otherwise."""
    if not config.field_codec_epochs:
        return None, None, None
    positions = node_positions(read_field_layout(config))
    if positions is None:
        say("note: no snapshot codec: where the nodes are is not known (grid_shape, mesh_file or node_coordinates "
            "would let one be tried); the VAE runs on the fields")
        return None, None, None
    codec = train_codec(positions, node_basis, case, config, runtime, say)
    size = spec.latent_size
    code_node_basis, code_design_basis = code_bases(encoded_designs(codec, case, config), case.train_indices, size,
                                                    config.seed)
    field_design_basis = design_pod_basis(case.array, case.train_indices, case.scaler, *node_basis[:2], size)
    codec_error, pod_error = validation_errors(
        codec, pod_path_of(config.n_steps_used, code_node_basis, code_design_basis, runtime.device),
        pod_path_of(config.n_steps_used, node_basis, field_design_basis, runtime.device), case, config, config.seed)
    kept = any_rank(runtime.is_main and codec_error < pod_error, runtime)
    say(f"The validation designs from {size} numbers each: mean squared error {codec_error:.4g} (scaled units) "
        f"through the snapshot codec against {pod_error:.4g} for POD with {size} modes; the VAE runs on "
        + ("the codec's codes" if kept else "the fields (the codec is dropped)"))
    if not kept:
        return None, None, field_design_basis
    return codec, (code_node_basis, code_design_basis), field_design_basis


class CodeArray:
    """Codes [N, T, C] held in memory, read as models.pod reads a dataset (sample_shape, read(indices))."""

    def __init__(self, codes: np.ndarray):
        self.codes, self.sample_shape = codes, codes.shape[1:]

    def read(self, indices):
        return self.codes[np.asarray(indices)]


class Unscaled:
    """The scaler of data that is already scaled (codes): transform is the identity."""

    @staticmethod
    def transform(values):
        return values


def train_codec(positions, node_basis, case, config, runtime, say) -> SnapshotCodec:
    """A codec trained on the training designs' scaled snapshots: field_codec_epochs passes over the N x T of them,
    each step on CODEC_SNAPSHOTS drawn at random across the designs, each decoded at CODEC_NODES random nodes per
    variable, mean squared error, encoder and field together (Adam, one-cycle). node_basis: (mean, modes, scales) of
    models.pod.pod_node_basis, the encoder's input projection. Each pass reads every training design once, in
    batch_size batches (models.neural_field.sampled_pass: the data stay streamed); the encoder's inputs are kept from
    the first pass, as are the field's output statistics. Repeatable
    for a seed on a device, so every DDP rank trains the same codec (and DDP starts all ranks from rank 0's)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = runtime.device
    codec = SnapshotCodec(config.n_nodes_used, config.n_vars, node_basis[1].shape[1], positions.shape[1]).to(device)
    codec.set_projection(*(part.to(device) for part in node_basis))
    codec.field.set_coordinates(positions)
    n_steps, n_train = config.n_steps_used, len(case.train_indices)
    snapshots = n_train * n_steps
    optimiser = torch.optim.Adam(codec.parameters(), CODEC_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, CODEC_LR, pct_start=0.1,
                                                   total_steps=config.field_codec_epochs *
                                                   math.ceil(snapshots / CODEC_SNAPSHOTS))
    sampled = config.n_nodes_used // config.n_vars > CODEC_NODES
    say(f"Training a snapshot codec on the {snapshots} time steps of the {n_train} training designs "
        f"({config.field_codec_epochs} passes, {f'{CODEC_NODES} random nodes' if sampled else 'every node'} of each "
        f"time step) ...")
    began = time.perf_counter()
    field_shape = (n_steps, config.n_nodes_used, config.n_vars)
    coefficients = None
    for index in range(config.field_codec_epochs):
        nodes, values, read = sampled_pass(case.train, n_train, field_shape, CODEC_NODES, config.batch_size,
                                           generator, device, codec.coefficients if coefficients is None else None)
        coefficients = read if coefficients is None else coefficients  # the same every pass: kept from the first
        if index == 0:
            codec.field.set_value_statistics(values)
        for batch in torch.randperm(snapshots, generator=generator).to(device).split(CODEC_SNAPSHOTS):
            codes = codec.raw_codes(coefficients[batch])[:, None]
            predicted = codec.field(codes, None if nodes is None else nodes[batch, None])[:, 0]
            loss = F.mse_loss(predicted, values[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    with torch.no_grad():
        codec.set_code_statistics(codec.raw_codes(coefficients))
    say(f"The snapshot codec trained in {time.perf_counter() - began:.0f} s")
    return codec.requires_grad_(False).eval()


@torch.no_grad()
def encoded_designs(codec, case, config) -> np.ndarray:
    """Every design's codes [N, T, C] (float32, host), training and validation designs alike (rows by dataset index;
    a design in neither split stays zero)."""
    codes = np.zeros((config.n_designs, config.n_steps_used, codec.code_mean.numel()), dtype=np.float32)
    for indices, source in ((case.train_indices, case.train), (case.val_indices, case.val)):
        order = list(in_order(len(indices), config.batch_size))
        for positions, fields in zip(order, source.batches(order)):
            codes[indices[positions]] = codec.encode(fields.float()).cpu().numpy()
    return codes


def code_bases(codes: np.ndarray, train_indices, rank: int, seed: int):
    """The VAE's starting bases in code space: (node basis (mean, modes, scales) over the C code numbers, the design
    POD with rank modes (models.pod.design_pod_basis's four values))."""
    array = CodeArray(codes)
    node_basis = pod_node_basis(array, train_indices, Unscaled, codes.shape[2], seed)
    return node_basis, design_pod_basis(array, train_indices, Unscaled, node_basis[0], node_basis[1], rank)


def pod_path_of(n_steps: int, node_basis, design_basis, device) -> PODPath:
    """A PODPath holding these bases (models.pod): what the VAE's frozen linear path starts as."""
    mean, modes, _ = node_basis
    path = PODPath(n_steps, len(mean), modes.shape[1], design_basis[1].shape[0])
    path.set_basis(mean, modes, *design_basis[:3])
    return path.to(device)


@torch.no_grad()
def validation_errors(codec, code_path: PODPath, field_path: PODPath, case, config, seed: int):
    """(mean squared error of the codec's reconstruction, that of POD's), scaled units, over the validation designs:
    the codec's from the codes passed through code_path (the codes' design POD), POD's from the fields passed through
    field_path. Both at the same CODEC_NODES random nodes of every time step (every node where fewer), so the codec
    decodes a bounded number of values per design on any mesh."""
    n_steps, n_nodes, n_vars = config.n_steps_used, config.n_nodes_used, config.n_vars
    generator = torch.Generator().manual_seed(seed)
    order = list(in_order(len(case.val_indices), config.batch_size))
    codec_sum, pod_sum, count = 0.0, 0.0, 0
    for fields in case.val.batches(order):
        fields = fields.float()
        nodes = None
        if n_nodes // n_vars > CODEC_NODES:
            nodes = torch.randint(n_nodes // n_vars, (len(fields), n_steps, CODEC_NODES),
                                  generator=generator).to(fields.device)
        pick = (lambda values: values) if nodes is None else (
            lambda values: values.gather(2, node_columns(nodes, n_nodes, n_vars)))
        truth = pick(fields)
        codes = code_path.decode(code_path.encode(codec.encode(fields)))
        codec_sum += float(((codec.decode(codes, nodes) - truth) ** 2).sum())
        pod_sum += float(((pick(field_path.decode(field_path.encode(fields))) - truth) ** 2).sum())
        count += truth.numel()
    return codec_sum / count, pod_sum / count


def beta_of(config, position: float) -> float:
    """The KL weight at a position in epochs (an optimiser step's: epoch + fraction of it done)."""
    return beta_at(position, config.epochs, config.init_beta_divisor, config.beta_hold_fraction,
                   config.beta_ramp_end_fraction)


class VAETraining:
    """The VAE as the training loop trains it. Its loss parts are [loss, recon, kl_main, kl_level..., recon_var...]
    (loss_parts)."""

    name, watched, log_part = "VAE", "recon", "vae"
    best_path, last_path, metrics_file = BEST_CHECKPOINT, LAST_CHECKPOINT, OUTPUT_DIR / "metrics.csv"

    def __init__(self, model, case: Case, config, runtime, say):
        self.model, self.case, self.config, self.runtime = model, case, config, runtime
        self.epochs, self.patience, self.batch_size = config.epochs, config.patience, config.batch_size
        self.peak_lr, self.weight_decay = config.lr, config.weight_decay
        # the likelihood's variables: the fields' n_vars, or one with a codec (models.vae)
        self.n_train, self.n_parts = len(case.train), 3 + config.n_levels + len(model.noise_std)
        self.collapse = CollapseWatch(config, say)
        # no rise of the validation error below that of an error of 1 % of the scaled range counts as divergence
        self.divergence_floor = loss_of_uniform_error(0.01 * (HIGH - LOW), LOSS_NAMES[config.loss_type],
                                                      config.huber_delta)
        self.say, self.epoch, self.noise = say, 0, None
        self.position = 0.0  # the optimiser step's position in epochs, set by the training loop (KL weight)

    def learning_rate(self, position: float) -> float:
        config = self.config
        return config.lr * lr_factor(position, config.epochs, config.warmup_fraction, config.lr_cycles,
                                     config.lr_min / config.lr)

    def training_batches(self, epoch: int, micro_batches):
        """(scaled fields [b, T, M], their dataset indices on the device) per micro-batch, in order."""
        self.epoch, self.noise = epoch, epoch_noise(self.config, epoch, self.runtime)
        order = [positions for positions, _ in micro_batches]
        designs = on_device([self.case.train_indices[positions] for positions in order], self.runtime.device)
        return zip(self.case.train.batches(order), designs)

    def batch_loss(self, trainer, batch, generator):
        """(loss to step on, detached parts) of a micro-batch: each design's noise is its own (epoch_noise), whatever
        the batching; the step's generator is not needed (augment_batch draws from torch's seeded global generator).

        With alpha auto the parts are in nats per design, but the step is taken on nats per value (divided by T * M,
        a constant factor AdamW's steps barely depend on): per design, the gradients at 200 x 95,008 values would
        overflow float16 long before the loss scaler could back off; per value they are of the size alpha 1e6 gave."""
        fields, designs = batch
        inputs, targets = augment_batch(fields, self.config)
        targets = self.model.encode_data(targets)  # the codes, with a codec: the loss is taken on what the VAE runs on
        with self.runtime.autocast():
            outputs = [trainer(inputs, noise=draw[designs], decode=False) for draw in self.noise]
        loss, parts = vae_loss(outputs, targets, self.config, beta_of(self.config, self.position),
                               self.model.noise_std)
        step_loss = loss if self.config.fixed_recon_weight is not None else loss / targets[0].numel()
        return step_loss, loss_parts(loss.detach(), parts)

    def averages(self, sums, count: int) -> dict:
        values = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
        levels = 3 + self.config.n_levels
        return {"loss": values[0], "recon": values[1], "kl_main": values[2], "kl_levels": values[3:levels],
                "recon_vars": values[levels:]}

    @torch.no_grad()
    def after_epoch(self, train_stats: dict, val_stats: dict) -> None:
        """With alpha auto, the likelihood's noise scale becomes this epoch's validation error per variable (the
        maximum-likelihood scale for designs the model was not trained on; training.losses says why not the training
        error): the same on every rank, saved with the weights, so a resumed run goes on with it."""
        if self.config.fixed_recon_weight is None:
            errors = torch.tensor(val_stats["recon_vars"], device=self.model.noise_std.device)
            self.model.noise_std.copy_(optimal_noise_std(errors, LOSS_NAMES[self.config.loss_type]))

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation along the posterior-mean path, sharded over ranks; 'loss' uses beta = 1 so that epochs compare
        fairly while beta ramps up. 'latents' holds the collapse diagnostics (evaluation.latent_health)."""
        model, case, config, runtime = self.model, self.case, self.config, self.runtime
        model.eval()
        shards = [positions for positions, weight in (shard(p, runtime) for p in in_order(len(case.val),
                                                                                         config.batch_size)) if weight]
        losses = torch.zeros(self.n_parts, device=runtime.device)
        health = torch.zeros(3 * config.latent_size, device=runtime.device)
        for batch in case.val.batches(shards):
            with runtime.autocast():
                outputs = [model(batch, sample=False, decode=False)]
            loss, parts = vae_loss(outputs, model.encode_data(batch), config, 1.0, model.noise_std)
            losses += loss_parts(loss, parts) * len(batch)
            health += latent_health.batch_sums(outputs[0])
        totals = sum_over_ranks(torch.cat([losses, health]), runtime)
        stats = self.averages(totals[:len(losses)], len(case.val))
        kl_total = torch.tensor(stats["kl_main"] + sum(stats["kl_levels"]))
        data = model.spec.data_spec()
        values_per_variable = data.n_steps * data.n_nodes // data.n_vars
        stats["loss"] = float(validation_loss(torch.tensor(stats["recon_vars"]), kl_total, config, values_per_variable))
        stats["latents"] = latent_health.summarise(totals[len(losses):], len(case.val), config.main_latent_dim,
                                                   config.n_levels, config.level_latent_dim)
        return stats

    def record(self, epoch: int, train_stats: dict, val_stats: dict) -> dict:
        record = {"beta": beta_of(self.config, epoch)}
        record.update({f"noise_std{v}": float(std) for v, std in enumerate(self.model.noise_std.cpu())})
        for split, stats in (("train", train_stats), ("val", val_stats)):
            record.update({f"{split}/loss": stats["loss"], f"{split}/recon": stats["recon"],
                           f"{split}/kl_main": stats["kl_main"]})
            record.update({f"{split}/kl_level{i}": kl for i, kl in enumerate(stats["kl_levels"])})
        return {**record, **latent_health.log_record(val_stats["latents"])}

    def report(self, epoch: int, train_stats: dict, val_stats: dict) -> None:
        config = self.config
        every = config.log_every or max(1, config.epochs // 20)
        if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
            self.say(f"epoch {epoch + 1:>5}/{config.epochs}  train loss {train_stats['loss']:.4g}  "
                     f"recon {train_stats['recon']:.3g}  val recon {val_stats['recon']:.3g}  "
                     f"KL main {train_stats['kl_main']:.3g}  KL levels {sum(train_stats['kl_levels']):.3g}  "
                     f"beta {beta_of(config, epoch):.3g}")
        self.collapse.check(epoch, val_stats["latents"])

    def save(self, path, training: dict) -> None:
        save_checkpoint(path, self.model, self.config, self.case.scaler, training)

    def resumable(self, path) -> dict:
        """A VAE checkpoint's payload, refused if the data changed since it was written."""
        payload = read_payload(path)
        if payload["scaler"] != self.case.scaler.to_dict():
            raise InputError(path, "was written for other data: the dataset's value ranges have changed since",
                             "resume with the data the run started with, or start a new run without --resume")
        return payload


def epoch_noise(config, epoch: int, runtime) -> torch.Tensor:
    """Reparameterisation noise [Recon_iter, N designs, noise_size] for one epoch, keyed by (seed, epoch, draw) and
    indexed by design: the same design gets the same noise however designs are batched, streamed or spread over
    ranks. One host-to-device copy per epoch, none per step."""
    draws = [np.random.default_rng([config.seed, epoch, draw]).standard_normal((config.n_designs, config.latent_size))
             for draw in range(config.recon_samples)]
    return torch.from_numpy(np.stack(draws).astype(np.float32)).to(runtime.device)


def loss_parts(loss, parts) -> torch.Tensor:
    """[loss, recon, kl_main, kl_level..., recon_var...] of a batch, each a mean over its designs."""
    return torch.cat([loss.reshape(1), parts["recon"].reshape(1), parts["kl_main"].reshape(1), parts["kl_levels"],
                      parts["recon_vars"]])


class CollapseWatch:
    """Warns when a level (or the main latent) collapses: once when it happens, not every epoch. Collapse is only
    judged once the KL weight starts rising (beta_hold_fraction): before, the KL term barely acts."""

    def __init__(self, config, say):
        self.first_epoch = int(config.beta_hold_fraction * config.epochs)
        self.say, self.collapsed = say, []

    def check(self, epoch: int, summary: dict) -> None:
        collapsed = latent_health.collapsed_groups(summary)
        new = [group for group in collapsed if group not in self.collapsed]
        if epoch >= self.first_epoch and new:
            self.say(f"warning: epoch {epoch + 1}: {latent_health.collapse_warning(new, summary)}")
        self.collapsed = collapsed if epoch >= self.first_epoch else []
