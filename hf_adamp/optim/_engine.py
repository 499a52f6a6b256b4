"""The step engine shared by AdamP and SGDP: one place owns a step, the backends do the arithmetic.

A step runs in five phases:

1. collect: the tensors with gradients, their row segments and their backends (``backends.select_backend``),
   kept in a ``StepContext`` and reused while the tensors stay the same, so a step of many small tensors
   costs a few attribute reads per tensor;
2. pass 1 (``Backend.first``): count the step and compute its scalars once per (group, step count), as one
   record (``AdamScalars`` / ``SgdScalars``); every backend updates the moments of its tensors and accumulates
   the per-row sums ``g.p, g.g, p.p, p.u`` of every row segment into one ``(4, rows)`` buffer, and finishes
   element-wise (never projected) tensors right away;
3. reduce that buffer across ranks, once, if a sharding engine attached a reducer;
4. decide, for every parameter at once, from the reduced sums (``hf_adamp.projection``, tensor ops only);
5. pass 2 (``Backend.second``): project the update of each row segment, apply weight decay and the step; then
   remember each parameter's outcome (``last_projection``).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import kernels, projection
from .._tensors import make_state_dense, rows_dense, state_dtype
from ..sharding.auto import auto_attach
from ..sharding.detect import LocalState, is_dtensor, is_sharded_tensor
from ..sharding.layout import Layout, ParamSpec, Piece, Segment, split_piece
from . import backends
from ._step import MEMORY_KEY, Decided, Item, Switches, memory_of
from ._validation import lr_of
from .backends import Backend

Reducer = Callable[[Tensor], None]


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
    groups and their tensors, each gradient's dtype and strides, the state tensors, the environment switches.
    """

    layout: Layout | None
    items: list[Item]
    record_keys: list[Any]  # per slot: the parameter or its name; None for slots without rows
    total_rows: int
    stats_dtype: torch.dtype
    device: torch.device
    batches: list[tuple[Backend, Any]]  # per backend in use: its prepared batch
    remembering: list[Item]  # the items holding rows of projectable parameters (their memory is kept)
    state_dtypes: set[torch.dtype]
    # per slot: index into groups_of_slots (the last entry stands in for slots with no local piece)
    slot_group: Tensor
    groups_of_slots: list[dict[str, Any]]
    slot_counts: Tensor  # int64 rows per slot
    slot_row_len: Tensor  # float64
    slot_numel: Tensor  # float64
    reusable: bool
    # accelerators: the memory of all remembering items as one device tensor (the state holds views of it)
    memory: Tensor | None = None
    memory_slots: Tensor | None = None
    # what reuse checks
    groups: list[dict[str, Any]] = field(default_factory=list)
    group_params: list[list[Tensor]] = field(default_factory=list)
    flags: list[Any] = field(default_factory=list)
    # per tensor of the groups: the tensor, its item (None: no gradient), its strides and dtype
    checks: list[tuple[Tensor, Item | None, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    switches: Switches | None = None

    def reuses(self, opt: ProjectedOptimizer, layout: Layout | None, switches: Switches) -> bool:
        """Whether this context still describes the step's tensors; if so, hands each item its new gradient."""
        if layout is not self.layout or switches != self.switches:
            return False
        groups = opt.param_groups
        if len(groups) != len(self.groups):
            return False
        for group, known, params, flags in zip(groups, self.groups, self.group_params, self.flags):
            ps = group["params"]
            if group is not known or _flags(group) != flags or len(ps) != len(params):
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
        return all(backend.holds(batch) for backend, batch in self.batches)

    def release(self) -> None:
        """End of a step: drop what must not outlive it (gradients, the reference's whole-tensor updates)."""
        for item in self.items:
            item.grad = None  # type: ignore[assignment]
        for backend, batch in self.batches:
            backend.release(batch)


def _flags(group: dict[str, Any]) -> tuple[Any, Any]:
    """The constructor flags of a group that choose its tensors' backends."""
    return group.get("foreach"), group.get("fused")


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
        self._backends: dict[str, Backend] = backends.create(self._RULE)  # they keep their own scratch buffers
        self._stats: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
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
            group.setdefault("fused", None)
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
        for backend in self._backends.values():
            backend.clear()
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
    _RULE: Any = None  # rules.AdamRule / rules.SgdRule: state, step count, per-step scalars, decay multipliers

    # ----- the step -----
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        layout = self._active_layout()
        ctx = self._context(layout, self._read_switches())
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
        decays = self._count_step(ctx.items)
        for backend, batch in ctx.batches:
            backend.first(batch, stats, ctx.switches)

        if sharded:
            self._reducer(stats)

        record_key = id(ctx.layout) if ctx.layout is not None else None
        if ctx.total_rows == 0 or not ctx.items:
            self._records.pop(record_key, None)
            return
        decision, decay, lr = self._decide(stats, ctx, decays)
        self._records[record_key] = StepRecord(ctx.record_keys, decision.kind, decision.weight_norm, lr)
        decided = Decided({dt: decision.coef.to(dt) for dt in ctx.state_dtypes}, decay, decision.kind)
        for backend, batch in ctx.batches:
            backend.second(batch, decided)
        self._remember(ctx, decided)

    def _count_step(self, items: list[Item]) -> dict[int, tuple[float, float]]:
        """Count the step in every tensor's state and hand each tensor its scalars, computed once per group and
        step count (tensors added later count fewer steps). Returns the groups' decay multipliers (by id)."""
        rule = self._RULE
        advance = rule.advance
        computed: dict[tuple[int, int], Any] = {}
        decays: dict[int, tuple[float, float]] = {}
        for item in items:
            group = item.group
            step = advance(item.state)
            key = (id(group), step)
            scalars = computed.get(key)
            if scalars is None:
                factors = decays.get(id(group))
                if factors is None:
                    factors = decays[id(group)] = rule.decays(group)
                scalars = computed[key] = rule.scalars(group, step, factors)
            item.scalars = scalars
        return decays

    def _remember(self, ctx: StepContext, decided: Decided) -> None:
        """Keep each parameter's outcome in its state (``last_projection``): ``last + 3 * the one before``, one
        entry per slot of the tensor. Host ints on the CPU; on accelerators one device tensor for all tensors,
        updated in place, whose views the states hold (no step reads the device)."""
        if not ctx.remembering:
            return
        if ctx.device.type == "cpu":
            kinds = decided.kinds()
            for item in ctx.remembering:
                old = item.state.get(MEMORY_KEY)
                if type(old) is not list or len(old) != len(item.slots):  # the common case costs two checks
                    old = memory_of(item)
                if old is None:
                    item.state[MEMORY_KEY] = [kinds[s] for s in item.slots]
                else:
                    item.state[MEMORY_KEY] = [kinds[s] + 3 * (old[k] % 3) for k, s in enumerate(item.slots)]
            return
        if ctx.memory is None:
            self._device_memory(ctx)
        memory = ctx.memory
        newest = decided.kind.index_select(0, ctx.memory_slots).to(memory.dtype)
        memory.copy_(newest + memory.remainder(3) * 3)

    @staticmethod
    def _device_memory(ctx: StepContext) -> None:
        """The remembering items' memory gathered into one device tensor, the states given views of it (a memory
        that is a device tensor already is not read on the host)."""
        parts, slots = [], []
        for item in ctx.remembering:
            known = item.state.get(MEMORY_KEY)
            if not (isinstance(known, Tensor) and known.shape == (len(item.slots),)):
                known = memory_of(item) or [projection.NONE] * len(item.slots)
                known = torch.tensor(known, dtype=torch.int64)
            parts.append(known.to(ctx.device, torch.int64))
            slots += item.slots
        ctx.memory = torch.cat(parts)
        ctx.memory_slots = torch.tensor(slots, dtype=torch.int64).to(ctx.device)
        at = 0
        for item in ctx.remembering:
            item.state[MEMORY_KEY] = ctx.memory[at : at + len(item.slots)]
            at += len(item.slots)

    def _read_switches(self) -> Switches:
        disabled = kernels.disabled_by_env()
        return Switches.read(disabled, not disabled and kernels.available())

    def _context(self, layout: Layout | None, switches: Switches) -> StepContext:
        """The step's context: the last one while it still describes the tensors, else a new one."""
        key = id(layout) if layout is not None else None
        ctx = self._contexts.get(key)
        if ctx is not None and ctx.reuses(self, layout, switches):
            return ctx
        self._contexts.pop(key, None)
        if layout is None and self._engine_replaced_tensors() and auto_attach(self):
            layout = self._active_layout()
            key = id(layout) if layout is not None else None
        ctx = self._new_context(layout, switches)
        if ctx.reusable:
            self._contexts[key] = ctx
        return ctx

    def _new_context(self, layout: Layout | None, switches: Switches) -> StepContext:
        items, chosen, specs, slot_groups, keys, reusable = self._collect(layout, switches)
        # dtype and device from all tensors, not only those with gradients, so every rank agrees
        tensors = [p for group in self.param_groups for p in group["params"]]
        device = tensors[0].device if tensors else torch.device("cpu")
        # the sums in fp64 on CPU: fp32 ones overflow at |g| or |p| ~ 1e19, where the reference's normalised sums
        # do not (on accelerators fp32, the Triton kernels' accumulators)
        wide = device.type == "cpu" or any(state_dtype(p) == torch.float64 for p in tensors)
        stats_dtype = torch.float64 if wide else torch.float32
        by_backend: dict[str, list[Item]] = {}
        for item, backend in zip(items, chosen):
            by_backend.setdefault(backend.name, []).append(item)
        # the order of the backends' passes: the C++ kernels first (one call for all their tensors)
        order = [name for name in ("cpu", "triton", "eager", "reference") if name in by_backend]
        batches = [(self._backends[n], self._backends[n].prepare(by_backend[n])) for n in order]
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
            batches=batches,
            remembering=[item for item in items if item.slots],
            state_dtypes={state_dtype(item.param) for item in items},
            slot_group=torch.tensor(slot_group, dtype=torch.int64),
            groups_of_slots=groups_of_slots,
            slot_counts=torch.tensor([s.rows for s in specs], dtype=torch.int64),
            slot_row_len=torch.tensor([float(max(s.row_len, 1)) for s in specs], dtype=torch.float64),
            slot_numel=torch.tensor([float(max(s.numel, 1)) for s in specs], dtype=torch.float64),
            reusable=reusable,
            switches=switches,
        )
        if reusable:
            ctx.groups = list(self.param_groups)
            ctx.group_params = [list(g["params"]) for g in self.param_groups]
            ctx.flags = [_flags(g) for g in self.param_groups]
            ctx.checks = [(p, item_of.get(id(p)), p.stride(), p.dtype) for p in tensors]
        return ctx

    def _collect(
        self, layout: Layout | None, switches: Switches
    ) -> tuple[list[Item], list[Backend], list[ParamSpec], list[dict[str, Any] | None], list[Any], bool]:
        """Tensors with gradients, their backends and segments, the table of parameter slots, and whether all this
        can be reused at the next step (only the user's dense tensors were seen: no DTensor shard, no gradient
        copied)."""
        items: list[Item] = []
        chosen: list[Backend] = []
        reusable = True
        specs: list[ParamSpec] = [] if layout is None else layout.params
        slot_groups: list[dict[str, Any] | None] = [None] * len(specs)
        keys: list[Any] = [] if layout is None else [s.name for s in specs]
        offset = 0
        seen: set[int] = set()
        owner = type(self).__name__
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
                elif not layout.holds(p):
                    raise RuntimeError(
                        f"{owner}: a tensor of shape {tuple(p.shape)} is not in the attached "
                        "sharding layout, so its parameter rows are unknown. Re-attach the layout after the "
                        "engine rebuilds its partitions (see hf_adamp.sharding)."
                    )
                state = self.state[p]
                if not state:
                    self._RULE.init_state(p, state)  # a DTensor's state is DTensors too (checkpointable)
                local, grad, local_state = p, p.grad, state
                if is_dtensor(p):  # FSDP2: the step works on this rank's shard (its layout says which rows)
                    local, grad, local_state = p.to_local(), grad.to_local(), LocalState(state)
                    reusable = False
                target = None
                if not rows_dense(local):  # a strided view: the step works on a dense copy, written back after it
                    target, local, grad = local, local.contiguous(), grad.contiguous()
                    make_state_dense(local_state, local.shape)
                    reusable = False
                if grad.stride() != local.stride():
                    grad = torch.empty_like(local, dtype=grad.dtype).copy_(grad)
                    reusable = False
                item = Item(local, grad, local_state, group, [], specs=specs, target=target)
                backend = backends.select_backend(item, switches, self._backends, owner)
                chunk = backend.segment_elems()
                if layout is not None:
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
                item.segments = segments
                item.slots = tuple(dict.fromkeys(seg.slot for seg in segments if seg.slot >= 0))
                items.append(item)
                chosen.append(backend)
        return items, chosen, specs, slot_groups, keys, reusable

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

    def _check_tensor(self, p: Tensor) -> None:
        name = type(self).__name__
        if p.grad.is_sparse:
            raise TypeError(f"{name} does not support sparse gradients (got a {p.grad.layout} gradient)")
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters (got {p.dtype})")
        if not p.is_floating_point():
            raise TypeError(f"{name} needs floating-point parameters (got {p.dtype})")

    def _decide(
        self, stats: Tensor, ctx: StepContext, decays: dict[int, tuple[float, float]]
    ) -> tuple[projection.Decision, Tensor, Tensor]:
        """Per-slot hyperparameters as tensors, then the batched decision, decay multipliers and lr."""
        dtype, device = stats.dtype, stats.device
        # per group, then gathered per slot: delta, eps, lr, decay factors (not projected, projected)
        rule = self._RULE
        values = [(g["delta"], g["eps"], lr_of(g), *(decays.get(id(g)) or rule.decays(g))) for g in ctx.groups_of_slots]
        delta, eps, lr, plain, projected = torch.tensor(values, dtype=torch.float64)[ctx.slot_group].T.contiguous()
        decider = next((b for b, _ in ctx.batches if b.decides_on_host), None)
        if decider is not None and device.type == "cpu":  # the same maths in one C++ loop
            decision = decider.decide(stats, ctx.slot_counts, ctx.slot_row_len, ctx.slot_numel, delta, eps)
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
            group.setdefault("fused", None)
