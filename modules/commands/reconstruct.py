"""--reconstruct: encode and decode new simulations with the saved model, write them in physical units.

    python SimulGen-VAE.py --reconstruct=new_fields.npy --out=recon.npy     (or --out=recon.h5, recon.xdmf)

The simulations are read, reconstructed and written a batch at a time (storage.field_files), in batches sized from
the free memory, so memory does not grow with their number.
"""
import logging
import time

import numpy as np
import torch

from modules.commands.predict import HOST_BATCH_BYTES, MAX_DEVICE_BATCH, designs_the_host_holds
from modules.data.dataset import Crop, NewSimulations
from modules.data.field_layout import read_saved_layout
from modules.data.time_values import case_time_values
from modules.errors import InputError
from modules.evaluation.metrics import as_percent, relative_l2
from modules.machine.device import full_float32
from modules.storage.field_files import FieldFacts, open_field_file, output_files
from modules.storage.model_files import load_vae_surrogate

log = logging.getLogger(__name__)

DEVICE_COPIES = 6  # float32 fields a design takes on the device while it is reconstructed, at most


def reconstruct_file(source, out, model_file, device) -> np.ndarray:
    """Reconstruct every design in `source` ([n, T, M] .npy); writes [n, T_used, M_used] to `out` (.npy, .h5 or
    .xdmf by its suffix); returns each design's relative L2 error against its input."""
    began = time.perf_counter()
    paths = output_files(out, "--reconstruct", report=False)  # the errors are printed
    full_float32(device)
    surrogate, config = load_vae_surrogate(model_file, device)
    crop = Crop(config)
    simulations = NewSimulations(source, crop)
    if len(simulations) == 0:
        raise InputError(source, f"holds no designs (shape {tuple(simulations.data.shape)})",
                         "give at least one simulation, as an array of shape [n, T, M] with n >= 1")
    shape = (len(simulations), *crop.shape)
    described = FieldFacts([f"design {index}" for index in range(len(simulations))], crop.time_index, config.n_vars,
                           read_layout=lambda: read_saved_layout(config), read_times=lambda: case_time_values(config))
    errors = []
    batch = reconstruction_batch_size(len(simulations), crop.shape, device)
    with open_field_file(paths, shape, 0, described) as written, torch.no_grad():
        for start in range(0, len(simulations), batch):
            fields = simulations.batch(start, start + batch)
            reconstructions = surrogate.reconstruct(torch.from_numpy(fields).to(device)).cpu().numpy()
            errors.append(relative_l2(reconstructions, fields))
            written.write(start, reconstructions)
    errors = np.concatenate(errors)
    log.info(f"Reconstructed {len(errors)} designs -> {paths['out']} {shape} in {time.perf_counter() - began:.2f} s; "
             f"relative L2 error vs the input: mean {as_percent(errors.mean())}, worst {as_percent(errors.max())}")
    return errors


def reconstruction_batch_size(n_designs: int, shape: tuple, device) -> int:
    """Designs per batch, from the free memory rather than Batch_size, as --predict's (commands.predict): on the CPU
    about HOST_BATCH_BYTES of fields, fewer when the memory this process may use is short (each design is held as
    read and as reconstructed, in every batch waiting for the writer); on a GPU what a quarter of the free device
    memory holds at DEVICE_COPIES fields a design (input, activations, reconstruction)."""
    design_bytes = 4 * shape[0] * shape[1]
    host = designs_the_host_holds(2 * design_bytes)
    if torch.device(device).type != "cuda":
        return int(max(1, min(n_designs, host, HOST_BATCH_BYTES // design_bytes)))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(n_designs, host, free // (4 * DEVICE_COPIES * design_bytes), MAX_DEVICE_BATCH)))
