"""How much work the sparse DMA kernels skip: tiles visited per head, sparse vs dense, from the real key lists.

The attention benchmarks' inputs (batch 1, 3 dt heads, dt = exp(N(0, 1)) per key, keep_window 2048, 64x64 tiles):
key expiry and `key_lists` exactly as the kernels get them, on the CPU (no GPU, no timing). The query-side kernels
(forward, dq) visit ceil(cntq / 64) key tiles per 64-query block; the dense ones every tile up to the diagonal. The
key-side kernel runs one program per 64-key list chunk, each over its superblock's 32-query steps.

    python benchmarks/sparse_tiles.py [--seq 8192 16384 32768] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--keep", type=int, default=2048)
    ap.add_argument("--superblocks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from doge_torch.model import key_expiry
    from doge_torch.triton_attention import key_lists

    B, n, bq, bk = 1, 3, 64, 64
    lines = ["| T | superblock | query-side tiles per head (sparse / dense) | ratio | key-side chunks per head | "
             "longest list |", "|---|---|---|---|---|---|"]
    for T in args.seq:
        dt = torch.tensor(np.exp(np.random.default_rng(T).standard_normal((B, n, T))).astype(np.float32))
        e = key_expiry(dt, torch.ones(B, T, dtype=torch.bool), args.keep).clamp(max=T).to(torch.int32)
        dense = (T // bq) * (T // bq + 1) / 2
        for sb in args.superblocks:
            _, cnt, cntq, _ = key_lists(e, args.keep, None, sb, bq, bk)
            sparse = int(((cntq + bk - 1) // bk).sum()) / (B * n)
            chunks = int(((cnt + bk - 1) // bk).sum()) / (B * n)
            lines.append(f"| {T} | {sb} | {sparse:.0f} / {dense:.0f} | {sparse / dense:.2f} | {chunks:.0f} | "
                         f"{int(cnt.max())} |")
    table = "\n".join(lines)
    title = (f"## sparse_tiles.py — {datetime.datetime.now():%Y-%m-%d %H:%M} — tiles the sparse DMA kernels visit "
             f"(keep_window {args.keep}, 64x64 tiles; CPU, no timing)")
    print(f"{title}\n\n{table}")
    if not args.no_append:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(f"\n{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
