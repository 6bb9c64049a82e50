"""Gradient checkpointing (--grad_checkpointing): a block's activations are not kept for the backward pass but
recomputed there, trading one more forward pass of the block for the memory of its activations."""
import torch
from torch.utils.checkpoint import checkpoint


def run_block(block, *inputs, recompute: bool):
    """block(*inputs), recomputed in the backward pass when recompute is on and gradients are being recorded.
    The non-reentrant form also restores the RNG state, so dropout and stochastic depth draw the same masks twice."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def run_blocks(blocks, x, recompute: bool):
    """x through every block of a Sequential, each checkpointed on its own."""
    for block in blocks:
        x = run_block(block, x, recompute=recompute)
    return x


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Turn gradient checkpointing on in every part of model that supports it (those with a recompute flag)."""
    for module in model.modules():
        if hasattr(module, "recompute"):
            module.recompute = True
