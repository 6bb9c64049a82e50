"""Peak memory of one VAE training step (forward + backward + AdamW step) at a given [T, M], batch and filters.

    python bench/vae_memory.py --steps 200 --nodes 95008 --filters 1024 512 256 128 --batches 1 2 4

Each batch size runs in a fresh subprocess on the CPU (float32) and reports its peak resident memory; the slope over
batch sizes is the memory per design in a batch and the intercept the fixed part (weights, gradients, optimiser
state, interpreter). On a GPU the same float32 tensors live in device memory, plus the CUDA context (~0.5 GB).
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_step(args) -> None:
    import torch

    from modules.models.vae import HierarchicalVAE, ModelSpec

    spec = ModelSpec(n_steps=args.steps, n_nodes=args.nodes, projection_rank=args.rank, filters=tuple(args.filters),
                     main_latent_dim=32, level_latent_dim=8, blocks_per_level=1 if args.size == "small" else 2,
                     head_hidden=128 if args.size == "small" else 256)
    model = HierarchicalVAE(spec)
    optimizer = torch.optim.AdamW(model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fields = torch.rand(args.batch, args.steps, args.nodes) - 0.5
    out = model(fields)
    loss = (out["recon"] - fields).pow(2).mean() + out["kl_main"].mean() + out["kl_levels"].sum(1).mean()
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"batch": args.batch, "peak_mb": peak / 1024, "before_step_mb": before / 1024,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=95008)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--filters", type=int, nargs="+", default=[1024, 512, 256, 128])
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is not None:
        return one_step(args)
    runs = []
    for batch in args.batches:
        command = [sys.executable, __file__, "--steps", str(args.steps), "--nodes", str(args.nodes), "--rank",
                   str(args.rank), "--size", args.size, "--batch", str(batch), "--filters", *map(str, args.filters)]
        runs.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
        print(f"batch {batch:>3}: peak {runs[-1]['peak_mb']:8.0f} MB")
    first, last = runs[0], runs[-1]
    per_design = (last["peak_mb"] - first["peak_mb"]) / max(1, last["batch"] - first["batch"])
    fixed = first["peak_mb"] - per_design * first["batch"]
    print(json.dumps({"steps": args.steps, "nodes": args.nodes, "filters": args.filters, "size": args.size,
                      "parameters": first["parameters"], "mb_per_design": round(per_design, 1),
                      "fixed_mb": round(fixed, 1), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
