"""The snapshot codec before the VAE: where the nodes' positions are known and field_codec_epochs > 0, a codec
(models.snapshot_codec) is fitted on the training designs' snapshots and kept when its codes, compressed to the VAE's
K latent numbers per design by a POD of the code trajectories (what the VAE's POD path then starts from), reconstruct
the validation designs better than POD of the fields with K modes (what the VAE's POD path starts from without it).
The comparison says both errors; a codec that loses is dropped, so the VAE never starts worse than POD at its latent
size. Where POD already reconstructs the validation designs below CODEC_FLOOR, no codec is fitted: it could not win.
A CHECK_SHARE of the way through the fit codecs of several code sizes and modulations are compared (a race:
fit_codec) and the best goes on, unless it is more than LOSING_MARGIN times worse than POD: then the fit is stopped
there."""
import copy
import hashlib
import logging
import time

import numpy as np
import torch

from modules.data.batches import in_order
from modules.data.case import Case
from modules.data.field_layout import node_positions, read_field_layout
from modules.machine.processes import any_rank, barrier, sum_over_ranks
from modules.models.neural_field import CODE, SHIFT, WARP, node_columns
from modules.models.pod import design_pod_basis, pod_node_basis
from modules.models.pod_path import PODPath
from modules.models.snapshot_codec import SnapshotCodec
from modules.models.vae import ModelSpec
from modules.storage.paths import codec_fit_checkpoint
from modules.storage.runs import note_time
from modules.training.field_fitter import FitCheckpoint, SampledFieldFit, fit_sampled_field, saved_passes

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
# the codecs a fit tries, each for a CHECK_SHARE of its passes before the best goes on (fit_codec): (code numbers per
# time step, the field's modulation). The best size differs between families, and so does the modulation: WARP
# draws a blob that stretches and turns at 0.6 times SHIFT's error, a 1-D front that steepens at 5 times it
# (docs/model.md)
CANDIDATES = ((4, WARP), (8, WARP), (16, WARP), (8, SHIFT))
# a quarter of the way the candidates stood within 1.5 times of one another on every case measured (docs/model.md):
# a first candidate more than RACE_SPREAD * LOSING_MARGIN times worse than POD is stopped without fitting the others
RACE_SPREAD = 2.0


def chosen_codec(config, case: Case, runtime, spec: ModelSpec, node_basis, run=None, resume: bool = False):
    """(a trained snapshot codec, the VAE's starting bases in its code space (code_bases)) when one was trained and
    reconstructs the validation designs from spec.latent_size numbers each better than POD with as many modes;
    (None, None) otherwise. Said either way. Every DDP rank trains the same codec; rank 0's choice is everyone's.
    Third: the fields' design POD with spec.latent_size modes (models.pod.design_pod_basis) where the comparison
    computed it, so that a run that keeps the fields does not stream the data for it again; None otherwise. The time
    spent on the codec, its fit and the comparison, goes to the run record (storage.runs.note_time). The fit is saved
    after every pass (codec_fit_checkpoint) and, with resume, continued from there."""
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
    codec, stopped, outraced = fit_codec(positions, node_basis, case, config, runtime, run, resume, pod_error, size)
    if stopped is not None:
        note_time(run, "snapshot codec", time.perf_counter() - began, kept=False)
        return None, None, field_design_basis
    if outraced:
        note_time(run, "snapshot codecs outraced", outraced, kept=False)
    code_space, codec_error = compressed_error(codec, case, config, runtime, size)
    kept = any_rank(runtime.is_main and codec_error < pod_error, runtime)
    log.info(f"The validation designs from {size} numbers each: mean squared error {codec_error:.4g} (scaled units) "
             f"through the snapshot codec against {pod_error:.4g} for POD with {size} modes; the VAE runs on "
             + ("the codec's codes" if kept else "the fields (the codec is dropped)"))
    note_time(run, "snapshot codec", time.perf_counter() - began - outraced, kept)
    if not kept:
        return None, None, field_design_basis
    return codec, code_space, field_design_basis


def compressed_error(codec, case, config, runtime, size: int):
    """(the VAE's starting bases in the codec's code space (code_bases), the validation designs' mean squared error,
    scaled units, through the codec with their codes compressed to size numbers per design by those bases)."""
    return compressed_errors([codec], case, config, runtime, size)[0]


def compressed_errors(codecs: list, case, config, runtime, size: int) -> list:
    """compressed_error of each codec, from one read of the designs for their codes and one of the validation
    designs for their errors."""
    spaces, paths = [], {}
    for index, (codec, codes) in enumerate(zip(codecs, encoded_designs(codecs, case, config))):
        space = code_bases(codes, case.train_indices, size, config.seed, min(config.projection_rank, codec.code_size))
        spaces.append(space)
        paths[index] = pod_path_of(config.n_steps_used, *space, runtime.device)

    def through(index):
        codec, path = codecs[index], paths[index]
        return lambda fields: path.decode(path.encode(codec.encode(fields)))

    errors = validation_errors({index: through(index) for index in range(len(codecs))}, case, config, config.seed,
                               dict(enumerate(codecs)))
    return [(space, errors[index]) for index, space in enumerate(spaces)]


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
    its codes are standardised on the training snapshots and it is frozen.

    The code's size and modulation are chosen by a race: a codec of each of CANDIDATES is fitted for a CHECK_SHARE of
    the passes and scored on the validation designs (its codes compressed to size numbers per design, as
    compressed_error); the best goes on from there to the last pass, unless it is more than LOSING_MARGIN times
    worse than POD with size modes (pod_error; None: never), when the fit is stopped there. A fit too short to have
    that check fits codes of CODE numbers that shift. Every DDP rank fits the same codecs (and DDP starts all ranks
    from rank 0's); the main one scores them and saves each fit after every pass (codec_fit_checkpoint, one file per
    candidate, in run's record), which every rank continues from with resume.
    Returns (the codec, frozen, None, the seconds spent on the race's other codecs), or (None, the passes made, 0)
    where it was stopped."""
    device = runtime.device
    n_steps, n_train = config.n_steps_used, len(case.train_indices)
    passes = config.field_codec_epochs
    check_after = max(1, round(CHECK_SHARE * passes))
    fit = SampledFieldFit(passes=passes, check_after=check_after if check_after < passes else 0)
    candidates = CANDIDATES if fit.check_after else ((CODE, SHIFT),)
    shape = (config.n_nodes_used, config.n_vars, node_basis[1].shape[1], positions.shape[1])
    # the node basis is a digest of the training data as scaled: a fit of other data or another scaling differs
    basis = hashlib.sha256(b"".join(part.detach().cpu().numpy().tobytes() for part in node_basis)).hexdigest()

    def checkpoint(candidate, go_on: bool = False) -> FitCheckpoint:
        return FitCheckpoint(codec_fit_checkpoint(*candidate), {
            "codec": [*shape, *candidate], "seed": config.seed, "passes": fit.passes, "check_after": fit.check_after,
            "node_basis_sha256": basis, "train_indices": [int(i) for i in case.train_indices]}, resume or go_on,
            fit_of="snapshot codec", writes=runtime.is_main, run_id=None if run is None else run.id,
            config=config.to_dict(), after_read=lambda: barrier(runtime))

    def fitted(candidate, losing=None, past_check: bool = False):
        def build():
            codec = SnapshotCodec(*shape, *candidate).to(device)
            codec.set_projection(*(part.to(device) for part in node_basis))
            codec.field.set_coordinates(positions)
            return codec

        return fit_sampled_field(build, predict, case.train, n_train, (n_steps, config.n_nodes_used, config.n_vars),
                                 fit, config.batch_size, config.seed, device, encode=SnapshotCodec.coefficients,
                                 losing=losing, checkpoint=checkpoint(candidate, past_check), past_check=past_check)

    def predict(codec, snapshots, nodes, coefficients):
        codes = codec.raw_codes(coefficients)[:, None]
        return codec.field(codes, None if nodes is None else nodes[:, None])[:, 0]

    sampled = config.n_nodes_used // config.n_vars > fit.nodes
    named = " / ".join(map(candidate_name, candidates))
    log.info(f"Training a snapshot codec on the {n_train * n_steps} time steps of the {n_train} training designs "
             f"({fit.passes} passes, {f'{fit.nodes} random nodes' if sampled else 'every node'} of each time step"
             + (f"; codes {named} for {fit.check_after} passes, then the best" if len(candidates) > 1 else "")
             + ") ...")
    began = time.perf_counter()
    # no race (one candidate), or a run resumed after it (the race's time was the interrupted run's)
    chosen, outraced = candidates[0], 0.0
    if len(candidates) > 1:
        # resumed after the race: the candidate that went on past the check won it
        went_on = [one for one in candidates if saved_passes(checkpoint(one)) > fit.check_after]
        if went_on:
            chosen = went_on[0]
            log.info(f"The snapshot codec's race was run before the interruption: codes {candidate_name(chosen)} go "
                     "on")
        else:
            hopeless = None if pod_error is None else RACE_SPREAD * LOSING_MARGIN * pod_error
            errors, seconds = race(candidates, fitted, case, config, runtime, size, hopeless)
            chosen = candidates[int(np.argmin(errors))]
            outraced = float(seconds.sum() - seconds[int(np.argmin(errors))])
            losing = pod_error is not None and errors.min() > LOSING_MARGIN * pod_error
            log.info(f"The snapshot codec after {fit.check_after} of {fit.passes} passes, codes {named}: mean squared "
                     f"error {' / '.join('not fitted' if np.isinf(error) else f'{error:.4g}' for error in errors)}"
                     + ("" if pod_error is None else f" against {pod_error:.4g} for POD") + "; "
                     + (f"more than {LOSING_MARGIN:g} times worse, it is stopped and the VAE runs on the fields"
                        if losing else f"going on with codes {candidate_name(chosen)}"))
            if losing:
                return None, fit.check_after, 0.0
    codec, coefficients, _ = fitted(chosen, past_check=len(candidates) > 1)
    with torch.no_grad():
        codec.set_code_statistics(codec.raw_codes(coefficients))
    log.info(f"The snapshot codec trained in {time.perf_counter() - began:.0f} s")
    return codec.requires_grad_(False), None, outraced


def candidate_name(candidate) -> str:
    """How the log names a (code size, modulation) candidate: "16 warp"."""
    return f"{candidate[0]} {candidate[1]}"


def race(candidates, fitted, case, config, runtime, size: int, hopeless=None):
    """(each candidate's validation error (float64 [len(candidates)], compressed_error's, with codes compressed to
    size numbers per design) after fitted(candidate, losing) has made the fit's first check_after passes, where
    losing keeps a copy of it and ends the fit there (saved, so that the winner goes on from its saved state); the
    seconds each took). Where the first candidate's error is above hopeless the others are not fitted (error inf);
    the others are scored together, in one read of the data. The main process scores and decides; every process gets
    its scores."""
    errors = torch.zeros(len(candidates), dtype=torch.float64)
    paused = {}

    def pause(index: int):
        def losing(codec, coefficients):
            if runtime.is_main:  # the fit goes on from the codec as it is: its code statistics are set on a copy
                paused[index] = copy.deepcopy(codec)
                paused[index].set_code_statistics(paused[index].raw_codes(coefficients))
            return True
        return losing

    def score(indices):
        if runtime.is_main:
            scored = compressed_errors([paused[index] for index in indices], case, config, runtime, size)
            for index, (_, error) in zip(indices, scored):
                errors[index] = error

    seconds = np.zeros(len(candidates))
    for index, candidate in enumerate(candidates):
        began = time.perf_counter()
        fitted(candidate, losing=pause(index))
        seconds[index] = time.perf_counter() - began
        if index == 0 and hopeless is not None:
            score([0])
            if any_rank(runtime.is_main and errors[0] > hopeless, runtime):
                errors[1:] = float("inf") if runtime.is_main else 0.0
                break
    else:
        score(list(range(0 if hopeless is None else 1, len(candidates))))
    # the sum is also the barrier after which every paused fit is on disk, for the processes that go on from it
    return sum_over_ranks(errors.to(runtime.device), runtime).cpu().numpy(), seconds


@torch.no_grad()
def encoded_designs(codecs: list, case, config) -> list:
    """Every design's codes [N, T, C] (float32, host) through each codec, from one read of the designs: training and
    validation designs alike (rows by dataset index; a design in neither split stays zero)."""
    codes = [np.zeros((config.n_designs, config.n_steps_used, codec.code_size), dtype=np.float32) for codec in codecs]
    for indices, source in ((case.train_indices, case.train), (case.val_indices, case.val)):
        order = list(in_order(len(indices), config.batch_size))
        for positions, fields in zip(order, source.batches(order)):
            for codec, array in zip(codecs, codes):
                array[indices[positions]] = codec.encode(fields.float()).cpu().numpy()
    return codes


def code_bases(codes: np.ndarray, train_indices, rank: int, seed: int, node_rank: int):
    """The VAE's starting bases in code space: (node basis (mean, modes, scales) of node_rank modes over the C code
    numbers (the VAE's projection rank on codes: ModelSpec.data_spec), the design POD with rank modes
    (models.pod.design_pod_basis's four values))."""
    array = CodeArray(codes)
    node_basis = pod_node_basis(array, train_indices, Unscaled, node_rank, seed)
    return node_basis, design_pod_basis(array, train_indices, Unscaled, node_basis[0], node_basis[1], rank)


def pod_path_of(n_steps: int, node_basis, design_basis, device) -> PODPath:
    """A PODPath holding these bases (models.pod): what the VAE's frozen linear path starts as."""
    mean, modes, _ = node_basis
    path = PODPath(n_steps, len(mean), modes.shape[1], design_basis[1].shape[0])
    path.set_basis(mean, modes, *design_basis[:3])
    return path.to(device)


@torch.no_grad()
def validation_errors(reconstructions: dict, case, config, seed: int, codecs: dict | None = None) -> dict:
    """{name: mean squared error, scaled units, over the validation designs} of each reconstruction, all at the same
    COMPARED_NODES random nodes of every time step (every node where fewer; the nodes depend on seed alone, so two
    calls compare alike). reconstructions {name: fields [b, T, M] -> fields, or with codecs {name: codec} that codec's
    codes [b, T, C], which it decodes at those nodes only, so that it decodes a bounded number of values per design
    on any mesh}."""
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
            values = codecs[name].decode(reconstruct(fields), nodes) if codecs else pick(reconstruct(fields))
            sums[name] += float(((values - truth) ** 2).sum())
        count += truth.numel()
    return {name: total / count for name, total in sums.items()}
