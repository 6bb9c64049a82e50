"""Train the hierarchical VAE on the case in the working directory, then save the model, latents and reports.

Read top to bottom: train_vae() is the whole run; each step below it is one named function.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from modules import evaluate, plots
from modules.augment import augment_batch
from modules.checkpoint import read_payload, save_checkpoint, save_model
from modules.data import (SimulationArray, batch_order, find_dataset, make_batches, scan_and_fit_scaler,
                          split_indices)
from modules.losses import vae_loss
from modules.outputs import CHECKPOINT_DIR, MODEL_DIR, MODEL_FILE, OUTPUT_DIR
from modules.pod import pod_node_basis
from modules.run_log import RunLog
from modules.runtime import seed_everything
from modules.schedules import beta_at, lr_factor
from modules.vae import HierarchicalVAE, ModelSpec

LAST_CHECKPOINT_SAVES = 10  # besides the end of training; "best" is saved whenever validation improves


@dataclass
class Case:
    """The dataset, its split and scaler, and batch sources for both splits."""

    array: SimulationArray
    train_indices: np.ndarray
    val_indices: np.ndarray
    scaler: object
    train: object
    val: object


def train_vae(config, runtime, case: Case, say=print) -> dict:
    """Full VAE training run on a prepared case. Returns the reconstruction report (also written to output/)."""
    seed_everything(config.seed)
    model = build_model(config, case, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(
        epoch, config.epochs, config.warmup_fraction, config.lr_cycles, config.lr_min / config.lr))
    say(f"Training on {runtime.device}: {len(case.train_indices)} training and {len(case.val_indices)} validation "
        f"designs of {case.array.sample_shape[0]} steps x {case.array.sample_shape[1]} nodes; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters")
    log = RunLog(OUTPUT_DIR)
    best_val_loss = math.inf
    for epoch in range(config.epochs):
        beta = beta_at(epoch, config.epochs, config.init_beta_divisor, config.beta_hold_fraction,
                       config.beta_ramp_end_fraction)
        train_stats = train_epoch(model, case, optimizer, config, beta, epoch)
        val_stats = validate(model, case.val, config)
        log.log(epoch + 1, epoch_record(train_stats, val_stats, beta, optimizer.param_groups[0]["lr"]))
        scheduler.step()
        if val_stats["loss"] < best_val_loss:
            best_val_loss = val_stats["loss"]
            save_checkpoint(CHECKPOINT_DIR / "best.pt", model, config, case.scaler, optimizer, scheduler, epoch + 1,
                            best_val_loss)
        if is_save_epoch(epoch, config.epochs):
            save_checkpoint(CHECKPOINT_DIR / "last.pt", model, config, case.scaler, optimizer, scheduler, epoch + 1,
                            best_val_loss)
        report_progress(say, epoch, config, train_stats, val_stats, beta)
    log.close()
    model.load_state_dict(read_payload(CHECKPOINT_DIR / "best.pt")["state_dict"])
    return finish(model, case, config, runtime, log.history, say)


def prepare_case(config, runtime) -> Case:
    """Open and check the dataset (one streamed pass: shape, NaN/Inf, scaler fit on training designs only)."""
    array = SimulationArray(find_dataset(config.data_no), config)
    train_indices, val_indices = split_indices(config.n_designs, config.val_fraction, config.seed)
    scaler = scan_and_fit_scaler(array, train_indices, config.n_vars)
    batches = [make_batches(array, indices, scaler, runtime.device, bool(config.load_all), config.num_workers)
               for indices in (train_indices, val_indices)]
    return Case(array, train_indices, val_indices, scaler, *batches)


def build_model(config, case: Case, runtime) -> HierarchicalVAE:
    """A fresh VAE whose node projections start as the training data's POD basis."""
    model = HierarchicalVAE(ModelSpec.from_config(config))
    mean, modes, scales = pod_node_basis(case.array, case.train_indices, case.scaler,
                                         model.spec.projection_rank, config.seed)
    model.init_node_projections(mean, modes, scales)
    return model.to(runtime.device)


def train_epoch(model, case: Case, optimizer, config, beta: float, epoch: int) -> dict:
    """One pass over the training designs. Sums stay on the device: one host sync per epoch, not per step."""
    model.train()
    order = batch_order(len(case.train), config.batch_size, shuffle=True, seed=config.seed, epoch=epoch)
    sums = None
    for batch in tqdm(case.train.batches(order), total=len(order), desc=f"epoch {epoch + 1}/{config.epochs}",
                      leave=False, disable=None):
        inputs, targets = augment_batch(batch, config)
        outputs = [model(inputs) for _ in range(config.recon_samples)]
        loss, parts = vae_loss(outputs, targets, config, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        sums = accumulate(sums, loss.detach(), parts, len(batch))
    return averages(sums, len(case.train))


@torch.no_grad()
def validate(model, batches, config) -> dict:
    """Validation along the posterior-mean path; 'loss' uses beta = 1 so epochs compare fairly as beta ramps up."""
    model.eval()
    sums = None
    for batch in batches.batches(batch_order(len(batches), config.batch_size, shuffle=False, seed=0, epoch=0)):
        loss, parts = vae_loss([model(batch, sample=False)], batch, config, beta=1.0)
        sums = accumulate(sums, loss, parts, len(batch))
    return averages(sums, len(batches))


def accumulate(sums, loss, parts, batch_size: int):
    values = torch.cat([loss.reshape(1), parts["recon"].reshape(1), parts["kl_main"].reshape(1), parts["kl_levels"]])
    values = values * batch_size
    return values if sums is None else sums + values


def averages(sums, count: int) -> dict:
    values = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
    return {"loss": values[0], "recon": values[1], "kl_main": values[2], "kl_levels": values[3:]}


def epoch_record(train_stats, val_stats, beta, lr) -> dict:
    record = {"beta": beta, "lr": lr}
    for split, stats in (("train", train_stats), ("val", val_stats)):
        record.update({f"{split}/loss": stats["loss"], f"{split}/recon": stats["recon"],
                       f"{split}/kl_main": stats["kl_main"]})
        record.update({f"{split}/kl_level{i}": kl for i, kl in enumerate(stats["kl_levels"])})
    return record


def is_save_epoch(epoch: int, epochs: int) -> bool:
    every = max(1, epochs // LAST_CHECKPOINT_SAVES)
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def report_progress(say, epoch, config, train_stats, val_stats, beta) -> None:
    every = config.log_every or max(1, config.epochs // 20)
    if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
        say(f"epoch {epoch + 1:>5}/{config.epochs}  train loss {train_stats['loss']:.4g}  "
            f"recon {train_stats['recon']:.3g}  val recon {val_stats['recon']:.3g}  "
            f"KL main {train_stats['kl_main']:.3g}  KL levels {sum(train_stats['kl_levels']):.3g}  beta {beta:.3g}")


def finish(model, case: Case, config, runtime, history, say) -> dict:
    """Write the usable model, the latents of every design, the split, the report and the plots."""
    save_model(MODEL_FILE, model, config, case.scaler)
    case.scaler.save(MODEL_DIR / "scaler.json")
    all_designs = make_batches(case.array, np.arange(config.n_designs), case.scaler, runtime.device, False,
                               config.num_workers)
    main_latents, level_latents = evaluate.encode_designs(model, all_designs, config.batch_size)
    np.save(MODEL_DIR / "latent_vectors.npy", main_latents)
    np.save(MODEL_DIR / "xs.npy", level_latents)
    evaluate.save_split(MODEL_DIR / "split.json", case.train_indices, case.val_indices)
    report = evaluate.reconstruction_report(model, case, config)
    evaluate.write_report(report, OUTPUT_DIR, say)
    if config.plot < 2:
        plots.training_plots(history, model, case, config, OUTPUT_DIR, show=config.plot == 0, say=say)
    return report
