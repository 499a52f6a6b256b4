"""Train a small GPT-2-style language model on CPU with AdamW and with AdamP, and print both losses.

    python examples/compare_optimizers.py --train_file path/to/wikitext-2/train.txt
    python examples/compare_optimizers.py            # WikiText-2 from the Hugging Face hub

The two runs start from the same weights and see the same batches; only the optimizer differs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_adamp


def read_lines(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.train_file:
        with open(args.train_file, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("=")]
    else:
        try:
            from datasets import load_dataset

            data = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")
        except Exception as err:  # no hub access and no local file
            raise SystemExit(
                f"Could not load WikiText-2 from the hub ({type(err).__name__}: {err}). "
                "Pass a local text file with --train_file."
            ) from err
        lines = [t.strip() for t in data["text"] if t.strip() and not t.strip().startswith("=")]
    lines = lines[: args.max_lines]
    cut = max(1, len(lines) // 10)
    return lines[cut:], lines[:cut]


def build_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"]))
    return tok


def to_blocks(tok, lines: list[str], block: int) -> torch.Tensor:
    eos = tok.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tok.encode_batch(lines):
        ids += enc.ids + [eos]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i : i + batch]
            losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", help="a plain-text file, one paragraph a line (e.g. WikiText-2 train.txt)")
    ap.add_argument("--max_lines", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight_norm", action="store_true", help="weight-normalise the Transformer projections")
    args = ap.parse_args()

    train_lines, valid_lines = read_lines(args)
    tok = build_tokenizer(train_lines, vocab_size=2000)
    train, valid = to_blocks(tok, train_lines, 64), to_blocks(tok, valid_lines, 64)[:256]
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(args.seed)
    init = GPT2LMHeadModel(config).state_dict()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    print(f"{len(train)} training blocks of 64 tokens, {len(valid)} validation blocks, {args.steps} steps")

    results = {}
    for name, make in {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=args.weight_decay),
        "AdamP": lambda ps: hf_adamp.AdamP(ps, lr=args.lr, weight_decay=args.weight_decay),
    }.items():
        model = GPT2LMHeadModel(config)
        model.load_state_dict(init)
        if args.weight_norm:
            hf_adamp.apply_weight_norm(model)
        norm_before = hf_adamp.scale_invariant_metrics(model, args.lr).get("scale_invariant/weight_norm")
        opt = make(model.parameters())
        start = time.perf_counter()
        for step in range(args.steps):
            idx = order[(step * 16) % len(order) :][:16]
            x = train[idx]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 20 == 0 or step == args.steps - 1:
                print(f"  {name} step {step:4d}  loss {loss.item():.3f}")
        valid_loss = evaluate(model, valid, 32)
        results[name] = valid_loss
        print(
            f"{name}: validation loss {valid_loss:.3f}, perplexity {math.exp(valid_loss):.1f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if norm_before is not None:
            norm_after = hf_adamp.scale_invariant_metrics(model, args.lr)["scale_invariant/weight_norm"]
            print(f"{name}: norm of the weight-normalised directions {norm_before:.2f} -> {norm_after:.2f}")
    print("final validation loss: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
