"""Where the rows of each parameter lie inside the tensors an optimizer is handed.

Without sharding, the optimizer is handed the parameters themselves. Sharded engines hand it flat
partitions or local shards that hold pieces of parameters; a ``Layout`` maps those back, so that the
per-row sums of ``hf_adamp.projection`` can be accumulated into one buffer and reduced once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

from ..projection import NUM_STATS, channel_shape


@dataclass(frozen=True)
class ParamSpec:
    """A full (unsharded) parameter, as AdamP sees it."""

    shape: tuple[int, ...]
    name: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        """Rows of the channel view; 0 for parameters that are never projected (ndim <= 1)."""
        return channel_shape(self.shape)[0] if self.numel else 0

    @property
    def row_len(self) -> int:
        return channel_shape(self.shape)[1] if self.numel else 0


@dataclass(frozen=True)
class Piece:
    """``numel`` consecutive elements of parameter ``param`` (flat index ``param_start`` on), stored in a
    local tensor from its flat index ``local_start`` on."""

    param: int
    local_start: int
    param_start: int
    numel: int


class Segment(NamedTuple):
    """A run of a local tensor, viewed as ``rows`` x ``row_len``.

    ``slot`` is the parameter's index in the decision arrays and ``stat_row`` the buffer row of the
    segment's first row; both are -1 for element-wise runs (parameters that are never projected).
    A row cut by a shard boundary gives a one-row segment shorter than the parameter's row.
    """

    start: int
    rows: int
    row_len: int
    slot: int
    stat_row: int


def split_piece(piece: Piece, spec: ParamSpec, stat_offset: int, max_elems: int) -> list[Segment]:
    """Cut a piece into segments of whole rows (at most ``max_elems`` elements each, but at least one
    row), plus a partial row at either end where a shard boundary falls inside a row."""
    if piece.numel == 0:
        return []
    if spec.rows == 0:
        step = max(max_elems, 1)
        return [
            Segment(piece.local_start + a, 1, min(step, piece.numel - a), -1, -1) for a in range(0, piece.numel, step)
        ]
    K = spec.row_len
    out: list[Segment] = []
    pos, end = piece.param_start, piece.param_start + piece.numel
    local = piece.local_start - piece.param_start  # local index = param index + local
    rows_per_seg = max(1, max_elems // K)
    while pos < end:
        row, col = divmod(pos, K)
        if col or end - pos < K:  # partial row at a shard boundary
            n = min(K - col, end - pos)
            out.append(Segment(pos + local, 1, n, piece.param, stat_offset + row))
            pos += n
            continue
        rows = min(rows_per_seg, (end - pos) // K)
        out.append(Segment(pos + local, rows, K, piece.param, stat_offset + row))
        pos += rows * K
    return out


def merge_runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments that continue each other in memory and in statistics rows, joined (runs).

    Element-wise segments join into one long row; projectable ones join when they share the slot and the
    row length and their statistics rows follow on (a row's sums only depend on the row's own elements).
    """
    out: list[Segment] = []
    for seg in segments:
        if out:
            last = out[-1]
            follows = last.start + last.rows * last.row_len == seg.start
            if follows and last.slot < 0 and seg.slot < 0:
                out[-1] = last._replace(rows=1, row_len=last.rows * last.row_len + seg.rows * seg.row_len)
                continue
            if (
                follows
                and seg.slot == last.slot
                and seg.row_len == last.row_len
                and seg.stat_row == last.stat_row + last.rows
            ):
                out[-1] = last._replace(rows=last.rows + seg.rows)
                continue
        out.append(seg)
    return out


@dataclass
class Layout:
    """Parameters, and the pieces of them that each local tensor holds.

    ``params`` lists every parameter of the model the engine shards, in the same order on every rank:
    the statistics buffer is sized and ordered by it, so ranks holding empty shards still reduce a
    buffer of the same size.
    """

    params: list[ParamSpec]
    pieces: dict[int, list[Piece]]  # id(local tensor) -> its pieces
    stat_offsets: list[int] = field(init=False)
    total_rows: int = field(init=False)
    _segments: dict[tuple[int, int], list[Segment]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for spec in self.params:
            offsets.append(total)
            total += spec.rows
        self.stat_offsets, self.total_rows = offsets, total

    def collective_bytes(self, itemsize: int = 4) -> int:
        """Bytes of the one all_reduce per step: 4 sums per row of every projectable parameter."""
        return NUM_STATS * self.total_rows * itemsize

    def holds(self, tensor: Tensor) -> bool:
        return id(tensor) in self.pieces

    def segments(self, tensor: Tensor, max_elems: int) -> list[Segment]:
        key = (id(tensor), max_elems)
        segs = self._segments.get(key)
        if segs is None:
            segs = []
            for piece in self.pieces[id(tensor)]:
                spec = self.params[piece.param]
                segs += split_piece(piece, spec, self.stat_offsets[piece.param], max_elems)
            self._segments[key] = segs
        return segs
