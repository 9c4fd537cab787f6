"""Decode attention for KVBackend, measured in isolation (issue 12): how close each way of computing one decode step's
attention comes to the floor of reading the cache once.

    python bench/bench_decode_attention.py --rows 234 --columns 400 --prefix 65

One decode step of one layer at End_SFT's shapes: every live row attends to its cached columns (a view of a
preallocated buffer, as in KVBackend), some of them masked (holes of left-padded blocks, ~15 % on End_SFT); the
first `prefix` columns (the rules text all episodes share) hold the same keys/values in every row. Variants:
* sdpa (baseline): what KVBackend's decode runs: PyTorch's CPU flash kernel, pack_gqa layout (the query heads of
  one key/value head are the query positions), a boolean mask.
* the same call on a contiguous copy of the cache, and without a mask: what the layout and the mask cost.
* the cache in fp16 / bf16 (query cast to it): half the bytes to read.
* matmul attention (q K^T, masked softmax, times V) eagerly and under torch.compile (inductor's CPU code), and
  flex_attention under torch.compile: the library alternatives to the flash kernel.
* cascade: the shared prefix once, with every row's queries stacked against one copy of its keys/values, plus each
  row's own columns; the two partial results merged by their log-sum-exp (PyTorch's CPU flash kernel returns it;
  the public sdpa does not).
* read K,V once: summing the cache's keys and values, in fp32 and in fp16: the memory floor of any exact kernel.
Times are CPU milliseconds per call (1 thread by default), the baseline measured in the same run; `max err` is the
largest difference from the baseline's output.
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
    parser.add_argument("--capacity", type=int, default=96, help="buffer columns beyond --columns (KVBackend "
                        "preallocates max_new_tokens more than it has filled)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--groups", type=int, default=3, help="query heads per key/value head")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (they compile "
                        "for tens of seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    R, H, G, D, C, P = args.rows, args.kv_heads, args.groups, args.head_dim, args.columns, args.prefix
    scale = D ** -0.5
    q = torch.randn(R, H, G, D)
    k_buffer, v_buffer = torch.randn(R, H, C + args.capacity, D), torch.randn(R, H, C + args.capacity, D)
    k_buffer[:, :, :P], v_buffer[:, :, :P] = k_buffer[:1, :, :P], v_buffer[:1, :, :P]
    k, v = k_buffer[:, :, :C], v_buffer[:, :, :C]  # KVBackend's decode reads a view of its buffers
    valid = torch.ones(R, 1, 1, C, dtype=torch.bool)
    for r in range(R):
        valid[r, ..., P : P + r % 60] = False  # holes after the prefix
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def baseline():
        return sdpa(q, k, v, attn_mask=valid, scale=scale)

    k_contiguous, v_contiguous = k.contiguous(), v.contiguous()
    variants = {
        "sdpa, cache view (baseline)": baseline,
        "sdpa, contiguous cache": lambda: sdpa(q, k_contiguous, v_contiguous, attn_mask=valid, scale=scale),
        "sdpa, no mask": lambda: sdpa(q, k, v, scale=scale),
    }
    for dtype in (torch.float16, torch.bfloat16):
        q_h, k_h, v_h = q.to(dtype), k.to(dtype), v.to(dtype)
        variants[f"sdpa, {str(dtype)[6:]} cache"] = (
            lambda q_h=q_h, k_h=k_h, v_h=v_h: sdpa(q_h, k_h, v_h, attn_mask=valid, scale=scale).float())

    def matmul_attention(q, k, v, valid):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        return torch.matmul(scores.masked_fill(~valid, float("-inf")).softmax(-1), v)

    variants["matmul attention"] = lambda: matmul_attention(q, k, v, valid)
    if not args.no_compile:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled_matmul = torch.compile(matmul_attention, dynamic=True)
        variants["matmul attention, compiled"] = lambda: compiled_matmul(q, k, v, valid)
        compiled_flex = torch.compile(flex_attention)
        row_valid = valid[:, 0, 0]
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: row_valid[b, kv_idx], R, None, 1, C, device="cpu")
        q_heads = q.reshape(R, H * G, 1, D)  # flex_attention's GQA layout: query heads, one query position
        variants["flex_attention, compiled"] = lambda: compiled_flex(
            q_heads, k_contiguous, v_contiguous, block_mask=block_mask, enable_gqa=True, scale=scale
        ).reshape(R, H, G, D)

    additive = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))  # the flash kernel takes a float mask
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    k_prefix, v_prefix = k[:1, :, :P].contiguous(), v[:1, :, :P].contiguous()
    k_rest, v_rest, mask_rest = k[:, :, P:], v[:, :, P:], additive[..., P:].contiguous()

    def cascade():
        stacked = q.permute(1, 0, 2, 3).reshape(1, H, R * G, D)  # every row's queries against one prefix copy
        out_p, lse_p = flash(stacked, k_prefix, v_prefix, 0.0, False, scale=scale)[:2]
        out_r, lse_r = flash(q, k_rest, v_rest, 0.0, False, attn_mask=mask_rest, scale=scale)[:2]
        out_p = out_p.reshape(H, R, G, D).permute(1, 0, 2, 3)
        lse_p = lse_p.reshape(H, R, G).permute(1, 0, 2)
        top = torch.maximum(lse_p, lse_r)
        w_p, w_r = (lse_p - top).exp()[..., None], (lse_r - top).exp()[..., None]
        return (out_p * w_p + out_r * w_r) / (w_p + w_r)

    variants["cascade: prefix once + rest, merged"] = cascade
    k_half, v_half = k.half(), v.half()
    floors = {"read K,V once (fp32 floor)": lambda: (k.sum(), v.sum()),
              "read K,V once (fp16 floor)": lambda: (k_half.sum(), v_half.sum())}

    reference = baseline()
    print(f"rows {R}, columns {C} (shared prefix {P}, buffer {C + args.capacity}), kv heads {H} x {G} queries, "
          f"head dim {D}, {args.threads} thread(s)")
    print(f"{'variant':<38} {'cpu ms':>7} {'vs baseline':>11} {'max err':>8}")
    base_ms = None
    for name, fn in {**variants, **floors}.items():
        error = (fn() - reference).abs().max().item() if name in variants else float("nan")
        ms = cpu_ms(fn, args.repeat)
        base_ms = base_ms or ms
        print(f"{name:<38} {ms:7.2f} {base_ms / ms:10.2f}x {error:8.1e}", flush=True)


if __name__ == "__main__":
    main()
