#!/usr/bin/env python3
"""PyTorch peer for kiln's training benchmark.

Trains the same Llama-2 architecture (float32 parameters, AdamW) on random
tokens and reports throughput as one JSON line, e.g.

  {"impl": "pytorch", "torch": "1.13.0", "preset": "tiny", "mode": "fp32",
   "threads": 2, "tokens_per_s": ..., "step_s": [...], "params": ...}

A timed step is forward + loss + backward + optimizer step + zero_grad.
tokens_per_s is the median over timed steps of batch*seq / step time.
--mode bf16 runs forward and loss under CPU autocast to bfloat16 while the
parameters and optimizer state stay float32.

The model math is shared with tests/reference/llama_ref.py.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import llama_ref as ref  # noqa: E402

PRESETS = {
    "tiny": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab=32000,
                 multiple_of=32, seq=256, batch=8),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab=32000,
                  multiple_of=32, seq=512, batch=4),
}

LR = 3e-4
WEIGHT_DECAY = 0.1
NORM_EPS = 1e-5
ROPE_THETA = 10000.0
SEED = 1234

# Fused attention when this torch provides it; torch 1.13 does not, and the
# explicit masked softmax in llama_ref is used instead.
USE_SDPA = hasattr(torch.nn.functional, "scaled_dot_product_attention")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ref.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * D, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * D, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        return ref.self_attention(x, self.q_proj.weight, self.k_proj.weight,
                                  self.v_proj.weight, self.o_proj.weight,
                                  self.n_heads, self.n_kv_heads, cos, sin, use_sdpa=USE_SDPA)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        return ref.swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """LlamaForCausalLM layout: embeddings, blocks, final norm, untied head."""

    def __init__(self, cfg, max_seq):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        cos, sin = ref.rotary_cos_sin(max_seq, cfg.head_dim, cfg.rope_theta, torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens):
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch Llama training throughput")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--mode", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    p = PRESETS[args.preset]
    cfg = ref.LlamaConfig(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
        vocab=p["vocab"], hidden=ref.ffn_hidden_dim(p["dim"], p["multiple_of"]),
        norm_eps=NORM_EPS, rope_theta=ROPE_THETA).validate()
    B, T = p["batch"], p["seq"]

    model = Llama(cfg, T)
    opt = torch.optim.AdamW(ref.decay_param_groups(list(model.named_parameters()), WEIGHT_DECAY), lr=LR)
    n_params = sum(q.numel() for q in model.parameters())

    # All batches are drawn up front so that data generation is not timed.
    gen = torch.Generator().manual_seed(SEED)
    batches = [torch.randint(0, cfg.vocab, (B, T), generator=gen)
               for _ in range(args.warmup + args.steps)]

    step_s = []
    for i, tokens in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(args.mode == "bf16")):
            loss = ref.causal_lm_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if not torch.isfinite(loss):
            print(f"error: non-finite loss at step {i}", file=sys.stderr)
            return 1
        if i >= args.warmup:
            step_s.append(dt)

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "preset": args.preset,
        "mode": args.mode,
        "threads": args.threads,
        "tokens_per_s": statistics.median(B * T / s for s in step_s),
        "step_s": [round(s, 4) for s in step_s],
        "params": n_params,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
