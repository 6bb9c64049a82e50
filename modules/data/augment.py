"""Optional training-time augmentation (all off by default). It only ever sees training batches, so validation
designs are never mixed in."""
import torch


def augment_batch(batch, config):
    """batch [B, T, M] scaled -> (inputs, targets).

    Amplitude scaling multiplies each design by a factor in [1 - a, 1 + a] (about the middle of the data range) and
    mixup blends a design with another design of the same batch: both make new samples, so they change the target
    too. Noise is added to the inputs only, which makes the reconstruction a denoising task.
    """
    fields = batch
    count = batch.shape[0]
    if config.augment_amplitude > 0:
        factors = 1 + config.augment_amplitude * (2 * torch.rand(count, 1, 1, device=batch.device) - 1)
        fields = fields * factors
    if config.augment_mixup_prob > 0 and count > 1:
        chosen = (torch.rand(count, 1, 1, device=batch.device) < config.augment_mixup_prob).to(batch.dtype)
        weight = torch.rand(count, 1, 1, device=batch.device) * chosen
        partners = fields[torch.randperm(count, device=batch.device)]
        fields = (1 - weight) * fields + weight * partners
    inputs = fields
    if config.augment_noise_std > 0:
        inputs = fields + config.augment_noise_std * torch.randn_like(fields)
    return inputs, fields
