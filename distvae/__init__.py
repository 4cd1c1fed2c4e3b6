"""distvae: train convolutional VAEs on faces, from one CPU to many GPU nodes.

    from distvae import ConvVAE
    vae = ConvVAE.from_pretrained("exported/celeba64")   # written by `distvae export`
"""

__version__ = "0.1.0"
__all__ = ["ConvVAE"]


def __getattr__(name: str):
    if name == "ConvVAE":  # imported on use: `distvae synth` and friends do not pay for torch
        from distvae.model import ConvVAE

        return ConvVAE
    raise AttributeError(f"module 'distvae' has no attribute {name!r}")
