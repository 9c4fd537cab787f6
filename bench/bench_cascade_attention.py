"""Cascade (shared-prefix) attention for KVBackend's decode steps, measured in isolation (issue 12, lever (b) at decode).

    python bench/bench_cascade_attention.py --rows 234 --columns 400 --prefix 65

One decode step of one layer at End_SFT's shapes: every live row attends to its cached columns, the first `prefix`
of which (the rules text all episodes share) hold the same keys/values in every row. Today (baseline): one sdpa call
over each row's whole cache, as KVBackend's decode does (pack_gqa layout: the query heads of one key/value head are
the query positions). Cascade: the shared prefix once, with every row's queries stacked against one copy of its
keys/values, plus each row's own columns; the two partial results merged by their log-sum-exp (PyTorch's CPU flash
kernel returns it; the public sdpa does not). Masked columns (holes of left-padded blocks, ~15 % on End_SFT) are
placed after the prefix. Times are CPU milliseconds per call (1 thread by default), the baseline measured in the
same run; "read K,V" is the floor of merely reading the cache once.
"""
from __future__ import annotations

import argparse
import time

import torch


def cpu_ms(fn, repeat: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=234, help="live rows of the decode batch")
    parser.add_argument("--columns", type=int, default=400, help="cached columns per row")
    parser.add_argument("--prefix", type=int, default=65, help="columns every row shares (the rules text)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--groups", type=int, default=3, help="query heads per key/value head")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    R, H, G, D, C, P = args.rows, args.kv_heads, args.groups, args.head_dim, args.columns, args.prefix
    scale = D ** -0.5
    q = torch.randn(R, H, G, D)
    k, v = torch.randn(R, H, C, D), torch.randn(R, H, C, D)
    k[:, :, :P], v[:, :, :P] = k[:1, :, :P], v[:1, :, :P]
    valid = torch.ones(R, 1, 1, C, dtype=torch.bool)
    for r in range(R):
        valid[r, ..., P : P + r % 60] = False  # holes after the prefix
    additive = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))  # the flash kernel takes a float mask
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    k_prefix, v_prefix = k[:1, :, :P].contiguous(), v[:1, :, :P].contiguous()
    k_rest, v_rest, mask_rest = k[:, :, P:].contiguous(), v[:, :, P:].contiguous(), additive[..., P:].contiguous()

    def baseline():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=scale)

    def cascade():
        stacked = q.permute(1, 0, 2, 3).reshape(1, H, R * G, D)  # every row's queries against one prefix copy
        out_p, lse_p = flash(stacked, k_prefix, v_prefix, 0.0, False, scale=scale)[:2]
        out_r, lse_r = flash(q, k_rest, v_rest, 0.0, False, attn_mask=mask_rest, scale=scale)[:2]
        out_p = out_p.reshape(H, R, G, D).permute(1, 0, 2, 3)
        lse_p = lse_p.reshape(H, R, G).permute(1, 0, 2)
        top = torch.maximum(lse_p, lse_r)
        w_p, w_r = (lse_p - top).exp()[..., None], (lse_r - top).exp()[..., None]
        return (out_p * w_p + out_r * w_r) / (w_p + w_r)

    error = (cascade() - baseline()).abs().max().item()
    rows = [("sdpa, whole cache (baseline)", cpu_ms(baseline, args.repeat)),
            ("cascade: prefix once + rest, merged", cpu_ms(cascade, args.repeat)),
            ("read K,V once (floor)", cpu_ms(lambda: (k.sum(), v.sum()), args.repeat))]
    print(f"rows {R}, columns {C} (shared prefix {P}), kv heads {H} x {G} queries, head dim {D}, "
          f"{args.threads} thread(s); max |cascade - baseline| = {error:.1e}")
    print(f"{'variant':<38} {'cpu ms':>7} {'vs baseline':>11}")
    for name, ms in rows:
        print(f"{name:<38} {ms:7.2f} {rows[0][1] / ms:10.2f}x")


if __name__ == "__main__":
    main()
