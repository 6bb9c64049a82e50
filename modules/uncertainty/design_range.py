"""How far a design lies from the designs a conditioner was trained on, so that --predict can say which new designs
are outside what was learnt (it still predicts them: their fields are extrapolations).

Designs are compared in one or more spaces. For a parameter CSV: the parameters standardised on the training
designs, with which parameters leave the training range. For images: the pixels (average-pooled to at most
PIXEL_GRID x PIXEL_GRID, as the evaluation's nearest-design baseline compares images) and the conditioner's features
(what its last layer maps to latents, or its image encoder's). Both, because features alone can miss the obvious: on the
tests' geometry images a CNN trained for 60 epochs put an image of pixel noise nearer a training design than their
typical spacing (0.8 times), while in pixels it is far. In each space the distance to the nearest training design is set
against the typical distance between neighbouring training designs: the median, over the training designs, of the
distance to the nearest other one. A design is outside when a parameter leaves the training range or a ratio exceeds
FAR.
"""
import numpy as np
import torch
import torch.nn.functional as F

FAR = 2.0  # farther than twice the typical neighbour spacing from every training design: outside what was learnt
PIXEL_GRID = 16  # images are compared average-pooled to at most 16 x 16 per channel (the reference stays small)
CHUNK = 1024  # new designs compared at a time (their distances to every training design are held)


@torch.no_grad()
def design_spaces(model, reads: str, inputs: torch.Tensor, batch_size: int) -> dict:
    """{space: float64 [n, D]}: the designs where they are compared: standardised parameters as they are; images as
    pooled pixels and as the network's features (model.features, in eval mode)."""
    if reads == "parameters":
        return {"parameters": inputs.double().cpu().numpy()}
    model.eval()
    device = next(model.parameters(), inputs).device  # the model's (--predict keeps the designs on the host)
    pixels, features = [], []
    for start in range(0, len(inputs), batch_size):
        images = inputs[start:start + batch_size].float().to(device)
        pooled = F.adaptive_avg_pool2d(images, min(PIXEL_GRID, images.shape[-1]))
        pixels.append(pooled.flatten(1).double().cpu().numpy())
        features.append(model.features(images).double().cpu().numpy())
    return {"pixels": np.concatenate(pixels), "features": np.concatenate(features)}


def training_reference(spaces: dict, dataset_indices, raw=None, names=None) -> dict:
    """What a conditioner file keeps of its training designs, as plain types: per space their points and the typical
    neighbour distance; their dataset indices; for parameters, the raw range and the column names."""
    return {"dataset_indices": [int(i) for i in dataset_indices],
            "spaces": {space: {"points": points.tolist(),
                               "typical_distance": float(max(np.median(_nearest(points, points, True)[1]), 1e-12))}
                       for space, points in spaces.items()},
            "low": None if raw is None else np.min(raw, axis=0).tolist(),
            "high": None if raw is None else np.max(raw, axis=0).tolist(),
            "names": list(names) if names else None}


def placement(reference: dict, spaces: dict, labels: list, raw=None) -> list:
    """Per new design (labels: how the user names it): in each space its nearest training design and the distance to
    it against the typical one; the parameters outside the training range; whether it is outside what was learnt."""
    found = {}
    for space, points in spaces.items():
        train = reference["spaces"][space]
        which, distance = _nearest(points, np.asarray(train["points"], dtype=np.float64))
        found[space] = (which, distance, train["typical_distance"])
    rows = []
    for row, label in enumerate(labels):
        by_space = {space: {"nearest_training_design": reference["dataset_indices"][which[row]],
                            "distance": float(distance[row]), "typical_distance": typical,
                            "distance_ratio": float(distance[row] / typical)}
                    for space, (which, distance, typical) in found.items()}
        outside = _outside_parameters(reference, raw[row]) if raw is not None else []
        far = any(values["distance_ratio"] > FAR for values in by_space.values())
        rows.append({"design": label, "spaces": by_space, "parameters_outside_training_range": outside,
                     "outside": bool(outside) or far})
    return rows


def placement_summary(rows: list) -> str | None:
    """One line naming the designs outside what was learnt (the first five, with why), or None."""
    outside = [row for row in rows if row["outside"]]
    if not outside:
        return None
    reasons = []
    for row in outside[:5]:
        why = [f"{p['name']} = {p['value']:.4g} outside [{p['low']:.4g}, {p['high']:.4g}]"
               for p in row["parameters_outside_training_range"]]
        why += [f"{values['distance_ratio']:.1f} x the typical distance between training designs from the nearest one "
                f"(design {values['nearest_training_design']}) in {space}"
                for space, values in row["spaces"].items() if values["distance_ratio"] > FAR]
        reasons.append(f"{row['design']}: {'; '.join(why)}")
    more = f"; and {len(outside) - 5} more" if len(outside) > 5 else ""
    return (f"{len(outside)} of {len(rows)} designs lie outside what the conditioner was trained on, so their fields "
            f"are extrapolations ({' | '.join(reasons)}{more})")


def _outside_parameters(reference: dict, values) -> list:
    names = reference["names"] or [f"parameter {column + 1}" for column in range(len(values))]
    return [{"name": names[column], "value": float(value), "low": low, "high": high}
            for column, (value, low, high) in enumerate(zip(values, reference["low"], reference["high"]))
            if not low <= value <= high]


def _nearest(points: np.ndarray, train: np.ndarray, exclude_self: bool = False):
    """(index of the nearest row of train, its Euclidean distance) for each row of points, a chunk at a time."""
    which, distance = np.empty(len(points), dtype=np.int64), np.empty(len(points))
    train_norms = np.sum(train ** 2, axis=1)
    for start in range(0, len(points), CHUNK):
        block = points[start:start + CHUNK]
        squared = np.sum(block ** 2, axis=1)[:, None] + train_norms[None, :] - 2 * block @ train.T
        if exclude_self:
            squared[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        which[start:start + len(block)] = np.argmin(squared, axis=1)
        distance[start:start + len(block)] = np.sqrt(np.maximum(np.min(squared, axis=1), 0))
    return which, distance
