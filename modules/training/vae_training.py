"""The VAE's training: build_model() (its POD start, on the snapshot codec's codes where the codec wins:
training.codec_choice), its job for the training loop (the loss of a batch, the validation numbers, the state a
checkpoint holds) and train_vae(), which runs it and saves the usable model."""
import logging
import time
from dataclasses import replace

import numpy as np
import torch

from modules.config.keys import LOSS_NAMES
from modules.data.augment import augment_batch
from modules.data.batches import in_order, on_device
from modules.data.case import Case
from modules.data.scaling import HIGH, LOW
from modules.errors import InputError
from modules.evaluation import latent_health
from modules.evaluation.metrics import as_percent
from modules.machine.memory import MemoryWatch
from modules.machine.processes import shard, sum_over_ranks
from modules.machine.reproducibility import seed_everything
from modules.models.pod import design_pod_basis, pod_node_basis
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.storage.model_files import read_payload, save_checkpoint, save_model
from modules.storage.model_folder import save_vae_companions
from modules.storage.paths import BEST_CHECKPOINT, LAST_CHECKPOINT, MODEL_DIR, MODEL_FILE, OUTPUT_DIR
from modules.storage.runs import note_time
from modules.training.codec_choice import chosen_codec
from modules.training.loop import run_training
from modules.training.losses import loss_of_uniform_error, optimal_noise_std, vae_loss, validation_loss
from modules.training.schedules import beta_at, lr_factor

log = logging.getLogger(__name__)


def train_vae(config, runtime, case: Case, run=None, resume=None, watch=None, codec_fit: bool = False):
    """Train the VAE on a prepared case, from scratch or, with resume (a checkpoint path checked by
    training.state.read_checkpoint), from where that checkpoint stood. Every rank trains; the main process (given the
    run record, where its TensorBoard events go) then saves the best epoch's model, its scaler and the split in
    model_save/ and returns (the final Progress, the per-epoch log records); the other ranks return None. watch (a
    machine.memory.MemoryWatch) says the peak memory of the POD basis and of the training. codec_fit (without
    resume): the snapshot codec's fit continues from its checkpoint (a run stopped before the VAE's first one)."""
    seed_everything(config.seed)
    watch = watch or MemoryWatch(runtime.device, speaks=False)
    with watch.phase("the POD basis" if resume is None else "the model"):
        model = build_model(config, case, runtime, pod_start=resume is None,
                            spec=None if resume is None else ModelSpec.from_dict(read_payload(resume)["spec"]),
                            run=run, codec_fit=codec_fit)
    job = VAETraining(model, case, config, runtime)
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    log.info(f"Training on {runtime.device}{processes}: {len(case.train_indices)} training and "
             f"{len(case.val_indices)} validation designs of {case.array.crop.steps_said} x "
             f"{case.array.sample_shape[1]} nodes; {sum(p.numel() for p in job.model.parameters()):,} parameters")
    began = time.perf_counter()
    with watch.phase("the VAE's training"):
        progress, history = run_training(job, config, runtime, run, resume)
    if not runtime.is_main:
        return None
    # the network's epochs are time on the surrogate kept only when one of them is kept
    note_time(run, "VAE network", time.perf_counter() - began, kept=progress.best_epoch > 0)
    alone = ": the frozen POD path alone" + ("" if job.model.codec is None else " on the snapshot codec's codes")
    kept = (f"epoch {progress.best_epoch}" if progress.best_epoch else
            "the starting state (no epoch of training did better on the validation designs"
            + (alone if job.model.pod is not None else "") + ")")
    log.info(f"Best validation reconstruction {as_percent(progress.best_score)} (mean relative L2 error): {kept}; "
             "that VAE is kept")
    job.model.load_state_dict(read_payload(BEST_CHECKPOINT)["state_dict"])
    save_model(MODEL_FILE, job.model, config, case.scaler, run.id)
    save_vae_companions(MODEL_DIR, case)
    return progress, history


def build_model(config, case: Case, runtime, pod_start=True, spec=None, run=None, codec_fit=False) -> HierarchicalVAE:
    """A fresh VAE whose node projections start as the training data's POD basis and, with pod_path 1, whose frozen
    POD path is the training designs' design POD (pod_start; a resumed run loads its weights and buffers instead, so
    the POD passes over the data are skipped, and gives its checkpoint's spec: with or without a codec).

    Where the nodes' positions are known and field_codec_epochs > 0, a snapshot codec is trained first and kept when
    it reconstructs the validation designs from the VAE's latent size better than POD does (chosen_codec,
    said either way); the VAE then runs on its codes, with all of the above in code space. run: the run record the
    time spent on the POD start and the codec goes to (storage.runs.note_time; None: not recorded). codec_fit: the
    codec's fit continues from its checkpoint."""
    spec = spec or ModelSpec.from_config(config)
    if not pod_start:
        return HierarchicalVAE(spec).to(runtime.device)
    began = time.perf_counter()
    node_basis = pod_node_basis(case.array, case.train_indices, case.scaler, spec.projection_rank, config.seed)
    pod_seconds = time.perf_counter() - began
    codec, code_space, field_design_basis = chosen_codec(config, case, runtime, spec, node_basis, run, codec_fit)
    if codec is None:
        model = HierarchicalVAE(spec)
        model.init_node_projections(*node_basis)
        if model.pod is not None:  # pod_modes is the latent size: a codec that lost was compared with this very POD
            if field_design_basis is None:
                began = time.perf_counter()
                field_design_basis = design_pod_basis(case.array, case.train_indices, case.scaler, *node_basis[:2],
                                                      spec.pod_modes)
                pod_seconds += time.perf_counter() - began
            model.start_pod_path(*node_basis[:2], *field_design_basis)
        note_time(run, "POD start", pod_seconds, kept=True)
        return model.to(runtime.device)
    note_time(run, "POD start", pod_seconds, kept=True)  # the node basis the codec was fitted on
    model = HierarchicalVAE(replace(spec, codec=codec.code_size, codec_modulation=codec.field.modulation))
    model = model.to(runtime.device)
    model.codec.load_state_dict(codec.state_dict())
    code_node_basis, code_design_basis = code_space
    model.init_node_projections(*(part.to(runtime.device) for part in code_node_basis))
    if model.pod is not None:
        model.start_pod_path(*(part.to(runtime.device) for part in code_node_basis[:2]),
                             *(part.to(runtime.device) for part in code_design_basis[:3]), code_design_basis[3])
    return model


def beta_of(config, position: float) -> float:
    """The KL weight at a position in epochs (an optimiser step's: epoch + fraction of it done)."""
    return beta_at(position, config.epochs, config.init_beta_divisor, config.beta_hold_fraction,
                   config.beta_ramp_end_fraction)


def physical_relative_l2(recon, fields, scaler) -> torch.Tensor:
    """[B] float64: ||recon - fields|| / ||fields|| over each design's whole field, both given scaled and compared in
    physical units (evaluation.metrics.relative_l2 on the device). Squares in float32, sums in float64."""
    simulated = scaler.inverse(fields)
    difference = scaler.inverse(recon).sub_(simulated).flatten(1)
    error2 = difference.square_().sum(dim=1, dtype=torch.float64)
    norm2 = simulated.flatten(1).square().sum(dim=1, dtype=torch.float64)
    return error2.sqrt() / norm2.sqrt().clamp_min(1e-30)


class VAETraining:
    """The VAE as the training loop trains it. Its loss parts are [loss, recon, kl_main, kl_level..., recon_var...]
    (loss_parts)."""

    name, watched, log_part = "VAE", "recon", "vae"
    # the state kept is the one that reconstructs the validation designs best by the report's measure (the mean over
    # designs of the relative L2 error of the whole field, physical units); the loss, KL included, only breaks ties
    chosen_by = "recon_relative_l2"
    best_path, last_path, metrics_file = BEST_CHECKPOINT, LAST_CHECKPOINT, OUTPUT_DIR / "metrics.csv"

    def __init__(self, model, case: Case, config, runtime):
        self.model, self.case, self.config, self.runtime = model, case, config, runtime
        self.epochs, self.patience, self.batch_size = config.epochs, config.patience, config.batch_size
        self.start_patience = config.start_patience
        self.peak_lr, self.weight_decay = config.lr, config.weight_decay
        # the likelihood's variables: the fields' n_vars, or one with a codec (models.vae)
        self.n_train, self.n_parts = len(case.train), 3 + config.n_levels + len(model.noise_std)
        self.collapse = CollapseWatch(config)
        # no rise of the validation error below that of an error of 1 % of the scaled range counts as divergence
        self.divergence_floor = loss_of_uniform_error(0.01 * (HIGH - LOW), LOSS_NAMES[config.loss_type],
                                                      config.huber_delta)
        self.noise = None

    def learning_rate(self, position: float) -> float:
        config = self.config
        return config.lr * lr_factor(position, config.epochs, config.warmup_fraction, config.lr_cycles,
                                     config.lr_min / config.lr)

    def training_batches(self, epoch: int, micro_batches):
        """(scaled fields [b, T, M], their dataset indices on the device) per micro-batch, in order."""
        self.noise = epoch_noise(self.config, epoch, self.runtime)
        order = [positions for positions, _ in micro_batches]
        designs = on_device([self.case.train_indices[positions] for positions in order], self.runtime.device)
        return zip(self.case.train.batches(order), designs)

    def batch_loss(self, trainer, batch, step):
        """(loss to step on, detached parts) of a micro-batch at the KL weight of the step's position: each design's
        noise is its own (epoch_noise), whatever the batching; the step's generator is not needed (augment_batch
        draws from torch's seeded global generator).

        With alpha auto the parts are in nats per design, but the step is taken on nats per value (divided by T * M,
        a constant factor AdamW's steps barely depend on): per design, the gradients of a large field would overflow
        float16 long before the loss scaler could back off; per value they stay of order one."""
        fields, designs = batch
        inputs, targets = augment_batch(fields, self.config)
        targets = self.model.encode_data(targets)  # the codes, with a codec: the loss is taken on what the VAE runs on
        with self.runtime.autocast():
            outputs = [trainer(inputs, noise=draw[designs], decode=False) for draw in self.noise]
        loss, parts = vae_loss(outputs, targets, self.config, beta_of(self.config, step.position),
                               self.model.noise_std)
        step_loss = loss if self.config.fixed_recon_weight is not None else loss / targets[0].numel()
        return step_loss, loss_parts(loss.detach(), parts)

    def averages(self, sums, count: int) -> dict:
        values = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
        levels = 3 + self.config.n_levels
        return {"loss": values[0], "recon": values[1], "kl_main": values[2], "kl_levels": values[3:levels],
                "recon_vars": values[levels:]}

    @torch.no_grad()
    def finish_epoch(self, epoch: int, train_stats: dict, val_stats: dict) -> dict:
        """With alpha auto, the likelihood's noise scale becomes this epoch's validation error per variable (the
        maximum-likelihood scale for designs the model was not trained on; training.losses says why not the training
        error): the same on every rank, saved with the weights, so a resumed run goes on with it. Returns the
        epoch's log record."""
        if self.config.fixed_recon_weight is None:
            errors = torch.tensor(val_stats["recon_vars"], device=self.model.noise_std.device)
            self.model.noise_std.copy_(optimal_noise_std(errors, LOSS_NAMES[self.config.loss_type]))
        return self.record(epoch, train_stats, val_stats)

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation along the posterior-mean path, sharded over ranks; 'loss' uses beta = 1 so that epochs compare
        fairly while beta ramps up; 'recon_relative_l2' is the mean relative L2 error of the decoded fields in
        physical units (what the report calls the VAE's reconstruction error). 'latents' holds the collapse
        diagnostics (evaluation.latent_health)."""
        model, case, config, runtime = self.model, self.case, self.config, self.runtime
        model.eval()
        shards = [positions for positions, weight in (shard(p, runtime) for p in in_order(len(case.val),
                                                                                         config.batch_size)) if weight]
        losses = torch.zeros(self.n_parts, device=runtime.device)
        health = torch.zeros(3 * config.latent_size, device=runtime.device)
        relative_l2 = torch.zeros(1, device=runtime.device, dtype=torch.float64)
        for batch in case.val.batches(shards):
            with runtime.autocast():
                outputs = [model(batch, sample=False, decode=False)]
            loss, parts = vae_loss(outputs, model.encode_data(batch), config, 1.0, model.noise_std)
            losses += loss_parts(loss, parts) * len(batch)
            health += latent_health.batch_sums(outputs[0])
            relative_l2 += physical_relative_l2(model.decode_data(outputs[0]["recon"].float()), batch,
                                                case.scaler).sum()
        totals = sum_over_ranks(torch.cat([losses, health]), runtime)
        stats = self.averages(totals[:len(losses)], len(case.val))
        stats["recon_relative_l2"] = float(sum_over_ranks(relative_l2, runtime)) / len(case.val)
        kl_total = torch.tensor(stats["kl_main"] + sum(stats["kl_levels"]))
        data = model.spec.data_spec()
        values_per_variable = data.n_steps * data.n_nodes // data.n_vars
        stats["loss"] = float(validation_loss(torch.tensor(stats["recon_vars"]), kl_total, config, values_per_variable))
        stats["latents"] = latent_health.summarise(totals[len(losses):], len(case.val), config.main_latent_dim,
                                                   config.n_levels, config.level_latent_dim)
        return stats

    def record(self, epoch: int, train_stats: dict, val_stats: dict) -> dict:
        record = {"beta": beta_of(self.config, epoch), "val/recon_relative_l2": val_stats["recon_relative_l2"]}
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
            log.info(f"epoch {epoch + 1:>5}/{config.epochs}  train loss {train_stats['loss']:.4g}  "
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

    def __init__(self, config):
        self.first_epoch = int(config.beta_hold_fraction * config.epochs)
        self.collapsed = []

    def check(self, epoch: int, summary: dict) -> None:
        collapsed = latent_health.collapsed_groups(summary)
        new = [group for group in collapsed if group not in self.collapsed]
        if epoch >= self.first_epoch and new:
            log.warning(f"warning: epoch {epoch + 1}: {latent_health.collapse_warning(new, summary)}")
        self.collapsed = collapsed if epoch >= self.first_epoch else []
