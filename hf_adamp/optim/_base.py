"""The step structure shared by AdamP and SGDP.

One step runs in five phases (DESIGN section 2):

1. ``first``: update the moments of every local tensor and accumulate the per-row sums
   ``g.p, g.g, p.p, p.u`` of every row segment into one ``(4, rows)`` buffer; finish element-wise
   (never projected) tensors right away;
2. reduce that buffer across ranks, once, if a sharding engine attached a reducer;
3. decide, for every parameter at once, from the reduced sums (tensor ops only, no host sync);
4. ``second``: project the update of each row segment, apply weight decay and the step.

Subclasses give the optimizer-specific halves of phases 1 and 4, in two forms: a plain one that works on
whole tensors and documents the maths, and a fast one that works in cache-sized chunks.

What a step learns about its tensors beyond their values (segments, slots, the kernels' tables) is kept in a
``StepContext`` and reused while the tensors stay the same, so a step of many small tensors costs little host time.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import kernels, projection
from ..sharding.layout import Layout, ParamSpec, Piece, Segment, split_piece

# Elements per chunk on the fast path: every operand's chunk stays in cache between the chunk's operations.
# 2**18 measured best of 2**17..2**22 at GPT-2-small shapes on a 2-core EPYC (benchmarks/step_time.py).
CHUNK_ELEMS = 1 << 18
# Segments of the plain path are whole pieces.
_WHOLE = 1 << 62

Reducer = Callable[[Tensor], None]


# torch's wording where torch's optimizers make the same check, so code matching their messages keeps working
_TORCH_NAMES = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "momentum": "momentum value",
}


def _described(name: str) -> str:
    if name.startswith("betas["):
        return f"beta parameter at index {name[6:-1]}"
    return _TORCH_NAMES.get(name, name)


def check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element (got a tensor of shape {tuple(value.shape)})")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Invalid {_described(name)}: {name} must be a number, got {type(value).__name__}")
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {_described(name)}: {value} ({name} must be >= 0)")


def check_range(name: str, value: Any, low: float, high: float, high_inclusive: bool) -> None:
    check_non_negative(name, value)
    value = value.item() if isinstance(value, Tensor) else value
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"Invalid {_described(name)}: {value} ({name} must be in [{low}, {high}{bracket})")


def lr_of(group: dict[str, Any]) -> float:
    """The group's learning rate as a number (a tensor lr of any 1-element shape is read once per step)."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else lr


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state (moments) is kept in fp32 for half-precision parameters, else in their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


@dataclass
class Item:
    """One local tensor taking part in a step, with what both halves of the step need."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    group: dict[str, Any]
    segments: list[Segment]
    scalars: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # within a step: the plain path's whole-tensor update
    specs: list[ParamSpec] = field(default_factory=list)  # the step's parameter slots (full shapes)
    target: Tensor | None = None  # the strided parameter that ``param`` is a dense working copy of


@dataclass
class StepRecord:
    """What the last step decided, kept as device tensors: reading it is the only sync (telemetry)."""

    keys: list[Any]  # per slot: the parameter, or its name under a sharding layout
    kind: Tensor  # (slots,) projection.NONE / CHANNEL / LAYER
    weight_norm: Tensor  # (slots,) |p| before the step, over the whole (unsharded) parameter
    lr: Tensor  # (slots,) the learning rate of the parameter's group


@dataclass
class StepContext:
    """What a step found out about its tensors: kept and reused while they stay the same (``reuses``).

    A context is reusable when the step saw only the user's dense tensors (no DTensor shard, no gradient that had
    to be copied into the parameter's layout). Reusing it costs a few attribute reads per tensor: the
    groups and their tensors, each gradient's dtype and strides, the state tensors, the switches of the paths.
    """

    layout: Layout | None
    items: list[Item]
    record_keys: list[Any]  # per slot: the parameter or its name; None for slots without rows
    total_rows: int
    stats_dtype: torch.dtype
    device: torch.device
    kernel_batches: list[Any]  # _fused.KernelBatch: the items the fused CPU kernels step, per state dtype
    others: list[Item]  # the items of the eager, plain and Triton paths
    state_dtypes: set[torch.dtype]
    # per slot: index into groups_of_slots (the last entry stands in for slots with no local piece)
    slot_group: Tensor
    groups_of_slots: list[dict[str, Any]]
    slot_counts: Tensor  # int64 rows per slot
    slot_row_len: Tensor  # float64
    slot_numel: Tensor  # float64
    reusable: bool
    # what reuse checks
    groups: list[dict[str, Any]] = field(default_factory=list)
    group_params: list[list[Tensor]] = field(default_factory=list)
    foreach: list[Any] = field(default_factory=list)
    # per tensor of the groups: the tensor, its item (None: no gradient), its strides and dtype
    checks: list[tuple[Tensor, Item | None, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    switches: tuple[Any, ...] = ()

    def reuses(self, opt: ProjectedOptimizer, layout: Layout | None, switches: tuple[Any, ...]) -> bool:
        """Whether this context still describes the step's tensors; if so, hands each item its new gradient."""
        if layout is not self.layout or switches != self.switches:
            return False
        groups = opt.param_groups
        if len(groups) != len(self.groups):
            return False
        for group, known, params, foreach in zip(groups, self.groups, self.group_params, self.foreach):
            ps = group["params"]
            if group is not known or group.get("foreach") != foreach or len(ps) != len(params):
                return False
            if not all(map(operator.is_, ps, params)):
                return False
        strided, state = torch.strided, opt.state
        for p, item, stride, dtype in self.checks:
            grad = p.grad
            if item is None:
                if grad is not None:
                    return False
                continue
            if grad is None or grad.dtype != dtype or grad.layout != strided or grad.stride() != stride:
                return False
            if p.dtype != dtype or p.stride() != stride or state.get(p) is not item.state:
                return False
            item.grad = grad
        return all(batch.holds_state_of(opt._STATE_KEYS) for batch in self.kernel_batches)

    def release(self) -> None:
        """End of a step: drop what must not outlive it (gradients, the plain path's whole-tensor buffers)."""
        for item in self.items:
            item.grad = None  # type: ignore[assignment]
        for item in self.others:
            item.extra.clear()
        for batch in self.kernel_batches:
            batch.release()


class ProjectedOptimizer(Optimizer):
    """Base of AdamP and SGDP: lazy state, the phased step, and the hooks sharding engines use."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._init_runtime()

    # ----- runtime attributes (not part of state_dict, rebuilt after unpickling) -----
    def _init_runtime(self) -> None:
        self._layouts: list[Layout] = []
        self._reducer: Reducer | None = None
        self._record_given()
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._stats: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._step_cache: dict[str, Any] = {}
        self._contexts: dict[int | None, StepContext] = {}  # per layout (id; None: unsharded), see StepContext
        self._segments: dict[int, tuple[Any, ParamSpec, list[Segment]]] = {}  # see _unsharded_segments
        # last record per layout (None: unsharded), so engines that step group by group report them all
        self._records: dict[int | None, StepRecord] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
        self._init_runtime()

    def attach_layout(self, layout: Layout | Sequence[Layout] | None, reducer: Reducer | None = None) -> None:
        """Tell the optimizer where parameter rows lie in the tensors it is handed (sharding engines).

        Engines that call ``step()`` once per group with ``param_groups`` narrowed to that group (DeepSpeed
        ZeRO) pass one layout per group: each step uses the layout holding its tensors, so its statistics
        buffer (and the one collective) is sized by that group's parameters only.
        """
        if layout is None:
            self._layouts = []
        else:
            self._layouts = [layout] if isinstance(layout, Layout) else list(layout)
        self._reducer = reducer
        self._scratch.clear()
        self._contexts.clear()

    @property
    def _layout(self) -> Layout | None:
        """The single attached layout, if exactly one is attached."""
        return self._layouts[0] if len(self._layouts) == 1 else None

    def _active_layout(self) -> Layout | None:
        """The layout holding the tensors of this step (the first tensor any layout holds decides)."""
        if len(self._layouts) <= 1:
            return self._layout
        for group in self.param_groups:
            for p in group["params"]:
                for layout in self._layouts:
                    if layout.holds(p):
                        return layout
        return self._layouts[0]  # _collect raises if a tensor with a gradient is in no layout

    # ----- which tensors the user gave, so tensors an engine swapped in are recognised -----
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None  # torch refuses non-dicts
        if params is not None and not isinstance(params, set):  # and sets
            params = param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, tensor) pairs too
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(self._duplicates_message())
        super().add_param_group(param_group)
        self._record_given()
        if "_contexts" in self.__dict__:
            self._contexts.clear()

    def params_replaced(self) -> None:
        """Call after putting other parameters into ``param_groups`` by hand (before the first step): they count
        as the user's own, and the cached step plans are dropped."""
        self._record_given()
        self._contexts.clear()

    def _record_given(self) -> None:
        given = self.__dict__.setdefault("_given", {})
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in given:
                    given[id(p)] = weakref.ref(p)
        multi = any(p.dim() > 1 for g in self.param_groups for p in g["params"])
        self.__dict__["_given_multi_dim"] = multi or self.__dict__.get("_given_multi_dim", False)

    def _duplicates_message(self) -> str:
        return (
            f"{type(self).__name__}: a parameter group with duplicate parameters (the same tensor listed twice). "
            "torch's optimizers warn and step such a tensor twice; hf_adamp refuses it, since the projection "
            "decides once per parameter. List each parameter once."
        )

    def _was_given(self, p: Tensor) -> bool:
        ref = self._given.get(id(p))
        return ref is not None and ref() is p

    def _engine_made(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` looks like a tensor a sharding engine put in place of the user's: a shard, or a flat
        tensor we were not given in a group that holds none of the given ones (engines replace a group's whole
        list; a tensor the user appended to a group by hand sits beside the given ones)."""
        if is_sharded_tensor(p):
            return True
        if self._was_given(p) or p.dim() > 1 or not self._given_multi_dim:
            return False
        return not any(self._was_given(q) for q in group["params"])

    def _engine_replaced_tensors(self) -> bool:
        """Whether a sharding engine put tensors of its own (flat partitions, DTensors) in param_groups."""
        return any(self._engine_made(p, group) for group in self.param_groups for p in group["params"])

    def _check_unsharded(self, p: Tensor, group: dict[str, Any]) -> None:
        """Refuse a tensor that a sharding engine put in place of the user's parameters, when no layout maps
        it: treating a flat partition or a local shard as a parameter would silently turn off the projection
        (AdamP would act as AdamW)."""
        sharded = is_sharded_tensor(p)
        if self._engine_made(p, group):
            if is_dtensor(p):
                kind = "a DTensor (FSDP2 shard)"
            elif getattr(p, "_is_flat_param", False):
                kind = f"an FSDP1 FlatParameter of shape {tuple(p.shape)}"
            elif sharded:
                kind = f"an FSDP1 local slice of shape {tuple(p.shape)} (use_orig_params=True)"
            else:
                kind = f"a flat tensor of shape {tuple(p.shape)}"
            raise RuntimeError(
                f"{type(self).__name__}: step() was handed {kind} that no sharding layout maps to parameter rows. "
                "A sharding engine (DeepSpeed ZeRO, FSDP) has replaced or sharded the parameters; without a "
                "layout the projection would be skipped and the optimizer would silently act as AdamW. Call "
                "hf_adamp.sharding.attach(engine_or_model, optimizer) after the engine is set up "
                "(see hf_adamp.sharding)."
            )

    # ----- what subclasses provide -----
    _STATE_KEYS: tuple[str, ...] | None = None  # state tensors the fused kernels update (None: no kernels)
    _KERNELS = ""  # prefix of the kernels' entry points (hf_adamp.kernels): "adam", "sgd"

    def _kernel_scalars(self, group: dict[str, Any], step: int, decay: float) -> list[float]:
        """One row of the kernels' scalar table for a run of a tensor of ``group`` at its ``step`` (what
        ``_advance_step`` returned), applying ``decay`` in pass 1."""
        raise NotImplementedError

    def _advance_step(self, state: dict[str, Any]) -> int:
        """Count this step in a tensor's state; returns the count its scalars depend on (0: none do)."""
        return 0

    def _init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _prepare(self, item: Item) -> None:
        """Advance per-tensor counters and fill ``item.scalars`` (host floats only)."""
        raise NotImplementedError

    def _decay_factors(self, group: dict[str, Any]) -> tuple[float, float]:
        """Multipliers of the parameter for weight decay: (not projected, projected)."""
        raise NotImplementedError

    def _first_plain(self, item: Item, stats: Tensor) -> None:
        raise NotImplementedError

    def _second_plain(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        raise NotImplementedError

    def _first_fast(self, item: Item, stats: Tensor) -> None:
        raise NotImplementedError

    def _second_fast(self, item: Item, coef: Tensor, decay: Tensor) -> None:
        raise NotImplementedError

    # ----- the step -----
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._step_cache: dict[str, Any] = {}  # see once_per_step
        layout = self._active_layout()
        ctx = self._context(layout)
        items = ctx.items
        # A sharded rank joins the collective even when none of its tensors has a gradient (an empty
        # shard), else the other ranks would wait for it forever.
        sharded = ctx.layout is not None and self._reducer is not None
        if not items and not sharded:
            return loss
        try:
            self._step_phases(ctx, sharded)
            for item in ctx.items:
                if item.target is not None:
                    item.target.copy_(item.param)
        finally:
            ctx.release()
        return loss

    def _step_phases(self, ctx: StepContext, sharded: bool) -> None:
        stats = self._stats_buffer(ctx.total_rows, ctx.stats_dtype, ctx.device)
        for batch in ctx.kernel_batches:
            batch.first(self, stats)
        for item in ctx.others:
            self._prepare(item)
            (self._first_fast if self._fast(item) else self._first_plain)(item, stats)

        if sharded:
            self._reducer(stats)

        record_key = id(ctx.layout) if ctx.layout is not None else None
        if ctx.total_rows == 0 or not ctx.items:
            self._records.pop(record_key, None)
            return
        decision, decay, lr = self._decide(stats, ctx)
        self._records[record_key] = StepRecord(ctx.record_keys, decision.kind, decision.weight_norm, lr)
        self._step_kinds: Tensor | list[int] = decision.kind

        coefs = {dt: decision.coef.to(dt) for dt in ctx.state_dtypes}
        for batch in ctx.kernel_batches:
            batch.second(self, coefs[batch.dtype], decay)
        for item in ctx.others:
            (self._second_fast if self._fast(item) else self._second_plain)(item, coefs[state_dtype(item.param)], decay)

    def _switches(self) -> tuple[Any, ...]:
        """The environment switches that choose each tensor's path (a context is only reused under the same)."""
        from . import _triton  # deferred: it imports this module

        return (self.kernels_available(), self.once_per_step("triton_on_cpu", _triton.forced_on_cpu))

    def _context(self, layout: Layout | None) -> StepContext:
        """The step's context: the last one while it still describes the tensors, else a new one."""
        key = id(layout) if layout is not None else None
        switches = self._switches()
        ctx = self._contexts.get(key)
        if ctx is not None and ctx.reuses(self, layout, switches):
            return ctx
        self._contexts.pop(key, None)
        if layout is None and self._engine_replaced_tensors():
            from ..sharding.auto import auto_attach  # deferred: sharding imports this module

            if auto_attach(self):
                layout = self._active_layout()
                key = id(layout) if layout is not None else None
        ctx = self._new_context(layout, switches)
        if ctx.reusable:
            self._contexts[key] = ctx
        return ctx

    def _new_context(self, layout: Layout | None, switches: tuple[Any, ...]) -> StepContext:
        from . import _fused  # deferred, like the triton glue: both import this module

        items, specs, slot_groups, keys, reusable = self._collect(layout)
        # dtype and device from all tensors, not only those with gradients, so every rank agrees
        tensors = [p for group in self.param_groups for p in group["params"]]
        device = tensors[0].device if tensors else torch.device("cpu")
        # the sums in fp64 on CPU: fp32 ones overflow at |g| or |p| ~ 1e19, where the reference's normalised sums
        # do not (on accelerators fp32, the Triton kernels' accumulators)
        wide = device.type == "cpu" or any(state_dtype(p) == torch.float64 for p in tensors)
        stats_dtype = torch.float64 if wide else torch.float32
        on_kernels, others = self._split_kernel_items(items)
        # a slot with no local piece is not applied here; give it this step's group so ranks report alike
        fallback = next((g for g in slot_groups if g is not None), self.defaults)
        groups_of_slots: list[dict[str, Any]] = []
        index_of: dict[int, int] = {}
        slot_group = []
        for group in slot_groups:
            group = group if group is not None else fallback
            if id(group) not in index_of:
                index_of[id(group)] = len(groups_of_slots)
                groups_of_slots.append(group)
            slot_group.append(index_of[id(group)])
        item_of = {id(item.param): item for item in items}
        ctx = StepContext(
            layout=layout,
            items=items,
            # 1-D parameters listed in a layout have a slot but no rows: never projected, not reported
            record_keys=[k if spec.rows else None for k, spec in zip(keys, specs, strict=True)],
            total_rows=layout.total_rows if layout is not None else sum(s.rows for s in specs),
            stats_dtype=stats_dtype,
            device=device,
            kernel_batches=_fused.batches(self, on_kernels),
            others=others,
            state_dtypes={state_dtype(item.param) for item in items},
            slot_group=torch.tensor(slot_group, dtype=torch.int64),
            groups_of_slots=groups_of_slots,
            slot_counts=torch.tensor([s.rows for s in specs], dtype=torch.int64),
            slot_row_len=torch.tensor([float(max(s.row_len, 1)) for s in specs], dtype=torch.float64),
            slot_numel=torch.tensor([float(max(s.numel, 1)) for s in specs], dtype=torch.float64),
            reusable=reusable,
        )
        if reusable:
            ctx.groups = list(self.param_groups)
            ctx.group_params = [list(g["params"]) for g in self.param_groups]
            ctx.foreach = [g.get("foreach") for g in self.param_groups]
            ctx.checks = [(p, item_of.get(id(p)), p.stride(), p.dtype) for p in tensors]
            ctx.switches = switches
        return ctx

    def _split_kernel_items(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """The items the fused CPU kernels step (all in one call per pass), and the others."""
        if self._STATE_KEYS is None:
            return [], items
        from . import _fused, _triton

        keys = self._STATE_KEYS
        triton_on_cpu = self._switches()[1]  # tests: Triton's interpreter
        on, off = [], []
        for item in items:
            takes = (
                self._fast(item)
                and _fused.usable(self, item, keys)
                and not (triton_on_cpu and _triton.usable(item, keys))
            )
            (on if takes else off).append(item)
        return on, off

    def _slot_kinds(self) -> list[int]:
        """This step's decision per slot as host ints (a sync on accelerators: only the CPU kernels use it)."""
        if isinstance(self._step_kinds, Tensor):
            self._step_kinds = self._step_kinds.tolist()
        return self._step_kinds

    @staticmethod
    def _fast(item: Item) -> bool:
        return item.group.get("foreach") is not False

    def _collect(
        self, layout: Layout | None
    ) -> tuple[list[Item], list[ParamSpec], list[dict[str, Any] | None], list[Any], bool]:
        """Tensors with gradients, their segments, the table of parameter slots, and whether all this can be reused
        at the next step (only the user's dense tensors were seen: no DTensor shard, no gradient copied)."""
        items: list[Item] = []
        reusable = True
        specs: list[ParamSpec] = [] if layout is None else layout.params
        slot_groups: list[dict[str, Any] | None] = [None] * len(specs)
        keys: list[Any] = [] if layout is None else [s.name for s in specs]
        offset = 0
        seen: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in seen:  # appended by hand: add_param_group refuses them
                    raise ValueError(self._duplicates_message())
                seen.add(id(p))
                if p.grad is None:
                    continue
                self._check_tensor(p)
                if layout is None:
                    self._check_unsharded(p, group)
                state = self.state[p]
                if not state:
                    self._init_state(p, state)  # a DTensor's state is DTensors too (checkpointable)
                chunk = self._chunk_elems(p, group)
                if layout is not None:
                    if not layout.holds(p):
                        raise RuntimeError(
                            f"{type(self).__name__}: a tensor of shape {tuple(p.shape)} is not in the attached "
                            "sharding layout, so its parameter rows are unknown. Re-attach the layout after the "
                            "engine rebuilds its partitions (see hf_adamp.sharding)."
                        )
                    segments = layout.segments(p, chunk)
                    for seg in segments:
                        if seg.slot >= 0 and slot_groups[seg.slot] is None:
                            slot_groups[seg.slot] = group
                else:
                    spec, segments = self._unsharded_segments(p, len(specs), offset, chunk)
                    if spec is not None:
                        specs.append(spec)
                        slot_groups.append(group)
                        keys.append(p)
                        offset += spec.rows
                grad = p.grad
                if is_dtensor(p):  # FSDP2: the step works on this rank's shard (its layout says which rows)
                    p, grad, state = p.to_local(), grad.to_local(), LocalState(state)
                    reusable = False
                target = None
                if not rows_dense(p):  # a strided view: the step works on a dense copy, written back after it
                    target, p, grad = p, p.contiguous(), grad.contiguous()
                    _make_state_dense(state, p.shape)
                    reusable = False
                if grad.stride() != p.stride():
                    grad = torch.empty_like(p, dtype=grad.dtype).copy_(grad)
                    reusable = False
                items.append(Item(p, grad, state, group, segments, specs=specs, target=target))
        return items, specs, slot_groups, keys, reusable

    def _unsharded_segments(
        self, p: Tensor, slot: int, offset: int, chunk: int
    ) -> tuple[ParamSpec | None, list[Segment]]:
        """An unsharded tensor's slot spec (None: never projected) and its segments, cached per tensor: they are
        the same every step (read-only lists)."""
        projectable = p.dim() > 1 and p.numel() > 0
        key = (p.shape, slot, offset, chunk) if projectable else (p.shape, -1, 0, chunk)
        cached = self._segments.get(id(p))
        if cached is None or cached[0] != key:
            n = p.numel()
            spec = ParamSpec(tuple(p.shape)) if projectable else ParamSpec((n,))
            piece = Piece(slot, 0, 0, n) if projectable else Piece(-1, 0, 0, n)
            cached = self._segments[id(p)] = (key, spec, split_piece(piece, spec, key[2], chunk))
        return (cached[1] if projectable else None), cached[2]

    def once_per_step(self, key: str, read: Callable[[], Any]) -> Any:
        """``read()`` the first time ``key`` is asked for in this step, its value afterwards (switches that
        read the environment cost more than the rest of a small tensor's step)."""
        cache = self._step_cache
        if key not in cache:
            cache[key] = read()
        return cache[key]

    def kernels_available(self) -> bool:
        return self.once_per_step("kernels", kernels.available)

    def _chunk_elems(self, p: Tensor, group: dict[str, Any]) -> int:
        """Segment size: whole pieces for the plain path and the fused CPU kernels (a run per piece),
        cache-sized chunks for the eager fast path."""
        if group.get("foreach") is False or (p.is_cpu and self.kernels_available()):
            return _WHOLE
        return CHUNK_ELEMS

    def _check_tensor(self, p: Tensor) -> None:
        name = type(self).__name__
        if p.grad.is_sparse:
            raise TypeError(f"{name} does not support sparse gradients (got a {p.grad.layout} gradient)")
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters (got {p.dtype})")
        if not p.is_floating_point():
            raise TypeError(f"{name} needs floating-point parameters (got {p.dtype})")

    def _decide(self, stats: Tensor, ctx: StepContext) -> tuple[projection.Decision, Tensor, Tensor]:
        """Per-slot hyperparameters as tensors, then the batched decision, decay multipliers and lr."""
        dtype, device = stats.dtype, stats.device
        # per group, then gathered per slot: delta, eps, lr, decay factors (not projected, projected)
        values = [(g["delta"], g["eps"], lr_of(g), *self._decay_factors(g)) for g in ctx.groups_of_slots]
        delta, eps, lr, plain, projected = torch.tensor(values, dtype=torch.float64)[ctx.slot_group].T.contiguous()
        if ctx.kernel_batches and device.type == "cpu":  # the same maths in one C++ loop
            found = kernels.module().decide(stats, ctx.slot_counts, ctx.slot_row_len, ctx.slot_numel, delta, eps)
            decision = projection.Decision(*found)
            as_t = lambda t: t.to(dtype)  # noqa: E731
        else:
            as_t = lambda t: t.to(dtype).to(device, non_blocking=True)  # noqa: E731
            counts = ctx.slot_counts.to(device, non_blocking=True)
            owner = torch.repeat_interleave(counts, output_size=stats.shape[1])  # row -> slot
            decision = projection.decide(
                stats, owner, as_t(ctx.slot_row_len), as_t(ctx.slot_numel), as_t(delta), as_t(eps)
            )
        decay = torch.where(decision.projected, as_t(projected), as_t(plain))
        return decision, decay, as_t(lr)

    def _stats_buffer(self, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The zeroed (4, rows) buffer of this step's sums, reused across steps (no allocation per step)."""
        key = (rows, dtype, device)
        buf = self._stats.get(key)
        if buf is None:
            buf = self._stats[key] = torch.zeros((projection.NUM_STATS, rows), dtype=dtype, device=device)
        else:
            buf.zero_()
        return buf

    # ----- helpers for subclasses -----
    def scratch(self, dtype: torch.dtype, device: torch.device, count: int, elems: int) -> list[Tensor]:
        """``count`` reusable flat buffers of at least ``elems`` elements (no page faults per step)."""
        key = (dtype, device)
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < count or buf.shape[1] < elems:
            rows = max(count, 0 if buf is None else buf.shape[0])
            cols = max(elems, CHUNK_ELEMS, 0 if buf is None else buf.shape[1])
            buf = torch.empty((rows, cols), dtype=dtype, device=device)
            self._scratch[key] = buf
        return [buf[i, :elems] for i in range(count)]

    def projection_decisions(self) -> dict[Any, str]:
        """What the last step decided for each projectable parameter: "channel", "layer" or "none".

        Keys are the parameters themselves, or their names when a sharding layout is attached.
        Reading this syncs with the device; it is meant for tests and logging, not for every step.
        """
        record = self.last_record
        if record is None:
            return {}
        kinds = record.kind.tolist()
        return {key: projection.DECISION_NAMES[k] for key, k in zip(record.keys, kinds, strict=True)}

    @property
    def last_record(self) -> StepRecord | None:
        """The last step's record over all layouts, projectable parameters only (tensor ops, no sync)."""
        records = list(self._records.values())
        if not records:
            return None
        keep = [i for i, k in enumerate(k for r in records for k in r.keys) if k is not None]
        if not keep:
            return None
        cat = [
            torch.cat(t) if len(records) > 1 else t[0] for t in zip(*((r.kind, r.weight_norm, r.lr) for r in records))
        ]
        index = torch.tensor(keep, device=cat[0].device)
        keys = [k for r in records for k in r.keys if k is not None]
        return StepRecord(keys, *(t.index_select(0, index) for t in cat))

    # ----- state_dict: keep fp32 state for half-precision parameters -----
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        originals: dict[int, dict[str, Any]] = {}
        # torch's load_state_dict ends in __setstate__, which rebuilds the runtime attributes; keep the
        # attached layouts and the record of given tensors, else a sharded optimizer resumed from a
        # checkpoint would lose its layout and take the engine's flat partitions for user parameters
        keep = {k: self.__dict__[k] for k in ("_layouts", "_reducer", "_records") if k in self.__dict__}
        keep["_given"] = dict(self.__dict__.get("_given", {}))
        keep["_given_multi_dim"] = self.__dict__.get("_given_multi_dim", False)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        for pid, p in zip(saved_ids, params):
            if p.dtype in (torch.float16, torch.bfloat16) and pid in saved_state:
                originals[id(p)] = saved_state[pid]
        super().load_state_dict(state_dict)
        self.__dict__.update(keep)
        for p in params:
            saved = originals.get(id(p))
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                    self.state[p][key] = value.to(dtype=torch.float32, device=p.device)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)


def is_dtensor(t: Tensor) -> bool:
    kind = type(t)
    known = _DTENSOR_TYPES.get(kind)
    if known is None:  # by name: DTensor is only importable where torch.distributed is built
        known = _DTENSOR_TYPES[kind] = any(c.__name__ == "DTensor" for c in kind.__mro__)
    return known


_DTENSOR_TYPES: dict[type, bool] = {}


def is_sharded_tensor(t: Tensor) -> bool:
    """A tensor that only ever holds a shard: an FSDP2 DTensor, an FSDP1 FlatParameter, or an original parameter
    of FSDP1 with use_orig_params=True (FSDP flags it; between steps it is a 1-D slice of this rank's shard)."""
    if is_dtensor(t) or getattr(t, "_is_flat_param", False):
        return True
    return bool(getattr(t, "_fsdp_flattened", False)) and t.dim() <= 1


class LocalState(MutableMapping):
    """A parameter's state seen through its local shards: DTensor entries read as ``to_local()`` views
    (in-place updates reach the DTensor), writes go to the real state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return value.to_local() if isinstance(value, Tensor) and is_dtensor(value) else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def rows_dense(t: Tensor) -> bool:
    """The tensor's elements fill its storage span with the first dimension outermost, so ``flat`` can view it.

    Row sums do not depend on the order inside a row, so any such dense layout works (contiguous, or
    channels_last for conv weights).
    """
    if t.is_contiguous():
        return True
    return t.dim() > 1 and t.stride(0) * t.shape[0] == t.numel() and sorted(t.stride())[0] == 1 and _is_dense(t)


def flat(t: Tensor) -> Tensor:
    """The tensor's storage as a 1-D view in memory order (see ``rows_dense``; the step gives other tensors a
    dense working copy)."""
    if t.is_contiguous():
        return t.view(-1)
    if rows_dense(t):
        return t.as_strided((t.numel(),), (1,))
    raise RuntimeError(
        f"hf_adamp: a tensor of shape {tuple(t.shape)} with strides {t.stride()} is not stored densely row by row"
    )


def _make_state_dense(state: MutableMapping[str, Any], shape: torch.Size) -> None:
    """State tensors of a strided parameter, made contiguous once (they then stay so) for its working copy."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape and not rows_dense(value):
            state[key] = value.contiguous()


def _is_dense(t: Tensor) -> bool:
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def seg_view(flat_tensor: Tensor, seg: Segment) -> Tensor:
    """The segment's elements as a (rows, row_len) view."""
    n = seg.rows * seg.row_len
    return flat_tensor[seg.start : seg.start + n].view(seg.rows, seg.row_len)


def compute_copy(t: Tensor) -> Tensor:
    """The tensor in its compute dtype: itself for fp32/fp64, an fp32 copy for fp16/bf16."""
    dt = state_dtype(t)
    return t if t.dtype == dt else t.to(dt)


def write_back(param: Tensor, computed: Tensor) -> None:
    if computed is not param:
        param.copy_(computed)


def load_segment(src: Tensor, buf: Tensor, seg: Segment, upcast: bool, negate: bool) -> Tensor:
    """A segment in the compute dtype: the view itself, or a copy in scratch memory."""
    if not upcast and not negate:
        return src
    out = buf.view(seg.rows, seg.row_len)
    if negate:
        torch.neg(src, out=out) if not upcast else out.copy_(src).neg_()
    else:
        out.copy_(src)
    return out
