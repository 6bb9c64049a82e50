"""The snapshot codec before the VAE: where the nodes' positions are known and field_codec_epochs > 0, a codec
(models.snapshot_codec) is fitted on the training designs' snapshots and kept when its codes, compressed to the VAE's
K latent numbers per design by a POD of the code trajectories (what the VAE's POD path then starts from), reconstruct
the validation designs better than POD of the fields with K modes (what the VAE's POD path starts from without it).
The comparison says both errors; a codec that loses is dropped, so the VAE never starts worse than POD at its latent
size. Where POD already reconstructs the validation designs below CODEC_FLOOR, no codec is fitted: it could not win;
one that is more than LOSING_MARGIN times worse than POD a CHECK_SHARE of the way through its fit is stopped there."""
import copy
import hashlib
import logging
import time

import numpy as np
import torch

from modules.data.batches import in_order
from modules.data.case import Case
from modules.data.field_layout import node_positions, read_field_layout
from modules.machine.processes import any_rank, barrier
from modules.models.neural_field import node_columns
from modules.models.pod import design_pod_basis, pod_node_basis
from modules.models.pod_path import PODPath
from modules.models.snapshot_codec import SnapshotCodec
from modules.models.vae import ModelSpec
from modules.storage.paths import CODEC_FIT_CHECKPOINT
from modules.storage.runs import note_time
from modules.training.field_fitter import FitCheckpoint, SampledFieldFit, fit_sampled_field

log = logging.getLogger(__name__)

COMPARED_NODES = 256  # nodes of each variable per time step at which the codec and POD are compared
# mean squared error (scaled units, the fields in [-0.7, 0.7]) below which POD leaves a codec nothing to win: a sine
# network fitted in float32 has not come within ten times of it on any family measured (its best: 1.3e-5, on a
# near-linear beam where POD reached 1.8e-13), so fitting one there is time spent on a certain loser
CODEC_FLOOR = 1e-6
# a codec is scored a CHECK_SHARE of the way through its passes and stopped where its validation error is more than
# LOSING_MARGIN times POD's (docs/model.md: its error then against its final one, where it wins and where it loses)
CHECK_SHARE = 0.25
LOSING_MARGIN = 20.0


def chosen_codec(config, case: Case, runtime, spec: ModelSpec, node_basis, run=None, resume: bool = False):
    """(a trained snapshot codec, the VAE's starting bases in its code space (code_bases)) when one was trained and
    reconstructs the validation designs from spec.latent_size numbers each better than POD with as many modes;
    (None, None) otherwise. Said either way. Every DDP rank trains the same codec; rank 0's choice is everyone's.
    Third: the fields' design POD with spec.latent_size modes (models.pod.design_pod_basis) where the comparison
    computed it, so that a run that keeps the fields does not stream the data for it again; None otherwise. The time
    spent on the codec, its fit and the comparison, goes to the run record (storage.runs.note_time). The fit is saved
    after every pass (CODEC_FIT_CHECKPOINT) and, with resume, continued from there."""
    if not config.field_codec_epochs:
        return None, None, None
    positions = node_positions(read_field_layout(config))
    if positions is None:
        log.info("note: no snapshot codec: where the nodes are is not known (grid_shape, mesh_file or node_coordinates "
                 "would let one be tried); the VAE runs on the fields")
        return None, None, None
    size = spec.latent_size
    field_design_basis = design_pod_basis(case.array, case.train_indices, case.scaler, *node_basis[:2], size)
    field_path = pod_path_of(config.n_steps_used, node_basis, field_design_basis, runtime.device)
    pod_error = validation_errors({"pod": lambda fields: field_path.decode(field_path.encode(fields))}, case,
                                  config, config.seed)["pod"]
    if pod_error < CODEC_FLOOR:
        log.info(f"No snapshot codec: POD with {size} modes reconstructs the validation designs with a mean squared "
                 f"error of {pod_error:.4g} (scaled units), below what a codec reaches ({CODEC_FLOOR:g}); the VAE "
                 "runs on the fields")
        return None, None, field_design_basis
    began = time.perf_counter()
    codec, stopped = fit_codec(positions, node_basis, case, config, runtime, run, resume, pod_error, size)
    if stopped is not None:
        note_time(run, "snapshot codec", time.perf_counter() - began, kept=False)
        return None, None, field_design_basis
    code_space, codec_error = compressed_error(codec, case, config, runtime, size)
    kept = any_rank(runtime.is_main and codec_error < pod_error, runtime)
    log.info(f"The validation designs from {size} numbers each: mean squared error {codec_error:.4g} (scaled units) "
             f"through the snapshot codec against {pod_error:.4g} for POD with {size} modes; the VAE runs on "
             + ("the codec's codes" if kept else "the fields (the codec is dropped)"))
    note_time(run, "snapshot codec", time.perf_counter() - began, kept)
    if not kept:
        return None, None, field_design_basis
    return codec, code_space, field_design_basis


def compressed_error(codec, case, config, runtime, size: int):
    """(the VAE's starting bases in the codec's code space (code_bases), the validation designs' mean squared error,
    scaled units, through the codec with their codes compressed to size numbers per design by those bases)."""
    code_node_basis, code_design_basis = code_bases(encoded_designs(codec, case, config), case.train_indices, size,
                                                    config.seed)
    code_path = pod_path_of(config.n_steps_used, code_node_basis, code_design_basis, runtime.device)
    error = validation_errors({"codec": lambda fields: code_path.decode(code_path.encode(codec.encode(fields)))},
                              case, config, config.seed, codec)["codec"]
    return (code_node_basis, code_design_basis), error


class CodeArray:
    """An array [N, T, C] held in memory (codes, or a generated case's fields), read as models.pod and the
    evaluation's baselines read a dataset (sample_shape, read(indices, steps))."""

    def __init__(self, codes: np.ndarray):
        self.codes, self.sample_shape = codes, codes.shape[1:]

    def read(self, indices, steps=slice(None)):
        return self.codes[np.asarray(indices)][:, steps]


class Unscaled:
    """The scaler of data that is already scaled (codes): transform is the identity."""

    @staticmethod
    def transform(values):
        return values


def fit_codec(positions, node_basis, case, config, runtime, run=None, resume: bool = False, pod_error=None, size=0):
    """A codec fitted on the training designs' scaled snapshots (training.field_fitter, field_codec_epochs passes),
    encoder and field together: each snapshot's node-POD coefficients (node_basis: (mean, modes, scales) of
    models.pod.pod_node_basis, the encoder's input projection) -> its code -> the field at the sampled nodes. Then
    its codes are standardised on the training snapshots and it is frozen. Every DDP rank fits the same codec (and
    DDP starts all ranks from rank 0's); the main one saves the fit after every pass (CODEC_FIT_CHECKPOINT, in run's
    record), which every rank continues from with resume. pod_error: POD's validation error with size modes; a
    CHECK_SHARE of the way through, a codec whose own (its codes compressed to size numbers) is more than
    LOSING_MARGIN times it is stopped there.
    Returns (the codec, frozen, None), or (None, the passes made) where it was stopped."""
    device = runtime.device
    n_steps, n_train = config.n_steps_used, len(case.train_indices)
    passes = config.field_codec_epochs
    fit = SampledFieldFit(passes=passes, check_after=max(1, round(CHECK_SHARE * passes)) if pod_error else 0)

    def losing(codec, coefficients):
        """Whether the codec is losing by more than LOSING_MARGIN: the main process decides, for every process."""
        if not runtime.is_main:
            return any_rank(False, runtime)
        trial = copy.deepcopy(codec)  # the fit goes on from the codec as it is: its code statistics are set on a copy
        trial.set_code_statistics(trial.raw_codes(coefficients))
        error = compressed_error(trial, case, config, runtime, size)[1]
        verdict = any_rank(error > LOSING_MARGIN * pod_error, runtime)
        log.info(f"The snapshot codec after {fit.check_after} of {fit.passes} passes: mean squared error {error:.4g} "
                 f"against {pod_error:.4g} for POD; " + (f"more than {LOSING_MARGIN:g} times worse, it is stopped and "
                                                         "the VAE runs on the fields" if verdict else "going on"))
        return verdict

    shape = (config.n_nodes_used, config.n_vars, node_basis[1].shape[1], positions.shape[1])
    # the node basis is a digest of the training data as scaled: a fit of other data or another scaling differs
    basis = hashlib.sha256(b"".join(part.detach().cpu().numpy().tobytes() for part in node_basis)).hexdigest()
    checkpoint = FitCheckpoint(CODEC_FIT_CHECKPOINT, {
        "codec": list(shape), "seed": config.seed, "passes": fit.passes, "check_after": fit.check_after,
        "node_basis_sha256": basis,
        "train_indices": [int(i) for i in case.train_indices]}, resume, fit_of="snapshot codec",
        writes=runtime.is_main, run_id=None if run is None else run.id, config=config.to_dict(),
        after_read=lambda: barrier(runtime))

    def build():
        codec = SnapshotCodec(*shape).to(device)
        codec.set_projection(*(part.to(device) for part in node_basis))
        codec.field.set_coordinates(positions)
        return codec

    def predict(codec, snapshots, nodes, coefficients):
        codes = codec.raw_codes(coefficients)[:, None]
        return codec.field(codes, None if nodes is None else nodes[:, None])[:, 0]

    sampled = config.n_nodes_used // config.n_vars > fit.nodes
    log.info(f"Training a snapshot codec on the {n_train * n_steps} time steps of the {n_train} training designs "
             f"({fit.passes} passes, {f'{fit.nodes} random nodes' if sampled else 'every node'} of each time step) ...")
    began = time.perf_counter()
    field_shape = (n_steps, config.n_nodes_used, config.n_vars)
    codec, coefficients, stopped_after = fit_sampled_field(build, predict, case.train, n_train, field_shape, fit,
                                                           config.batch_size, config.seed, device,
                                                           encode=SnapshotCodec.coefficients, losing=losing,
                                                           checkpoint=checkpoint)
    if stopped_after is not None:
        return None, stopped_after
    with torch.no_grad():
        codec.set_code_statistics(codec.raw_codes(coefficients))
    log.info(f"The snapshot codec trained in {time.perf_counter() - began:.0f} s")
    return codec.requires_grad_(False), None


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
def validation_errors(reconstructions: dict, case, config, seed: int, codec=None) -> dict:
    """{name: mean squared error, scaled units, over the validation designs} of each reconstruction, all at the same
    COMPARED_NODES random nodes of every time step (every node where fewer; the nodes depend on seed alone, so two
    calls compare alike). reconstructions {name: fields [b, T, M] -> fields, or with codec its codes [b, T, C], which
    codec decodes at those nodes only, so that it decodes a bounded number of values per design on any mesh}."""
    n_steps, n_nodes, n_vars = config.n_steps_used, config.n_nodes_used, config.n_vars
    generator = torch.Generator().manual_seed(seed)
    order = list(in_order(len(case.val_indices), config.batch_size))
    sums, count = dict.fromkeys(reconstructions, 0.0), 0
    for fields in case.val.batches(order):
        fields = fields.float()
        nodes = None
        if n_nodes // n_vars > COMPARED_NODES:
            nodes = torch.randint(n_nodes // n_vars, (len(fields), n_steps, COMPARED_NODES),
                                  generator=generator).to(fields.device)
        pick = (lambda values: values) if nodes is None else (
            lambda values: values.gather(2, node_columns(nodes, n_nodes, n_vars)))
        truth = pick(fields)
        for name, reconstruct in reconstructions.items():
            values = codec.decode(reconstruct(fields), nodes) if codec is not None else pick(reconstruct(fields))
            sums[name] += float(((values - truth) ** 2).sum())
        count += truth.numel()
    return {name: total / count for name, total in sums.items()}
