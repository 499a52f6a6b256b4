"""A plain Accelerate training loop with hf_adamp's AdamP (or SGDP / RAdam).

    accelerate launch examples/accelerate_loop.py --optim adamp --steps 20
    accelerate launch --cpu examples/accelerate_loop.py --optim sgdp --optim_args "momentum=0.9,nesterov=true"
    python examples/accelerate_loop.py            # one process works too

The optimizer is built by ``hf_adamp.create_optimizer`` from ``TrainingArguments``, with the Trainer's
decay / no-decay parameter groups, so the loop trains with exactly what ``Trainer(optim=...)`` would use.
A tiny GPT-2 on random tokens keeps it offline; swap in your model and data.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_adamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optim", default="adamp", choices=["adamp", "sgdp", "radam"])
    parser.add_argument("--optim_args", default="delta=0.1,wd_ratio=0.1")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()
    if opts.optim == "radam" and opts.optim_args == parser.get_default("optim_args"):
        opts.optim_args = None  # delta / wd_ratio belong to AdamP and SGDP

    # TrainingArguments resets Accelerate's state: build it before the Accelerator.
    args = TrainingArguments(
        "accelerate_loop_out",
        optim=opts.optim,
        optim_args=opts.optim_args,
        learning_rate=opts.lr,
        weight_decay=opts.weight_decay,
        report_to=[],
    )
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    )
    tokens = torch.randint(0, 128, (64, 32))
    loader = torch.utils.data.DataLoader(tokens, batch_size=8, shuffle=True)

    optimizer = hf_adamp.create_optimizer(model, args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    step = 0
    while step < opts.steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 5 == 0 or step == opts.steps:
                accelerator.print(f"step {step:3d}  loss {loss.item():.4f}")
            if step == opts.steps:
                break
    accelerator.print(f"trained with {type(optimizer.optimizer).__name__}")


if __name__ == "__main__":
    main()
