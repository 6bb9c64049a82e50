"""A spatial decoder that can move features, measured against POD on the benchmark's cases (issue #17, item 3: pick
the transport-aware decoder by measurement before it goes into the VAE).

    python bench/spatial_decoders.py                                 # demo, pulse and burgers, about 27 minutes
    python bench/spatial_decoders.py --cases pulse --periodic x0=1 y0=1 theta=6.2831853
    python bench/spatial_decoders.py --designs 24 --steps 6 --grid 8 --line 32 --epochs 2 --fit_epochs 2  # smoke

The candidate is a snapshot neural field. Every time step of every training design (N·T snapshots, not N
trajectories) is encoded to a code of --code numbers by an MLP on the snapshot's node-POD coefficients, and decoded
at any node by a SIREN (sine layers) over the node's coordinates whose layers are shifted by the code (CORAL's shift
modulations; the product's own network, models.neural_field). A shifted phase of a sine layer is a translation, so a
feature can move across the mesh without a mode for every position. It trains on --points random nodes per
snapshot, so a training step costs the same on any mesh; it needs node coordinates, so it works on unstructured meshes
as on grids.

Reported per case on the validation designs, with the split (val_fraction 0.2, seed 42) and the error of
bench/accuracy.py and evaluation.json (mean relative L2 of each design's whole field, physical units):
- reconstruction: the neural field from T·code numbers per design, and from K numbers (a PCA of the training
  designs' code trajectories, K the VAE's latent size on that case), against POD of the designs with K modes;
- prediction from the design's parameters: an MLP (parameters, t) -> code fitted to the training designs' codes,
  then trained through the frozen decoder on the field, against POD + GPR with K modes (the report's own GP). With
  --periodic NAME=PERIOD, those parameters enter the MLP as sine and cosine of 2π·value/period (as a user who knows
  that an angle is an angle would declare it); both rows are printed.
- prediction by the direct model (--direct_epochs): no encoder; the MLP (parameters, t) -> code and a fresh decoder
  trained together on the training designs' fields (Neural Implicit Flow's layout);
- the decoder's cost at the users' scale (T = 200, M = 95,008 nodes): multiply-adds and activation memory per
  design for decoding every node, and per training step on --points nodes per snapshot.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import (REPO, add_case_arguments, burgers_fields, burgers_parameters, pulse_fields,  # noqa: E402
                   pulse_parameters)

sys.path.insert(0, str(REPO))
from modules.data.dataset import split_indices  # noqa: E402
from modules.data.scaling import ColumnScaler  # noqa: E402
from modules.evaluation.baselines import baseline_weights  # noqa: E402
from modules.evaluation.metrics import FieldErrors  # noqa: E402
from modules.models.neural_field import WIDTH, NeuralFieldNodes, code_network  # noqa: E402
from modules.models.pod import design_gram  # noqa: E402

LATENT_SIZE = {"demo": 56, "pulse": 64, "burgers": 64}  # the VAE's latent numbers per design on each case
USERS_SCALE = (200, 95_008)  # T, M


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, tuple(LATENT_SIZE))
    parser.add_argument("--code", type=int, default=8, help="code numbers per snapshot")
    parser.add_argument("--points", type=int, default=256, help="nodes per snapshot in a training step")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training snapshots (decoder)")
    parser.add_argument("--fit_epochs", type=int, default=300, help="passes of the (parameters, t) -> code MLP")
    parser.add_argument("--direct_epochs", type=int, default=60,
                        help="passes of the direct model (no encoder: an MLP (parameters, t) -> code and a fresh "
                             "decoder trained together on the field, Neural Implicit Flow's layout); 0: not run")
    parser.add_argument("--periodic", nargs="*", default=[], metavar="NAME=PERIOD",
                        help="parameters that are periodic (an extra prediction row encodes them as sin and cos)")
    parser.add_argument("--json", help="write every number here")
    return parser.parse_args(argv)


class ArrayView:
    """What modules.models.pod.design_gram reads, over an in-memory [N, T, M] array."""

    def __init__(self, fields: np.ndarray):
        self.fields, self.sample_shape = fields, fields.shape[1:]

    def read(self, indices, steps=slice(None)):
        return self.fields[indices][:, steps]


def load_case(name: str, args):
    """(fields [N, T, M] float32, parameters [N, P], parameter names, node coordinates [M, d])."""
    if name == "demo":
        import meshio
        fields = np.load(REPO / "input_data" / "dataset1.npy")
        table = np.genfromtxt(REPO / "input_data" / "parameters.csv", delimiter=",", names=True)
        coordinates = meshio.read(REPO / "input_data" / "plate.vtu").points[:, :2]
        return fields, table.view((float, len(table.dtype))), list(table.dtype.names), coordinates
    if name == "pulse":
        parameters = pulse_parameters(args.designs, 0)
        axis = np.arange(args.grid) / args.grid
        nodes_x, nodes_y = np.meshgrid(axis, axis)
        return (pulse_fields(parameters, args.steps, args.grid), parameters, ["x0", "y0", "theta", "v", "D"],
                np.stack([nodes_x.ravel(), nodes_y.ravel()], axis=1))
    parameters = burgers_parameters(args.designs, 0)
    return (burgers_fields(parameters, args.steps, args.line), parameters, ["a", "b", "phi", "nu"],
            (np.arange(args.line) * 2 * np.pi / args.line)[:, None])


def pod_baselines(fields, parameters, train, val, latent_size: int) -> dict:
    """{"pod", "pod_gpr"}: each validation design's error [n_val] with K modes, as the evaluation report computes them
    (the same functions, parameters standardised to float32 by the same ColumnScaler: the GP's fit on the pulse moves
    from 83 % to 78 % with float64 inputs, so anything else would not be the report's number)."""
    order = np.concatenate([train, val])
    standardised = ColumnScaler.fit(parameters[train]).transform(parameters[order])
    weights = baseline_weights(design_gram(ArrayView(fields), order), len(train), {"pod": latent_size},
                               parameters=standardised, seed=42)
    train_flat = fields[train].reshape(len(train), -1).astype(np.float64)
    return {key: relative_errors((weights[key] @ train_flat).reshape(fields[val].shape), fields[val])
            for key in ("pod", "pod_gpr")}


def field_decoder(coordinates, code: int) -> NeuralFieldNodes:
    """The product's neural field (models.neural_field) over these node coordinates [M, d], phase-shifted by codes of
    code numbers: what the neural-field conditioner decodes with, so this benchmark measures the product's network."""
    decoder = NeuralFieldNodes(code, len(coordinates), 1, coordinates.shape[1])
    decoder.set_coordinates(coordinates)
    return decoder


def relative_errors(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Relative L2 of each design's whole field [n], scored by the evaluation report's own FieldErrors."""
    errors = FieldErrors.empty(np.arange(len(truth)), truth.shape[1], 1)
    errors.add(slice(None), predicted, truth)
    return errors.relative_l2()


def decode_every_node(decoder, codes) -> torch.Tensor:
    """Codes [s, code] -> scaled values [s, M] at every node, without gradients (in the decoder's bounded chunks)."""
    with torch.no_grad():
        return decoder(codes[:, None])[:, 0]


def sampled_loss(decoder, codes, snapshots, n_points: int):
    """Mean squared error of the decoder at n_points random nodes of each snapshot [b, M] given its code [b, code]:
    every training step of the benchmark (a step costs the same on any mesh)."""
    points = torch.randint(0, snapshots.shape[1], (len(snapshots), n_points))
    return F.mse_loss(decoder(codes[:, None], points[:, None])[:, 0], torch.gather(snapshots, 1, points))


def run_case(name: str, args) -> dict:
    torch.manual_seed(0)
    fields, parameters, names, coordinates = load_case(name, args)
    n, n_steps, n_nodes = fields.shape
    train, val = split_indices(n, 0.2, 42)
    latent_size = min(LATENT_SIZE[name], len(train) - 1)
    started = time.time()

    baseline = pod_baselines(fields, parameters, train, val, latent_size)

    # the snapshot neural field: standardised values, codes from node-POD coefficients
    offset, spread = float(fields[train].mean()), float(fields[train].std())
    scaled = torch.tensor((fields - offset) / spread, dtype=torch.float32)
    snapshots = scaled[train].reshape(-1, n_nodes)
    node_mean = snapshots.mean(0)
    _, singular, right = torch.linalg.svd(snapshots - node_mean, full_matrices=False)
    rank = min(128, n_nodes, len(snapshots))
    # one scale for all coefficients (the strongest mode's spread): whitening each would blow up the weak modes,
    # where a smooth family's held-out snapshots differ from its training ones most
    basis, coefficient_scale = right[:rank].T, float(singular[0]) / math.sqrt(len(snapshots)) + 1e-12

    def coefficients(values):
        return ((values - node_mean) @ basis) / coefficient_scale

    encoder = code_network(rank, args.code)
    decoder = field_decoder(coordinates, args.code)
    train_field(encoder, decoder, coefficients(snapshots), snapshots, args)

    def physical(values):  # scaled values [n * T, M] -> physical fields [n, T, M]
        return values.view(-1, n_steps, n_nodes).numpy() * spread + offset

    with torch.no_grad():
        codes = encoder(coefficients(scaled.reshape(-1, n_nodes))).view(n, n_steps, args.code)
    flat_codes = codes.reshape(n, -1).numpy()
    code_mean = flat_codes[train].mean(0)
    _, _, code_modes = np.linalg.svd(flat_codes[train] - code_mean, full_matrices=False)
    code_modes = code_modes[:latent_size]
    compressed = (flat_codes[val] - code_mean) @ code_modes.T @ code_modes + code_mean
    result = {"case": name, "shape": [n, n_steps, n_nodes], "designs": [len(train), len(val)],
              "latent_size": latent_size, "pod": float(baseline["pod"].mean()),
              "pod_gpr": float(baseline["pod_gpr"].mean()),
              "field_codes": float(relative_errors(physical(decode_every_node(
                  decoder, codes[val].reshape(-1, args.code))), fields[val]).mean()),
              "field_k": float(relative_errors(physical(decode_every_node(
                  decoder, torch.tensor(compressed, dtype=torch.float32).view(-1, args.code))),
                  fields[val]).mean())}

    periodic = dict(item.split("=") for item in args.periodic)
    encodings = {"parameters": parameters}
    if any(key in names for key in periodic):
        columns = []
        for column, key in enumerate(names):
            if key in periodic:
                angle = 2 * np.pi * parameters[:, column] / float(periodic[key])
                columns += [np.sin(angle), np.cos(angle)]
            else:
                columns.append(parameters[:, column])
        encodings["periodic parameters"] = np.stack(columns, axis=1)
    result["prediction"] = {}
    for label, inputs in encodings.items():
        design = design_times(inputs, train, n_steps)
        val_rows, train_rows = design[val].reshape(-1, design.shape[2]), design[train].reshape(-1, design.shape[2])
        predictor = fit_code_predictor(train_rows, codes[train].reshape(-1, args.code), decoder, snapshots, args)
        with torch.no_grad():
            predicted = decode_every_node(decoder, predictor(val_rows))
        result["prediction"][label] = float(relative_errors(physical(predicted), fields[val]).mean())
        if args.direct_epochs:
            network, direct_decoder = train_direct(train_rows, snapshots, coordinates, args)
            with torch.no_grad():
                direct = decode_every_node(direct_decoder, network(val_rows))
            result["prediction"][f"{label}, direct"] = float(relative_errors(physical(direct), fields[val]).mean())
    result["seconds"] = round(time.time() - started)
    result["cost_at_users_scale"] = cost_at_users_scale(decoder, args)
    return result


def train_field(encoder, decoder, snapshot_coefficients, snapshots, args) -> None:
    """Encoder and decoder together, on --points random nodes of each snapshot per step (batches of 64 snapshots)."""
    weights = list(encoder.parameters()) + list(decoder.parameters())
    optimiser = torch.optim.Adam(weights, 1e-3)
    steps = max(1, args.epochs * math.ceil(len(snapshots) / 64))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 1e-3, total_steps=steps, pct_start=0.1)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(snapshots)).split(64):
            loss = sampled_loss(decoder, encoder(snapshot_coefficients[batch]), snapshots[batch], args.points)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


def design_times(inputs: np.ndarray, train, n_steps: int) -> torch.Tensor:
    """[N, T, P + 1]: each design's standardised inputs (on the training designs) and the time in [-1, 1]."""
    standardised = (inputs - inputs[train].mean(0)) / np.where(inputs[train].std(0) > 0, inputs[train].std(0), 1)
    times = np.broadcast_to(np.linspace(-1, 1, n_steps)[None, :, None], (len(inputs), n_steps, 1))
    design = np.broadcast_to(standardised[:, None, :], (len(inputs), n_steps, inputs.shape[1]))
    return torch.tensor(np.concatenate([design, times], axis=2), dtype=torch.float32)


def fit_code_predictor(design, targets, decoder, snapshots, args):
    """An MLP (inputs, t) -> code: fitted to the training snapshots' codes targets [s, code] (standardised) from their
    rows of design_times, design [s, P + 1], then trained through the frozen decoder on the snapshots [s, M]
    (--epochs // 4 passes at a fifth of the rate). Returns rows [r, P + 1] -> codes [r, code]."""
    torch.manual_seed(0)
    mean, std = targets.mean(0), targets.std(0) + 1e-8
    network = code_network(design.shape[1], targets.shape[1])
    optimiser = torch.optim.Adam(network.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, args.fit_epochs))
    for _ in range(args.fit_epochs):
        for batch in torch.randperm(len(design)).split(128):
            loss = F.mse_loss(network(design[batch]), (targets[batch] - mean) / std)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
    for weight in decoder.parameters():
        weight.requires_grad_(False)
    optimiser = torch.optim.Adam(network.parameters(), 2e-4)
    for _ in range(max(1, args.epochs // 4)):
        for batch in torch.randperm(len(design)).split(64):
            loss = sampled_loss(decoder, network(design[batch]) * std + mean, snapshots[batch], args.points)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    for weight in decoder.parameters():
        weight.requires_grad_(True)
    return lambda values: network(values) * std + mean


def train_direct(design, snapshots, coordinates, args):
    """The direct model: an MLP (inputs, t) -> code and a fresh decoder trained together on --points random
    nodes of each training snapshot [s, M] from its row of design_times [s, P + 1] (--direct_epochs passes); no
    encoder, so the code is by construction a smooth function of the inputs. Returns (network, decoder)."""
    torch.manual_seed(0)
    network, decoder = code_network(design.shape[1], args.code), field_decoder(coordinates, args.code)
    optimiser = torch.optim.Adam(list(network.parameters()) + list(decoder.parameters()), 1e-3)
    steps = max(1, args.direct_epochs * math.ceil(len(design) / 64))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 1e-3, total_steps=steps, pct_start=0.1)
    for _ in range(args.direct_epochs):
        for batch in torch.randperm(len(design)).split(64):
            loss = sampled_loss(decoder, network(design[batch]), snapshots[batch], args.points)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return network, decoder


def cost_at_users_scale(decoder, args) -> dict:
    """Multiply-adds and float32 activation memory of the decoder at T = 200, M = 95,008."""
    n_steps, n_nodes = USERS_SCALE
    per_node = sum(layer.in_features * layer.out_features for layer in decoder.layers) + WIDTH
    layers = len(decoder.layers)
    return {"decode_every_node_gmac_per_design": round(n_steps * n_nodes * per_node / 1e9, 1),
            "decode_activations_gb_per_step": round(4 * n_nodes * WIDTH * 2 / 1e9, 3),
            "train_gmac_per_design": round(3 * n_steps * args.points * per_node / 1e9, 2),
            "train_activations_mb_per_design": round(4 * n_steps * args.points * WIDTH * 2 * layers / 1e6, 1)}


def table(rows: list) -> list:
    lines = ["| case | designs (train / val) | T × M | K | neural field, T·code numbers | neural field, K numbers | "
             "POD, K modes | prediction: neural field | POD + GPR | time |", "|---" * 10 + "|"]
    for row in rows:
        prediction = "; ".join(f"{value * 100:.2f} % ({label})" for label, value in row["prediction"].items())
        lines.append(f"| {row['case']} | {row['designs'][0]} / {row['designs'][1]} | {row['shape'][1]} × "
                     f"{row['shape'][2]} | {row['latent_size']} | {row['field_codes'] * 100:.2f} % | "
                     f"{row['field_k'] * 100:.2f} % | {row['pod'] * 100:.2f} % | {prediction} | "
                     f"{row['pod_gpr'] * 100:.2f} % | {row['seconds']} s |")
    return lines


def main(argv=None) -> None:
    args = parse_arguments(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.cases:
        rows.append(run_case(name, args))
        print(f"{name}: done in {rows[-1]['seconds']} s", flush=True)
    print("\n".join(table(rows)))
    cost = rows[-1]["cost_at_users_scale"]
    print(f"\nAt T = {USERS_SCALE[0]}, M = {USERS_SCALE[1]:,}: decoding every node costs "
          f"{cost['decode_every_node_gmac_per_design']} G multiply-adds per design "
          f"({cost['decode_activations_gb_per_step']} GB of activations per time step decoded at once); a training "
          f"step on {args.points} nodes per snapshot costs {cost['train_gmac_per_design']} G per design "
          f"({cost['train_activations_mb_per_design']} MB of activations kept for the backward pass).")
    report = {"rows": rows, "settings": {key: value for key, value in vars(args).items() if key != "json"}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
