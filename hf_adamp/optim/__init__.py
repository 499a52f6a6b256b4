"""The optimizers: AdamP and SGDP (projected), RAdam (torch's, with decoupled weight decay)."""

from .adamp import AdamP
from .radam import RAdam
from .sgdp import SGDP

__all__ = ["AdamP", "SGDP", "RAdam"]
