"""Mapping sharded tensors back to parameter rows, so the projection stays exact under sharding."""

from .layout import Layout, ParamSpec, Piece, Segment

__all__ = ["Layout", "ParamSpec", "Piece", "Segment"]
