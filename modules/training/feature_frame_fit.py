"""The fit of a feature-frame GP (models.feature_frame) on the training designs' scaled fields: each snapshot's frame
from its first two moments, the snapshot read in that frame (scipy's cubic spline interpolation), the POD of those
frames' snapshots, and a GP per number of each time step (the frame's and the POD coefficients) from the
standardised parameters. The frames' snapshots of every training design are held in memory for the POD: a fit that
would not fit in half the memory left is not made, said."""
import dataclasses
import logging

import numpy as np
import torch

from modules.data.batches import in_order
from modules.machine.memory import available_host_bytes
from modules.models.feature_frame import MAX_MODES, REFERENCE_SPREAD, FeatureFrameConditioner, frame_targets
from modules.models.pod import snapshot_modes

log = logging.getLogger(__name__)

ENERGY_LEFT = 1e-3  # the frames' POD keeps the fewest modes that leave at most this share of their variance
PIXEL_VARIANCE = 1 / 12  # added to each moment's variance: a one-cell feature's, so the covariance never vanishes
HOST_COPIES = 3  # float32 copies of the frames' snapshots the fit holds at once: themselves, centred in place (1),
                 # and their float64 covariance or Gram matrix (models.pod.snapshot_modes: 2 at most)


def frame_spec(spec, config, modes: int):
    """The spec of the feature-frame GP fitted beside the network of spec (its inputs and latent count kept: what a
    carried spread is fitted on)."""
    height, width = config.grid
    return dataclasses.replace(spec, kind="feature_frame", members=1, gp_points=0, encoder="", spread_kind="",
                               field_shape=(config.n_steps_used, config.n_nodes_used, config.n_vars),
                               frame=(height, width, modes, int(config.grid_periodic)))


def fit_feature_frame(spec, case, config):
    """(a FeatureFrameConditioner fitted on the training designs (the module's docstring), on the CPU, its spec);
    (None, None), said, where the frames' snapshots would not fit in memory."""
    height, width = config.grid
    n_steps, n_vars = config.n_steps_used, config.n_vars
    train = case.fields.train_indices
    periodic = bool(config.grid_periodic)
    needed = HOST_COPIES * 4 * len(train) * n_steps * n_vars * height * width
    if needed > available_host_bytes() // 2:
        log.info(f"note: no feature-frame GP: the training designs' fields in their frames need {needed / 2 ** 30:.1f} "
                 "GB, more than half the memory left")
        return None, None
    centres, log_covariances = np.zeros((len(train), n_steps, 2)), np.zeros((len(train), n_steps, 3))
    in_frame = np.zeros((len(train), n_steps, n_vars * height * width), np.float32)
    order = list(in_order(len(train), max(1, min(len(train), config.lc_batch_size))))
    for positions, fields in zip(order, case.fields.train.batches(order)):
        snapshots = fields.float().cpu().numpy().reshape(len(positions), n_steps, n_vars, height, width)
        for design, position in enumerate(positions):
            for step in range(n_steps):
                centre, log_covariance, moved = into_frame(snapshots[design, step], periodic)
                centres[position, step], log_covariances[position, step] = centre, log_covariance
                in_frame[position, step] = moved.reshape(-1)
    background = np.median(in_frame.reshape(-1, n_vars, height * width).transpose(1, 0, 2).reshape(n_vars, -1), axis=1)
    modes, mean, vectors, coefficients = frame_modes(in_frame.reshape(len(train) * n_steps, -1))  # centres in_frame
    fitted_spec = dataclasses.replace(frame_spec(spec, config, modes), gp_points=len(train))
    model = FeatureFrameConditioner(fitted_spec)
    targets = frame_targets(centres, log_covariances, coefficients.reshape(len(train), n_steps, modes),
                            (width, height), periodic)
    log.info(f"Fitting the feature-frame GP on the {len(train)} training designs: each time step's frame and {modes} "
             f"POD modes of the field in it, {targets.shape[1]} GPs ...")
    model.numbers.fit(case.conditions[train].double().cpu().numpy(), targets, config.seed)
    with torch.no_grad():
        model.mode_mean.copy_(torch.as_tensor(mean))
        model.mode_vectors.copy_(torch.as_tensor(vectors))
        model.background.copy_(torch.as_tensor(background))
    return model, fitted_spec


def into_frame(snapshot: np.ndarray, periodic: bool):
    """One time step's field [V, H, W] -> (its frame: the centroid [2] (x, y in cells) and G = log(C / s^2)'s entries
    [3] (g00, g01, g11), the field read in its frame [V, H, W]): the weighted centroid c and covariance C of the node
    positions (weight: the sum over the variables of |u - median(u)|), and u at c + C^1/2 (q - q0) / s for every node
    q of the frame's grid (models.feature_frame)."""
    from scipy.ndimage import map_coordinates

    n_vars, height, width = snapshot.shape
    spread = REFERENCE_SPREAD * min(height, width)
    weight = np.abs(snapshot - np.median(snapshot, axis=(1, 2), keepdims=True)).sum(0).astype(np.float64)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float64)
    sizes = np.array([width, height], np.float64)
    total = weight.sum()
    if not total > 0:  # a uniform field: the frame is the grid's own
        centre, covariance = (sizes - 1) / 2, spread ** 2 * np.eye(2)
    else:
        margins = (weight.sum(0), weight.sum(1))  # over the columns (x) and the rows (y)
        if periodic:  # circular means: a feature across an edge has its centre where it is
            centre = np.array([np.angle((margin * np.exp(2j * np.pi * np.arange(size) / size)).sum())
                               / (2 * np.pi) % 1 * size for margin, size in zip(margins, sizes)])
        else:
            centre = np.array([(margin * np.arange(size)).sum() / total for margin, size in zip(margins, sizes)])
        offsets = np.stack([columns - centre[0], rows - centre[1]])                              # [2, H, W]
        if periodic:
            offsets = (offsets + sizes[:, None, None] / 2) % sizes[:, None, None] - sizes[:, None, None] / 2
        covariance = np.einsum("ahw,bhw,hw->ab", offsets, offsets, weight) / total + PIXEL_VARIANCE * np.eye(2)
    variances, axes = np.linalg.eigh(covariance)
    root = (axes * np.sqrt(variances)) @ axes.T                                                  # C^1/2
    logarithm = (axes * np.log(variances / spread ** 2)) @ axes.T                                # G
    frame_offsets = np.stack([columns - (width - 1) / 2, rows - (height - 1) / 2], -1) / spread       # [H, W, 2]
    read_x, read_y = np.moveaxis(centre + frame_offsets @ root.T, -1, 0)
    mode = "grid-wrap" if periodic else "nearest"
    moved = np.stack([map_coordinates(variable.astype(np.float64), [read_y, read_x], order=3, mode=mode)
                      for variable in snapshot])
    if periodic:  # the nearest image only: a frame wider than the grid would hold the feature's copies
        beyond = (np.abs(read_x - centre[0]) > width / 2) | (np.abs(read_y - centre[1]) > height / 2)
        moved[:, beyond] = np.median(snapshot, axis=(1, 2))[:, None]
    return centre, np.array([logarithm[0, 0], logarithm[0, 1], logarithm[1, 1]]), moved


def frame_modes(snapshots: np.ndarray):
    """(modes, mean [K], modes' vectors [modes, K], coefficients [S, modes]) of the frames' snapshots [S, K] float32,
    centred in place: the fewest POD modes (at most MAX_MODES; models.pod.snapshot_modes, summed in float64) that
    leave at most ENERGY_LEFT of their variance about the mean."""
    mean = snapshots.mean(0, dtype=np.float64)
    snapshots -= mean.astype(np.float32)
    eigenvalues, vectors = snapshot_modes(torch.from_numpy(snapshots), MAX_MODES)
    total = sum(float(np.square(rows, dtype=np.float64).sum()) for rows in np.array_split(snapshots, 64))
    left = 1 - np.cumsum(eigenvalues.numpy()) / max(total, np.finfo(np.float64).tiny)
    modes = int(min(len(left), 1 + np.searchsorted(-left, -ENERGY_LEFT)))
    vectors = vectors[:, :modes].numpy()                                                          # [K, modes]
    return modes, mean, vectors.T, snapshots @ vectors
