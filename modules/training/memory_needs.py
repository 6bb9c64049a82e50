"""What a training run will allocate, checked before it starts: a run whose largest phase would pass the memory its
processes may still use is refused with both numbers and a batch that fits, instead of being killed by the kernel
hours later."""
from dataclasses import dataclass

from modules.config import CONDITION_FILE
from modules.data.batches import batches_held_by_reader
from modules.errors import InputError
from modules.machine.memory import host_memory_left

# One design in a training batch costs about this many float32 copies of its field [T, M] per forward pass kept for
# the backward pass (the reconstruction, the loss's difference and their gradients), plus one for the batch itself
# (measured on real runs: docs/performance.md). Too low lets a run start that the kernel then kills, too high
# refuses a run that would have fitted: the refusal says "about".
FIELD_COPIES_PER_PASS = 4
# What the process may allocate beyond the estimate before the refusal: the allocator's slack, the interpreter's
# growth, small tensors.
ALLOCATOR_SLACK = 1.1


@dataclass(frozen=True)
class PhaseNeeds:
    """Bytes one phase of training will still allocate in each process, beyond what the process holds when checked
    (the data, preloaded or memory-mapped, is already there)."""

    name: str
    fixed: int           # weights, and for what trains its gradients and AdamW's two moments (16 bytes a parameter)
    per_design: int      # one design of a batch: its field copies, and the streamed batches read ahead
    batch: int           # designs per (micro-)batch: gradient accumulation does not add to it
    batch_key: str       # the condition.txt key that sets it

    @property
    def total(self) -> int:
        return self.fixed + self.per_design * self.batch


def training_needs(config, vae_parameters: int, runtime) -> list[PhaseNeeds]:
    """What the phases of a training run that allocate with the batch will need in this process: the VAE's steps,
    and the conditioner's when it trains end to end through the decoder (its own weights are left out: a few
    million parameters, small next to a batch of fields). On its own, on CSV parameters or images, the conditioner is
    far smaller; the evaluation reads Batch_size designs without gradients, and the conditioner's passes after
    training size their batches from the memory left (batch_within_memory). On a GPU, what the host still needs is
    the streamed batches' buffers."""
    field_bytes = 4 * config.n_steps_used * config.n_nodes_used
    on_host = runtime.device.type == "cpu"
    prefetch = batches_held_by_reader(runtime.device.type, runtime.readers) * field_bytes  # per design of a batch

    def copies(passes: int) -> int:  # the batch itself, then FIELD_COPIES_PER_PASS per forward pass kept
        return (1 + FIELD_COPIES_PER_PASS * passes) * field_bytes if on_host else 0

    phases = [PhaseNeeds("the VAE", 16 * vae_parameters if on_host else 0,
                         copies(config.recon_samples) + prefetch, config.batch_size, "Batch_size")]
    if config.has_conditioner and config.use_e2e_training:
        phases.append(PhaseNeeds("the conditioner, end to end through the decoder",
                                 4 * vae_parameters if on_host else 0, copies(1), config.lc_batch_size,
                                 "latent_conditioner_batch"))
    return phases


def check_training_fits(phases: list, runtime, left: tuple | None = None) -> InputError | None:
    """The refusal of a run whose largest phase needs more than what each of its processes may still allocate
    (left: host_memory_left()'s (bytes, the limit in words)), with both numbers and the largest batch that fits;
    None when it fits."""
    available, limit_said = left or host_memory_left()
    available //= runtime.world_size
    largest = max(phases, key=lambda phase: phase.total)
    if ALLOCATOR_SLACK * largest.total <= available:
        return None
    fitting = int((available / ALLOCATOR_SLACK - largest.fixed) // largest.per_design) if largest.per_design else 0
    shared = f" among {runtime.world_size} processes" if runtime.world_size > 1 else ""
    fix = (f"set {largest.batch_key} {fitting} or less in input_data/condition.txt (grad_accum_steps keeps the "
           "effective batch), or give the job more memory" if fitting >= 1 else "give the job more memory")
    return InputError(CONDITION_FILE, f"training {largest.name} needs about {ALLOCATOR_SLACK * largest.total / 1e9:.2f}"
                      f" GB more per process ({largest.fixed / 1e9:.2f} GB for the model and its optimiser, "
                      f"{largest.per_design * largest.batch / 1e9:.2f} GB for a batch of {largest.batch} designs), "
                      f"but it may allocate only {available / 1e9:.2f} GB ({limit_said}{shared})", fix)
