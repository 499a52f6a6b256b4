"""hf-adamp: AdamP, SGDP and RAdam for transformers, accelerate and deepspeed."""

from .optim import SGDP, AdamP, RAdam

__version__ = "0.1.0"

__all__ = ["AdamP", "SGDP", "RAdam", "__version__"]
