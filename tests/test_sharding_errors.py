"""Single process: unmappable tensors raise a clear error (never silent AdamW); attach() on what it cannot
map refuses; the collective's size at GPT-2-small shapes."""

from __future__ import annotations

import pytest
import torch

import hf_adamp
from hf_adamp.sharding import Layout, ParamSpec, attach


@pytest.mark.parametrize("cls,kw", [(hf_adamp.AdamP, {}), (hf_adamp.SGDP, dict(lr=0.1, momentum=0.9))])
def test_flat_partition_without_layout_raises(cls, kw) -> None:
    model = torch.nn.Linear(6, 4)
    opt = cls(model.parameters(), **kw)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()  # the user's own parameters: fine
    # what a ZeRO engine does: swap in a flat partition of the same elements
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="no sharding layout maps"):
        opt.step()


def test_one_dim_only_model_is_not_refused() -> None:
    """A model with only 1-D parameters is never projected: a 1-D tensor there is no sign of sharding."""
    p = torch.zeros(5, requires_grad=True)
    opt = hf_adamp.AdamP([p])
    q = torch.zeros(5, requires_grad=True)
    q.grad = torch.ones(5)
    opt.param_groups[0]["params"] = [q]
    opt.step()


def test_attach_refuses_unknown_objects_and_accepts_plain_models() -> None:
    model = torch.nn.Linear(3, 2)
    opt = hf_adamp.AdamP(model.parameters())
    with pytest.raises(TypeError, match="don't know how"):
        attach(object(), opt)
    assert attach(model, opt) == []  # plain / DDP: the parameters themselves


def test_gpt2_small_collective_bytes() -> None:
    """One all_reduce per step of 4 fp32 sums per row of every >1-D parameter."""
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,)]
        shapes += [(768, 3072), (3072,), (3072, 768), (768,)]
    shapes += [(768,), (768,)]
    assert len(shapes) == 148
    layout = Layout([ParamSpec(s) for s in shapes], {})
    assert layout.total_rows == 50257 + 1024 + 12 * (768 + 768 + 768 + 3072) == 115_793
    assert layout.collective_bytes() == 1_852_688  # ~1.85 MB/step (fp32); 3.7 MB in fp64
    assert layout.collective_bytes(8) == 2 * 1_852_688


def test_load_state_dict_keeps_layout_and_refusal() -> None:
    """torch's load_state_dict calls __setstate__: it must not drop the attached layout, nor take an
    engine's flat partition for a user parameter (DeepSpeed load_checkpoint went silently AdamW so)."""
    model = torch.nn.Linear(6, 4)
    opt = hf_adamp.AdamP(model.parameters())
    flat = torch.zeros(28, requires_grad=True)
    flat.grad = torch.randn(28)
    opt.param_groups[0]["params"] = [flat]
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="no sharding layout maps"):
        opt.step()
    layout = Layout([ParamSpec((4, 6)), ParamSpec((4,))], {id(flat): []})
    opt.attach_layout(layout, lambda t: None)
    opt.load_state_dict(opt.state_dict())
    assert opt._layout is layout
