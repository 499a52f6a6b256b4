"""``TrainingArguments(optim="adamp" | "sgdp" | "radam")`` for the stock ``transformers.Trainer``.

transformers has a closed ``OptimizerNames`` enum and no public registry, so this
module adds three members to the enum and routes those names, before the stock ``optim_args`` parsing,
through ``Trainer.get_optimizer_cls_and_kwargs``. Everything here is idempotent: a patch applied twice
leaves the same state as once. The patches land when the transformers modules load (see
``_post_import``), so ``import hf_adamp`` stays cheap.

Hyperparameters, as for ``optim="adamw_torch"``: ``learning_rate``; ``adam_beta1``/``adam_beta2`` and
``adam_epsilon`` (AdamP and RAdam); ``weight_decay`` with the Trainer's decay / no-decay groups. The
rest comes from ``optim_args`` (see ``OPTIM_ARGS``), converted to real types and checked.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..optim import SGDP, AdamP, RAdam
from ._post_import import when_imported

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

# SGDP's own default momentum is 0 (plain SGD). Through the Trainer the default is 0.9: the AdamP paper
# trains with SGDP at momentum 0.9, the reference README does too, and SGD without momentum is rarely
# what anyone wants for a Transformer. ``optim_args="momentum=0"`` gives the class default back.
SGDP_TRAINER_MOMENTUM = 0.9

# Marks what this module added to transformers, so re-registration recognises its own work.
_MARK = "_hf_adamp_"


# ----- optim_args: the extra hyperparameters, with their types and valid ranges -----
@dataclass(frozen=True)
class OptimArg:
    kind: type  # float or bool
    low: float = 0.0
    high: float = math.inf
    high_inclusive: bool = True
    meaning: str = ""

    def convert(self, key: str, raw: Any) -> Any:
        if self.kind is bool:
            return _to_bool(key, raw)
        value = _to_float(key, raw)
        inside = self.low <= value and (value <= self.high if self.high_inclusive else value < self.high)
        if not inside:
            bracket = "]" if self.high_inclusive else ")"
            high = "inf" if math.isinf(self.high) else f"{self.high:g}"
            raise ValueError(
                f"optim_args: {key}={raw!s} is out of range: {key} must be in [{self.low:g}, {high}{bracket}"
            )
        return value


_DELTA = OptimArg(float, meaning="cosine threshold of the projection test, delta / sqrt(row length)")
_WD_RATIO = OptimArg(float, high=1.0, meaning="weight-decay multiplier for projected parameters")
_NESTEROV = OptimArg(bool, meaning="Nesterov momentum")
_FUSED = OptimArg(bool, meaning="true: hf_adamp's kernels or an error; false: never them (default: the fastest)")

OPTIM_ARGS: dict[str, dict[str, OptimArg]] = {
    "adamp": {"delta": _DELTA, "wd_ratio": _WD_RATIO, "nesterov": _NESTEROV, "fused": _FUSED},
    "sgdp": {
        "momentum": OptimArg(float, high=1.0, high_inclusive=False, meaning=f"default {SGDP_TRAINER_MOMENTUM}"),
        "dampening": OptimArg(float, high=1.0),
        "nesterov": _NESTEROV,
        "eps": OptimArg(float, meaning="norm floor of the cosine test and the projection"),
        "delta": _DELTA,
        "wd_ratio": _WD_RATIO,
        "fused": _FUSED,
    },
    "radam": {"decoupled_weight_decay": OptimArg(bool, meaning="AdamW-style decay (default true)")},
}
# Keys that would set a TrainingArguments field twice: say which field to use instead.
_FROM_TRAINING_ARGS = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "betas": "adam_beta1 / adam_beta2",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "weight_decay": "weight_decay",
}

OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"adamp": AdamP, "sgdp": SGDP, "radam": RAdam}
OPTIM_NAMES: tuple[str, ...] = tuple(OPTIMIZER_CLASSES)


def _to_float(key: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"optim_args: {key}={raw} is not a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"optim_args: {key}={raw!s} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"optim_args: {key}={raw!s} must be a finite number")
    return value


def _to_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"optim_args: {key}={raw!s} is not a boolean: use true or false")


def _split_optim_args(optim_args: str) -> dict[str, str]:
    """``"k=v, k2=v2"`` -> ``{"k": "v", "k2": "v2"}``; empty pieces (a trailing comma) are ignored."""
    pairs: dict[str, str] = {}
    for piece in optim_args.split(","):
        piece = piece.strip()
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"optim_args: {piece!r} is not of the form key=value (in {optim_args!r})")
        if key in pairs:
            raise ValueError(f"optim_args: {key} is given twice (in {optim_args!r})")
        pairs[key] = value
    return pairs


def parse_optim_args(optim: str, optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``optim_args`` of an hf-adamp optimizer, as keyword arguments of its class.

    Accepts the ``TrainingArguments.optim_args`` string (``"delta=0.2,nesterov=true"``) or a mapping.
    Raises ``ValueError`` naming the valid keys on an unknown key, and a clear message on a bad value.
    """
    name = _optim_value(optim)
    if name not in OPTIM_ARGS:
        raise ValueError(f"{name!r} is not an hf-adamp optimizer; expected one of {', '.join(OPTIM_NAMES)}")
    if optim_args is None or optim_args == "":
        return {}
    raw = dict(optim_args) if isinstance(optim_args, Mapping) else _split_optim_args(str(optim_args))
    spec = OPTIM_ARGS[name]
    valid = ", ".join(sorted(spec)) or "(none)"
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in spec:
            hint = ""
            if key in _FROM_TRAINING_ARGS:
                hint = f" Set it with the TrainingArguments field {_FROM_TRAINING_ARGS[key]} instead."
            elif key == "eps":
                hint = " Set it with the TrainingArguments field adam_epsilon instead."
            raise ValueError(f"optim_args: unknown key {key!r} for optim={name!r}. Valid keys: {valid}.{hint}")
        kwargs[key] = spec[key].convert(key, value)
    if name == "sgdp" and kwargs.get("nesterov") and kwargs.get("momentum", SGDP_TRAINER_MOMENTUM) <= 0:
        raise ValueError("optim_args: nesterov=true needs momentum > 0 for optim='sgdp'")
    return kwargs


def _optim_value(optim: Any) -> str:
    return optim.value if isinstance(optim, Enum) else str(optim)


def is_hf_adamp_optim(optim: Any) -> bool:
    """Whether a ``TrainingArguments.optim`` value names one of our optimizers."""
    return _optim_value(optim) in OPTIMIZER_CLASSES


# ----- the optimizer from TrainingArguments -----
def optimizer_cls_and_kwargs(args: TrainingArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and keyword arguments for ``args.optim`` (without params and weight decay, which come
    per parameter group), as ``Trainer.get_optimizer_cls_and_kwargs`` returns them."""
    name = _optim_value(args.optim)
    extra = parse_optim_args(name, args.optim_args)
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if name in ("adamp", "radam"):
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    else:
        kwargs["momentum"] = SGDP_TRAINER_MOMENTUM
    kwargs.update(extra)
    return OPTIMIZER_CLASSES[name], kwargs


_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay, by the Trainer's rule: everything except biases,
    norm weights and parameters of ``nn.LayerNorm`` modules (``Trainer.get_decay_parameter_names``)."""
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], list(_NO_DECAY_NAME_PATTERNS))


def trainer_param_groups(
    model: nn.Module, weight_decay: float, decay_names: list[str] | None = None
) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups: decayed parameters, and the rest with ``weight_decay=0``."""
    decay = set(decay_parameter_names(model) if decay_names is None else decay_names)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]


def create_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer ``Trainer`` would build for ``model`` and ``args``: for your own loop or Trainer subclass.

    ``args.optim`` must be "adamp", "sgdp" or "radam". Example::

        args = TrainingArguments("out", optim="adamp", learning_rate=1e-3, weight_decay=0.01,
                                 optim_args="delta=0.1,wd_ratio=0.1,nesterov=true")
        optimizer = hf_adamp.create_optimizer(model, args)
    """
    if not is_hf_adamp_optim(args.optim):
        raise ValueError(
            f"create_optimizer builds hf-adamp optimizers only; args.optim is {_optim_value(args.optim)!r}, "
            f"expected one of {', '.join(OPTIM_NAMES)}"
        )
    cls, kwargs = optimizer_cls_and_kwargs(args)
    return cls(trainer_param_groups(model, args.weight_decay), **kwargs)


# ----- registration in transformers -----
def register_optimizer_names(training_args: ModuleType) -> None:
    """Add "adamp", "sgdp", "radam" to ``transformers.training_args.OptimizerNames`` (idempotent).

    The enum is what ``TrainingArguments.__post_init__``, ``set_optimizer``, ``HfArgumentParser`` choices
    and unpickling of ``training_args.bin`` consult. A name transformers already defines is left alone.
    """
    enum_cls = training_args.OptimizerNames
    for value in OPTIM_NAMES:
        existing = enum_cls._value2member_map_.get(value)
        if existing is not None:
            if not getattr(existing, _MARK, False):
                logger.warning(
                    "transformers defines optim=%r itself; hf_adamp leaves it alone (use hf_adamp.%s directly).",
                    value,
                    OPTIMIZER_CLASSES[value].__name__,
                )
            continue
        name = value.upper()
        if name in enum_cls._member_map_ or name in vars(enum_cls):
            name = f"HF_ADAMP_{name}"
        _add_enum_member(enum_cls, name, value)


def _add_enum_member(enum_cls: type[Enum], name: str, value: str) -> None:
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    setattr(member, _MARK, True)
    enum_cls._value2member_map_[value] = member
    enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new members


def register_optim_args_check(training_args: ModuleType) -> None:
    """Check ``optim_args`` of our names when ``TrainingArguments`` is built or ``set_optimizer`` is called, so a
    typo fails before the model and the data are loaded (idempotent: a previous wrapper of ours is replaced)."""
    args_cls = training_args.TrainingArguments

    def check(args: Any) -> None:
        if _is_ours(args.optim):
            parse_optim_args(_optim_value(args.optim), args.optim_args)

    def checked(original: Callable[..., Any], before: bool) -> Callable[..., Any]:
        while getattr(original, _MARK, False):
            original = original.__wrapped__

        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if before:  # __post_init__: before the stock checks and the device setup
                check(self)
            result = original(self, *args, **kwargs)
            if not before:
                check(self)
            return result

        setattr(wrapper, _MARK, True)
        return wrapper

    args_cls.__post_init__ = checked(args_cls.__post_init__, before=True)
    args_cls.set_optimizer = checked(args_cls.set_optimizer, before=False)


def _hf_adamp_handler(ctx: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Handler for transformers' ``_OPTIMIZER_HANDLERS`` table; parses ``optim_args`` itself."""
    return optimizer_cls_and_kwargs(ctx.args)


setattr(_hf_adamp_handler, _MARK, True)


def register_handlers(trainer_optimizer: ModuleType) -> None:
    """Add our names to transformers' private handler table, for code that reads it directly.

    The Trainer itself reaches us through ``Trainer.get_optimizer_cls_and_kwargs`` (see
    ``register_trainer``), which must come first: the stock path parses ``optim_args`` before
    calling a handler, and that parser breaks on input ours reports clearly.
    """
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        return
    enum_map = trainer_optimizer.OptimizerNames._value2member_map_
    for value in OPTIM_NAMES:
        member = enum_map.get(value)
        if member is None or not getattr(member, _MARK, False):
            continue
        current = handlers.get(member)
        if current is None or getattr(current, _MARK, False):
            handlers[member] = _hf_adamp_handler


def register_trainer(trainer_module: ModuleType) -> None:
    """Wrap the ``Trainer.get_optimizer_cls_and_kwargs`` staticmethod (idempotent: a previous wrapper
    of ours is replaced, never wrapped again)."""
    trainer_cls = trainer_module.Trainer
    original: Callable[..., Any] = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs").__func__
    while getattr(original, _MARK, False):
        original = original.__wrapped__

    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: nn.Module | None = None) -> tuple[Any, Any]:
        if _is_ours(args.optim):
            return optimizer_cls_and_kwargs(args)
        return original(args, model)

    setattr(get_optimizer_cls_and_kwargs, _MARK, True)
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _is_ours(optim: Any) -> bool:
    """A name we registered (a built-in with the same spelling would stay transformers')."""
    if isinstance(optim, Enum):
        return bool(getattr(optim, _MARK, False))
    from transformers.training_args import OptimizerNames

    member = OptimizerNames._value2member_map_.get(str(optim))
    return bool(getattr(member, _MARK, False))


def install() -> None:
    """Register the Trainer options now or when transformers loads (called by ``import hf_adamp``)."""
    when_imported("transformers.training_args", "optimizer_names", register_optimizer_names)
    when_imported("transformers.training_args", "optim_args_check", register_optim_args_check)
    when_imported("transformers.trainer_optimizer", "optimizer_handlers", register_handlers)
    when_imported("transformers.trainer", "trainer_optimizer_cls", register_trainer)
