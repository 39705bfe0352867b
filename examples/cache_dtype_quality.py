"""What a bfloat16 KV cache costs in quality: a trained model reads held-out text token by token (teacher
forcing) through its cache, once with the exact cache and once with `cache_dtype=torch.bfloat16`.

Prints both caches' bits/byte on the same text, the largest difference in any logit, and how often the most
likely next byte differs. The text: `--rows` evenly spaced windows of `--length + 1` bytes from the
validation split of the corpus the run was trained on (the built-in corpus by default), the first byte
of each window as its prompt.
Run: python examples/cache_dtype_quality.py [--checkpoint runs/latest] [--rows 16] [--length 1024] [--data PATH]
"""

from __future__ import annotations

import argparse
import math

import torch

from windowed_attention.generation import decode_step, prefill
from windowed_attention.training import load_run
from windowed_attention.training.data import eval_batches, load_corpus


@torch.no_grad()
def read_through(model, text: torch.Tensor, cache_dtype) -> torch.Tensor:
    """Logits `(b, n - 1, vocab)` of every next byte of `text` `(b, n)`, decoding one byte at a time."""
    logits, caches = prefill(model, text[:, :1], cache_dtype=cache_dtype)
    out = [logits]
    for t in range(1, text.shape[1] - 1):
        logits, caches = decode_step(model, text[:, t:t + 1], caches)
        out.append(logits)
    return torch.stack(out, dim=1).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/latest")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--data", default=None, help="the corpus the run was trained on (default: the built-in one)")
    args = parser.parse_args()

    model = load_run(args.checkpoint).model
    text = eval_batches(load_corpus(args.data).val, args.length, args.rows, 1)[0][0]
    targets = text[:, 1:]
    exact = read_through(model, text, None)
    reduced = read_through(model, text, torch.bfloat16)

    def bits_per_byte(logits):
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())) / math.log(2)

    exact_bpb, reduced_bpb = bits_per_byte(exact), bits_per_byte(reduced)
    print(f"{args.rows} rows x {args.length} bytes of held-out text, read through the cache one byte at a time")
    print(f"exact cache:    {exact_bpb:.5f} bits/byte")
    print(f"bfloat16 cache: {reduced_bpb:.5f} bits/byte ({reduced_bpb - exact_bpb:+.5f})")
    print(f"largest logit difference: {float((reduced - exact).abs().max()):.4f} "
          f"(logits span {float(exact.amax() - exact.amin()):.1f})")
    flips = (reduced.argmax(-1) != exact.argmax(-1)).double().mean()
    print(f"most likely next byte differs at {100 * float(flips):.3f}% of positions")


if __name__ == "__main__":
    main()
