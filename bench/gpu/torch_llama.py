#!/usr/bin/env python3
"""PyTorch's figure for the GPU check: Hugging Face's LlamaForCausalLM trained on one GPU.

The 1.1B Llama of the check (dim 2048, 22 layers, 32 heads, 4 kv heads, FFN 5632, vocab
32000) at sequence 4096: fp32 master weights, bf16 autocast, SDPA attention, fused AdamW.
A timed step is forward + loss + backward + optimizer step + zero_grad, on random tokens.
Runs eager, then torch.compile, and prints one JSON line per mode:

  {"impl": "pytorch-eager", "tokens_per_s": ..., "mfu": ..., "step_s": [...], ...}

MFU counts kiln's FLOPs per token (6 x matmul parameters + 12 x layers x dim x seq, as
train/metrics.cpp) against --peak-tflops (989: H100/H200 dense bf16).
"""

import argparse
import json
import statistics
import sys
import time

import torch


def flops_per_token(dim, layers, vocab, ffn, kv_dim, seq):
    per_block = dim * (dim + 2 * kv_dim) + dim * dim + 3 * dim * ffn
    matmul = layers * per_block + vocab * dim  # the LM head; the embedding is a lookup
    return 6.0 * matmul + 12.0 * layers * dim * seq


def run(mode, args, cfg):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    step_fn = model
    if mode == "compile":
        step_fn = torch.compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tok_s = args.batch * args.seq / statistics.median(times)
    kv_dim = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    fpt = flops_per_token(cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size,
                          cfg.intermediate_size, kv_dim, args.seq)
    out = {
        "impl": f"pytorch-{mode}",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": tok_s,
        "mfu": tok_s * fpt / (args.peak_tflops * 1e12),
        "step_s": [round(t, 4) for t in times],
        "warmup_s": round(warmup_s, 1),
        "loss": float(loss),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, opt, step_fn
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args(argv)
    try:
        from transformers import LlamaConfig
    except ImportError:
        print("torch_llama: transformers is not installed here", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch_llama: no CUDA device", file=sys.stderr)
        return 2
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=args.seq, rms_norm_eps=1e-5, rope_theta=10000.0,
                      attn_implementation="sdpa")
    status = 0
    for mode in args.modes.split(","):
        try:
            print(json.dumps(run(mode, args, cfg)), flush=True)
        except Exception as e:  # one mode failing (out of memory, a compile error) is a figure
            print(json.dumps({"impl": f"pytorch-{mode}", "error": f"{type(e).__name__}: {e}"[:500]}),
                  flush=True)
            torch.cuda.empty_cache()
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
