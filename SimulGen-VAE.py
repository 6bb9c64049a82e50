"""SimulGenVAE: learn a fast surrogate of transient simulations with a hierarchical VAE.

    python SimulGen-VAE.py --preset=1                 # train the VAE (and the conditioner) on the case here
    python SimulGen-VAE.py --lc_only=1                # train only the latent conditioner on the saved VAE
    python SimulGen-VAE.py --predict=new.csv --out=fields.npy   # fields of new designs
    python SimulGen-VAE.py --reconstruct=new.npy --out=recon.npy

Run from the case folder (preset.txt, input_data/); all paths are relative to it. See README.md for the flags and
docs/configuration.md for every condition.txt key.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # find modules/ when run from a case folder

from modules.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
