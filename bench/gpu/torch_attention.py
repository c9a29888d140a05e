#!/usr/bin/env python3
"""Causal attention alone, PyTorch's kernels against kiln's: where the 1.1B step's attention
stands.

Times torch.nn.functional.scaled_dot_product_attention (is_causal, bf16) forward and backward at
one layer's shape of the check's 1.1B Llama (batch 2, 32 query heads, 4 kv heads, head size 64,
sequence 4096) with each of PyTorch's fused kernels (flash, cuDNN, memory-efficient) that takes
the shape. The kv heads are repeated to the query heads before the timed calls, as Hugging
Face's Llama does, so every kernel gets the same work. Prints one JSON line per kernel:

  {"impl": "torch-cudnn", "forward_ms": ..., "backward_ms": ..., "forward_tflops": ..., ...}

With --profile FILE (kiln's KILN_CUDA_PROFILE report of the same shape), also kiln's mean
attention_forward and attention_backward device time per call, as a line "impl": "kiln".

TFLOP/s count the causal work: forward 2 products of B·H·T²·D (half of the square each), the
backward 5 (scores and dp again, dv, dk, dq), the count FlashAttention-2 reports.
"""

import argparse
import json
import re
import statistics
import sys

import torch


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def kiln_ms(path):
    """Mean device ms per call of kiln's attention ops in a KILN_CUDA_PROFILE report."""
    found = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"(attention_(?:forward|backward))\s+(\d+)\s+([\d.]+)\s+[\d.]+%\s+([\d.]+)",
                         line)
            if m:
                found[m.group(1)] = float(m.group(4)) / 1000
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", help="kiln's KILN_CUDA_PROFILE report of the same shape")
    args = p.parse_args()
    if not torch.cuda.is_available() or not hasattr(torch.nn.functional,
                                                    "scaled_dot_product_attention"):
        print(f"torch_attention: needs a GPU and PyTorch >= 2.3 (this is {torch.__version__})")
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Hkv, D, T = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    k, v = (t.repeat_interleave(H // Hkv, dim=1).requires_grad_() for t in kv)
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flop = 1.0 * B * H * T * T * D  # one causal product: half of 2·T²·D per head
    shape = {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "seq": T}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                sdpa = torch.nn.functional.scaled_dot_product_attention

                def forward():
                    return sdpa(q, k, v, is_causal=True)

                out = forward()
                fwd = time_ms(forward, args.reps)
                both = time_ms(lambda: forward().backward(dout), args.reps)
        except Exception as e:  # a kernel that does not take this shape or GPU
            print(json.dumps({"impl": f"torch-{name}", "error": str(e).splitlines()[0][:200]}))
            continue
        bwd = max(both - fwd, 1e-9)
        print(json.dumps({"impl": f"torch-{name}", **shape, "forward_ms": round(fwd, 3),
                          "backward_ms": round(bwd, 3),
                          "forward_tflops": round(2 * flop / fwd / 1e9, 1),
                          "backward_tflops": round(5 * flop / bwd / 1e9, 1),
                          "out_finite": bool(torch.isfinite(out).all())}))
    if args.profile:
        try:
            kiln = kiln_ms(args.profile)
        except OSError as e:
            print(f"torch_attention: cannot read {args.profile}: {e}")
            return 1
        if len(kiln) != 2:
            print(f"torch_attention: {args.profile} has no attention_forward and "
                  f"attention_backward rows")
            return 1
        fwd, bwd = kiln["attention_forward"], kiln["attention_backward"]
        print(json.dumps({"impl": "kiln", **shape, "forward_ms": round(fwd, 3),
                          "backward_ms": round(bwd, 3),
                          "forward_tflops": round(2 * flop / fwd / 1e9, 1),
                          "backward_tflops": round(5 * flop / bwd / 1e9, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
