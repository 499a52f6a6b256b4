"""A fresh process for the kernel build tests: loads (or builds) hf_adamp's CPU kernels, takes a few AdamP steps.

    python _kernel_build_worker.py OUT.pt

``hf_adamp`` comes from PYTHONPATH (a copy of the package, in some tests). Saves the weights to OUT.pt and prints
one line ``RESULT {json}``: the package's path, whether the kernels are available, and which library was loaded.
"""

from __future__ import annotations

import json
import logging
import sys

import torch

import hf_adamp
from hf_adamp import kernels

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
result: dict = {"package": hf_adamp.__file__, "available": kernels.available()}
if result["available"]:
    lib = kernels.module()
    result.update(path=str(lib.path), key=lib.key, built=lib.built, marker=hasattr(lib.lib, "hf_adamp_test_marker"))
params = [
    torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(),
    torch.zeros(16).requires_grad_(),
]
opt = hf_adamp.AdamP(params, lr=0.01, weight_decay=0.1)
for step in range(5):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
torch.save([p.detach() for p in params], sys.argv[1])
print("RESULT " + json.dumps(result), flush=True)
