#!/usr/bin/env python3
"""Independent PyTorch reference for kiln's Llama-2 model.

The math here is written directly from the Hugging Face LlamaForCausalLM
definition (no biases, untied lm_head, HF "rotate_half" rotary layout) and is
what the C++ implementation is checked against.  It is deliberately plain
torch code with no dependency on kiln.

Subcommands:
  fixture   build a small random model, run forward/backward/optimizer steps in
            float64 and write everything (weights, logits, loss, grads, weights
            after one step, loss trajectory) to a safetensors file.
  eval-hf   load a Hugging Face style directory (config.json +
            model.safetensors) and report the mean next-token loss over the
            rows of a kiln token shard.

The helpers (safetensors I/O, shard I/O, model forward, loss) are importable;
bench/torch_train.py builds its nn.Module from them.
"""

import argparse
import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class InputError(Exception):
    """A user-facing problem with an input file; reported without a traceback."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """FFN width exactly as Meta's Llama-2 code derives it from the model dim."""
    h = 4 * dim
    h = int(2 * h / 3)
    if ffn_dim_multiplier:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig:
    dim: int          # C, model width
    n_layers: int     # L
    n_heads: int      # H, query heads
    n_kv_heads: int   # Hkv, key/value heads (GQA when < H)
    vocab: int        # V
    hidden: int       # F, FFN width
    norm_eps: float
    rope_theta: float

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def validate(self):
        if self.dim % self.n_heads != 0:
            raise InputError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise InputError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise InputError(f"head dim {self.head_dim} must be even for rotary embeddings")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab", "hidden"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive")
        return self


def weight_shapes(cfg):
    """HF tensor name -> shape, in canonical order (embeddings, layers, norm, head)."""
    C, F_, V, D = cfg.dim, cfg.hidden, cfg.vocab, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (C,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.n_heads * D, C)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.n_kv_heads * D, C)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.n_kv_heads * D, C)
        shapes[p + "self_attn.o_proj.weight"] = (C, cfg.n_heads * D)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
        shapes[p + "mlp.gate_proj.weight"] = (F_, C)
        shapes[p + "mlp.up_proj.weight"] = (F_, C)
        shapes[p + "mlp.down_proj.weight"] = (C, F_)
    shapes["model.norm.weight"] = (C,)
    shapes["lm_head.weight"] = (V, C)
    return shapes


def init_weights(cfg, generator, dtype=torch.float64):
    """Random weights: N(0, 0.02) for matrices, 1 + 0.1*N(0, 1) for norm gains.

    Values are rounded through float32 so that the weights stored in a float32
    file are exactly the ones the reference computed with.
    """
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        w = 1.0 + 0.1 * noise if len(shape) == 1 else 0.02 * noise
        weights[name] = w.to(torch.float32).to(dtype)
    return weights


# --------------------------------------------------------------------------
# Model math (HF LlamaForCausalLM semantics)
# --------------------------------------------------------------------------

def _at_least_fp32(dtype):
    """float64 stays float64; bf16/fp16 are upcast to float32."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x, weight, eps):
    """weight * x / sqrt(mean(x^2) + eps), statistics in at least fp32 (as HF)."""
    xc = x.to(_at_least_fp32(x.dtype))
    xc = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * xc.to(x.dtype)


def rotary_cos_sin(seq_len, head_dim, theta, dtype, device=None):
    """cos/sin tables of shape (T, D) for positions 0..T-1, HF layout.

    inv_freq[i] = theta^(-2i/D); the D/2 frequencies are repeated twice
    (cat(freqs, freqs)) to match rotate_half.  Tables are evaluated in float64
    and rounded to `dtype`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, heads, T, D); cos/sin: (T, D)."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q, k, v, use_sdpa=False):
    """Causal softmax attention with scale 1/sqrt(D).

    q: (B, H, T, D); k, v: (B, Hkv, T, D).  With grouped-query attention kv
    head j serves query heads j*G .. (j+1)*G-1, G = H/Hkv, which is what
    repeat_interleave along the head axis produces.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if use_sdpa and hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T, D = q.shape[-2], q.shape[-1]
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    # HF's eager path runs softmax in fp32 and casts back.
    probs = torch.softmax(scores.to(_at_least_fp32(scores.dtype)), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def self_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, cos, sin, use_sdpa=False):
    """o_proj(attention(rotary(q), rotary(k), v)); x: (B, T, C)."""
    B, T, _ = x.shape
    D = wq.shape[0] // n_heads
    q = F.linear(x, wq).view(B, T, n_heads, D).transpose(1, 2)
    k = F.linear(x, wk).view(B, T, n_kv_heads, D).transpose(1, 2)
    v = F.linear(x, wv).view(B, T, n_kv_heads, D).transpose(1, 2)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    out = causal_attention(q, k, v, use_sdpa=use_sdpa)
    out = out.transpose(1, 2).reshape(B, T, n_heads * D)
    return F.linear(out, wo)


def swiglu_mlp(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def forward(weights, tokens, cfg, cos=None, sin=None):
    """Logits (B, T, V) for int tokens (B, T) from a dict of HF-named weights."""
    T = tokens.shape[1]
    emb = weights["model.embed_tokens.weight"]
    if cos is None:
        cos, sin = rotary_cos_sin(T, cfg.head_dim, cfg.rope_theta, emb.dtype, emb.device)
    x = F.embedding(tokens, emb)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        n = rms_norm(x, weights[p + "input_layernorm.weight"], cfg.norm_eps)
        x = x + self_attention(
            n,
            weights[p + "self_attn.q_proj.weight"],
            weights[p + "self_attn.k_proj.weight"],
            weights[p + "self_attn.v_proj.weight"],
            weights[p + "self_attn.o_proj.weight"],
            cfg.n_heads, cfg.n_kv_heads, cos[:T], sin[:T])
        n = rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.norm_eps)
        x = x + swiglu_mlp(
            n,
            weights[p + "mlp.gate_proj.weight"],
            weights[p + "mlp.up_proj.weight"],
            weights[p + "mlp.down_proj.weight"])
    x = rms_norm(x, weights["model.norm.weight"], cfg.norm_eps)
    return F.linear(x, weights["lm_head.weight"])


def causal_lm_loss(logits, tokens, reduction="mean"):
    """HF shifted loss: logits[:, t] predicts tokens[:, t+1], t = 0..T-2.

    The last position predicts nothing.  Computed in at least fp32.
    """
    V = logits.shape[-1]
    pred = logits[:, :-1, :].reshape(-1, V)
    pred = pred.to(_at_least_fp32(pred.dtype))
    target = tokens[:, 1:].reshape(-1).long()
    return F.cross_entropy(pred, target, reduction=reduction)


def decay_param_groups(named_params, weight_decay):
    """AdamW groups: decay every 2-D weight, no decay on 1-D norm gains."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------
# safetensors I/O (numpy only)
# --------------------------------------------------------------------------

# Little-endian numpy dtypes for the safetensors dtype tags understood here.
_ST_TO_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


def bf16_bits_to_f32(bits):
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values):
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(values)] = 0x7FC0
    return out


def read_safetensors_header(path):
    """Return (header dict without __metadata__, metadata dict, data start offset)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise InputError(f"{path}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: bad safetensors header: {e}")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def load_safetensors(path):
    """Return ({name: np.ndarray}, metadata).  BF16 tensors come back as float32."""
    header, metadata, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    tensors = {}
    for name, info in header.items():
        tag = info.get("dtype")
        if tag not in _ST_TO_NP:
            raise InputError(f"{path}: tensor {name}: unsupported dtype {tag}")
        dt = _ST_TO_NP[tag]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(data)) or end - begin != count * dt.itemsize:
            raise InputError(f"{path}: tensor {name}: data_offsets {begin},{end} "
                             f"do not fit shape {list(shape)} of {tag}")
        arr = np.frombuffer(data, dtype=dt, count=count, offset=begin).reshape(shape)
        tensors[name] = bf16_bits_to_f32(arr) if tag == "BF16" else arr.copy()
    return tensors, metadata


def save_safetensors(path, tensors, metadata=None, float_dtype="F32"):
    """Write {name: array-like} to `path` in insertion order.

    Floating arrays are stored as `float_dtype` ("F32" or "BF16"); int32 arrays
    as I32 and int64 arrays as I64.  Metadata values must be strings.
    """
    if float_dtype not in ("F32", "BF16"):
        raise ValueError(f"float_dtype must be F32 or BF16, got {float_dtype}")
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating):
            if float_dtype == "BF16":
                tag, raw = "BF16", f32_to_bf16_bits(arr.astype(np.float32))
            else:
                tag, raw = "F32", arr.astype("<f4")
        elif arr.dtype == np.int32:
            tag, raw = "I32", arr.astype("<i4")
        elif arr.dtype == np.int64:
            tag, raw = "I64", arr.astype("<i8")
        else:
            raise ValueError(f"tensor {name}: unsupported numpy dtype {arr.dtype}")
        blob = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # data then starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


# --------------------------------------------------------------------------
# kiln token shards
# --------------------------------------------------------------------------

SHARD_MAGIC = b"KILNTOK\0"
SHARD_HEADER_BYTES = 64


def read_token_shard(path, max_rows=None):
    """Return an int64 array (n_rows, seq_len) of tokens from a kiln shard.

    Layout (little-endian): magic[8], u32 version (=1), u32 token_bytes (2|4),
    u32 seq_len, u32 reserved, u64 n_seqs, 32 reserved bytes, then
    n_seqs * seq_len tokens row-major.
    """
    with open(path, "rb") as f:
        head = f.read(SHARD_HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        if len(head) != SHARD_HEADER_BYTES or head[:8] != SHARD_MAGIC:
            raise InputError(f"{path}: not a kiln token shard (bad magic)")
        version, token_bytes, seq_len, _reserved, n_seqs = struct.unpack_from("<IIIIQ", head, 8)
        if version != 1:
            raise InputError(f"{path}: unsupported shard version {version}")
        if token_bytes not in (2, 4):
            raise InputError(f"{path}: token_bytes must be 2 or 4, got {token_bytes}")
        if seq_len < 2:
            raise InputError(f"{path}: seq_len {seq_len} is too short to predict anything")
        expected = SHARD_HEADER_BYTES + n_seqs * seq_len * token_bytes
        if size != expected:
            raise InputError(f"{path}: file is {size} bytes, header implies {expected}")
        rows = n_seqs if max_rows is None else min(n_seqs, max_rows)
        dt = np.dtype("<u2") if token_bytes == 2 else np.dtype("<u4")
        tokens = np.frombuffer(f.read(rows * seq_len * token_bytes), dtype=dt)
    return tokens.reshape(rows, seq_len).astype(np.int64)


def write_token_shard(path, tokens, token_bytes=2):
    """Write an (n_rows, seq_len) integer array as a kiln shard (version 1)."""
    tokens = np.asarray(tokens)
    n_seqs, seq_len = tokens.shape
    dt = np.dtype("<u2") if token_bytes == 2 else np.dtype("<u4")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dt).max):
        raise ValueError("token ids do not fit the requested token width")
    head = SHARD_MAGIC + struct.pack("<IIIIQ", 1, token_bytes, seq_len, 0, n_seqs)
    head += b"\0" * (SHARD_HEADER_BYTES - len(head))
    with open(path, "wb") as f:
        f.write(head)
        f.write(np.ascontiguousarray(tokens, dtype=dt).tobytes())


# --------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------

def hf_config_dict(cfg, max_position_embeddings, torch_dtype="float32"):
    """A config.json dictionary describing `cfg` as LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
    }


def config_from_hf(hf):
    """LlamaConfig from a parsed config.json, rejecting features not modelled here."""
    def need(key):
        if key not in hf:
            raise InputError(f"config.json: missing {key}")
        return hf[key]

    if hf.get("architectures") != ["LlamaForCausalLM"]:
        raise InputError(f"config.json: architectures must be [\"LlamaForCausalLM\"], "
                         f"got {hf.get('architectures')!r}")
    # HF's LlamaConfig defaults tie_word_embeddings to False when absent.
    if hf.get("tie_word_embeddings", False):
        raise InputError("config.json: tie_word_embeddings must be false")
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"config.json: hidden_act must be silu, got {hf['hidden_act']!r}")
    if hf.get("rope_scaling") is not None:
        raise InputError("config.json: rope_scaling is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise InputError(f"config.json: {flag} must be false")
    if hf.get("torch_dtype", "float32") not in ("float32", "bfloat16"):
        raise InputError(f"config.json: torch_dtype must be float32 or bfloat16, "
                         f"got {hf['torch_dtype']!r}")
    n_heads = int(need("num_attention_heads"))
    cfg = LlamaConfig(
        dim=int(need("hidden_size")),
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        vocab=int(need("vocab_size")),
        hidden=int(need("intermediate_size")),
        norm_eps=float(need("rms_norm_eps")),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
    ).validate()
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise InputError(f"config.json: head_dim {hf['head_dim']} != hidden_size/num_attention_heads")
    return cfg


def load_hf_dir(hf_dir, dtype=torch.float32):
    """Return (LlamaConfig, max_position_embeddings, {name: tensor}) for an HF directory."""
    cfg_path = os.path.join(hf_dir, "config.json")
    st_path = os.path.join(hf_dir, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise InputError(f"missing {p}")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path}: {e}")
    cfg = config_from_hf(hf)
    max_pos = int(hf.get("max_position_embeddings", 0))

    header, _, _ = read_safetensors_header(st_path)
    expected = weight_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if name not in header:
            problems.append(f"missing tensor {name}")
            continue
        got = tuple(header[name].get("shape", ()))
        if got != shape:
            problems.append(f"tensor {name}: shape {list(got)}, expected {list(shape)}")
        if header[name].get("dtype") not in ("F32", "BF16"):
            problems.append(f"tensor {name}: dtype {header[name].get('dtype')}, expected F32 or BF16")
    for name in header:
        if name not in expected:
            problems.append(f"unexpected tensor {name}")
    if problems:
        raise InputError(f"{st_path}:\n  " + "\n  ".join(problems))

    arrays, _ = load_safetensors(st_path)
    weights = {n: torch.from_numpy(arrays[n]).to(dtype) for n in expected}
    return cfg, max_pos, weights


# --------------------------------------------------------------------------
# Subcommand: fixture
# --------------------------------------------------------------------------

def build_fixture(args):
    """Run the float64 reference and return (tensors, metadata) for the fixture file."""
    torch.set_default_dtype(torch.float64)
    dt = torch.float64
    cfg = LlamaConfig(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads, vocab=args.vocab,
        hidden=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        norm_eps=args.norm_eps, rope_theta=args.rope_theta,
    ).validate()
    if args.steps < 1:
        raise InputError("--steps must be at least 1")
    if args.seq < 2:
        raise InputError("--seq must be at least 2")

    gen = torch.Generator().manual_seed(args.seed)
    init = init_weights(cfg, gen, dt)
    tokens = torch.randint(0, cfg.vocab, (args.batch, args.seq), generator=gen)

    params = {n: w.clone().requires_grad_(True) for n, w in init.items()}
    opt = torch.optim.AdamW(
        decay_param_groups(list(params.items()), args.weight_decay),
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    cos, sin = rotary_cos_sin(args.seq, cfg.head_dim, cfg.rope_theta, dt)

    traj = []
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        logits = forward(params, tokens, cfg, cos, sin)
        loss = causal_lm_loss(logits, tokens)
        loss.backward()
        if step == 0:
            logits0 = logits.detach().clone()
            loss0 = loss.detach().clone()
            grads = {n: p.grad.detach().clone() for n, p in params.items()}
            grad_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        torch.nn.utils.clip_grad_norm_(list(params.values()), args.clip)
        opt.step()
        if step == 0:
            step1 = {n: p.detach().clone() for n, p in params.items()}
        traj.append(loss.item())

    out = {"tokens": tokens.to(torch.int32)}
    out.update(init)
    out["logits"] = logits0
    out["loss"] = loss0.reshape(1)
    out["grad_norm"] = grad_norm.reshape(1)
    out.update({"grad." + n: g for n, g in grads.items()})
    out.update({"step1." + n: w for n, w in step1.items()})
    # After every step: where beta1, beta2 and eps show (step 1 is ~lr * sign(g) whatever they are).
    out.update({"final." + n: p.detach().clone() for n, p in params.items()})
    out["traj_loss"] = torch.tensor(traj, dtype=dt)

    meta = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads, "vocab": args.vocab,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": "" if args.ffn_dim_multiplier is None else repr(args.ffn_dim_multiplier),
        "norm_eps": repr(args.norm_eps), "rope_theta": repr(args.rope_theta),
        "seq": args.seq, "batch": args.batch, "seed": args.seed,
        "lr": repr(args.lr), "beta1": repr(args.beta1), "beta2": repr(args.beta2),
        "eps": repr(args.eps), "weight_decay": repr(args.weight_decay),
        "clip": repr(args.clip), "steps": args.steps,
    }
    return out, {k: str(v) for k, v in meta.items()}


def cmd_fixture(args):
    tensors, meta = build_fixture(args)
    save_safetensors(args.out, tensors, meta)
    print(json.dumps({"out": args.out, "loss": float(tensors["loss"][0]),
                      "grad_norm": float(tensors["grad_norm"][0]),
                      "hidden": int(tensors["model.layers.0.mlp.gate_proj.weight"].shape[0])}))


# --------------------------------------------------------------------------
# Subcommand: eval-hf
# --------------------------------------------------------------------------

EVAL_BATCH_ROWS = 8


def eval_hf(hf_dir, shard, max_rows=None):
    """Mean shifted next-token loss (float32 compute) of an HF model on a shard."""
    cfg, max_pos, weights = load_hf_dir(hf_dir, torch.float32)
    tokens = read_token_shard(shard, max_rows)
    rows, T = tokens.shape
    if rows == 0:
        raise InputError(f"{shard}: no rows to evaluate")
    if max_pos and T > max_pos:
        raise InputError(f"shard seq_len {T} exceeds max_position_embeddings {max_pos}")
    if tokens.max() >= cfg.vocab:
        raise InputError(f"{shard}: token id {int(tokens.max())} >= vocab_size {cfg.vocab}")
    cos, sin = rotary_cos_sin(T, cfg.head_dim, cfg.rope_theta, torch.float32)
    total = 0.0  # summed in Python float (double) across batches
    with torch.no_grad():
        for start in range(0, rows, EVAL_BATCH_ROWS):
            batch = torch.from_numpy(tokens[start:start + EVAL_BATCH_ROWS])
            logits = forward(weights, batch, cfg, cos, sin)
            total += float(causal_lm_loss(logits, batch, reduction="sum").double())
    n_tok = rows * (T - 1)
    return {"loss": total / n_tok, "rows": rows, "tokens": n_tok}


def cmd_eval_hf(args):
    print(json.dumps(eval_hf(args.hf_dir, args.shard, args.max_rows)))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def _optional_float(s):
    return None if s.lower() in ("", "none") else float(s)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    fx = sub.add_parser("fixture", help="write a float64-reference fixture (stored as F32)")
    fx.add_argument("--out", required=True, help="output .safetensors path")
    fx.add_argument("--dim", type=int, default=64)
    fx.add_argument("--n-layers", type=int, default=2)
    fx.add_argument("--n-heads", type=int, default=4)
    fx.add_argument("--n-kv-heads", type=int, default=2)
    fx.add_argument("--vocab", type=int, default=96)
    fx.add_argument("--multiple-of", type=int, default=16)
    fx.add_argument("--ffn-dim-multiplier", type=_optional_float, default=None)
    fx.add_argument("--norm-eps", type=float, default=1e-5)
    fx.add_argument("--rope-theta", type=float, default=10000.0)
    fx.add_argument("--seq", type=int, default=12)
    fx.add_argument("--batch", type=int, default=2)
    fx.add_argument("--seed", type=int, default=1)
    fx.add_argument("--lr", type=float, default=1e-2)
    fx.add_argument("--beta1", type=float, default=0.9)
    fx.add_argument("--beta2", type=float, default=0.95)
    fx.add_argument("--eps", type=float, default=1e-8)
    fx.add_argument("--weight-decay", type=float, default=0.1)
    fx.add_argument("--clip", type=float, default=1.0)
    fx.add_argument("--steps", type=int, default=5)
    fx.set_defaults(func=cmd_fixture)

    ev = sub.add_parser("eval-hf", help="loss of an HF LlamaForCausalLM directory on a kiln shard")
    ev.add_argument("--hf-dir", required=True, help="directory with config.json and model.safetensors")
    ev.add_argument("--shard", required=True, help="kiln token shard (KILNTOK v1)")
    ev.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows")
    ev.set_defaults(func=cmd_eval_hf)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
