"""Attention forward + backward on CPU: lmforge's plain-matmul path (``grouped_attention``) vs the fused
``F.scaled_dot_product_attention`` kernel that transformers (and lmforge above ``SHORT_BF16`` keys) use.

It backs the switch in ``models/attention.py``: bfloat16 sequences of at most ``SHORT_BF16`` keys take the
plain path on CPU. For each shape and dtype it times causal attention with grouped-query heads, forward and
backward, --repeats times alternating the two (median), and prints the ratio fused / plain (> 1: the plain
path is faster).

    python bench/attention.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.models.attention import SHORT_BF16, grouped_attention

SHAPES = [  # batch, query heads, key/value heads, sequence, head size
    (8, 8, 4, 64, 32), (8, 8, 4, 128, 32), (8, 8, 4, 256, 32),
    (4, 9, 3, 128, 64), (4, 9, 3, 355, 64), (4, 9, 3, 512, 64),
]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(B: int, nh: int, nkv: int, T: int, hs: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median milliseconds of causal attention forward + backward: (fused kernel, plain path)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, nh, T, hs, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, nkv, T, hs, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, nkv, T, hs, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(B, nh, T, hs, generator=g).to(dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)

    def fused():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

    def plain():
        grouped_attention(q, k, v, causal).backward(grad)

    fused(), plain()  # warm-up
    times: dict[str, list[float]] = {"fused": [], "plain": []}
    for _ in range(repeats):  # alternating, so machine noise hits both
        times["fused"].append(timed(fused))
        times["plain"].append(timed(plain))
    return statistics.median(times["fused"]) * 1e3, statistics.median(times["plain"]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); SHORT_BF16 = {SHORT_BF16}")
    print(f"{'B':>2} {'nh':>3} {'nkv':>3} {'T':>4} {'hs':>3} {'dtype':>9} {'fused ms':>9} {'plain ms':>9} {'ratio':>6}")
    for B, nh, nkv, T, hs in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            f, m = measure(B, nh, nkv, T, hs, dtype, a.repeats)
            name = str(dtype).removeprefix("torch.")
            print(f"{B:>2} {nh:>3} {nkv:>3} {T:>4} {hs:>3} {name:>9} {f:>9.1f} {m:>9.1f} {f / m:>6.2f}")


if __name__ == "__main__":
    main()
