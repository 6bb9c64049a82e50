"""SimulGenVAE: hierarchical-VAE surrogates of transient simulations."""
