#!/usr/bin/env python3
"""The device check's figures as one Markdown block for bench/RESULTS.md.

usage: summary.py OUT_DIR
Reads what bench/gpu/check.sh left in OUT_DIR: machine.txt, the 1.1B runs' metrics.jsonl
(kiln-1b, or kiln-1b-untuned; kiln-1b-cudnn; kiln-1b-eager), torch_1b.log and attention.log
(JSON lines), curves.log and curves_cudnn.log, and what the cuDNN steps' logs (cudnn_ops,
train_cuda_cudnn, kiln_1b_cudnn) say of cuDNN: whether it ran, or why the own kernels ran
instead. Prints the block and writes it to OUT_DIR/summary.md. A figure whose run is missing or
failed reads "missing", so the block is had whatever ran. Exits 0.

Tokens/s and MFU of a kiln run are the medians over its steps after the second: the first runs
every kernel as called and the second records the CUDA graphs (train.graphs).
"""
import json
import os
import statistics
import sys


def json_lines(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return rows


def kiln_run(out, *names):
    """(run name, median tokens/s, median MFU, steps) of the first of `names` with steps past 2."""
    for name in names:
        steps = [r for r in json_lines(os.path.join(out, name, "metrics.jsonl"))
                 if "tokens_per_s" in r]
        steady = [r for r in steps if r["step"] > 2]
        if steady:
            return (name, statistics.median(r["tokens_per_s"] for r in steady),
                    statistics.median(r["mfu"] for r in steady), len(steps))
    return None


def cudnn_use(out, name):
    """What a KILN_CUDA_ATTENTION=cudnn step's log says of cuDNN: used, refused (and why), or
    nothing (then it never reached attention)."""
    lines = nonempty_lines(os.path.join(out, name + ".log"))
    refused = [l for l in lines if "runs kiln's own kernels" in l]
    if refused:
        return "own kernels ran: " + refused[0].split("] ", 1)[-1][:160]
    if any("cuDNN fused attention for" in l for l in lines):
        return "cuDNN ran"
    return "no word of cuDNN in the log"


def nonempty_lines(path):
    try:
        with open(path) as f:
            return [l.strip() for l in f if l.strip()]
    except OSError:
        return []


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2])
        return 2
    out = argv[0]
    machine = nonempty_lines(os.path.join(out, "machine.txt"))
    lines = ["GPU check, " + "; ".join(l for l in machine if not l.startswith("library path"))]
    lines += ["", "| run | tokens/s | MFU (989 TFLOP/s) | note |", "|---|---:|---:|---|"]

    kiln = kiln_run(out, "kiln-1b", "kiln-1b-untuned")
    cudnn = kiln_run(out, "kiln-1b-cudnn")
    eager = kiln_run(out, "kiln-1b-eager")
    torch = {r["impl"]: r for r in json_lines(os.path.join(out, "torch_1b.log"))}

    def row(label, tok, mfu, note):
        lines.append(f"| {label} | {tok:,.0f} | {100 * mfu:.1f}% | {note} |")

    if kiln:
        row("kiln 1.1B bf16, CUDA graphs", kiln[1], kiln[2],
            f"{kiln[0]}, median of steps 3-{kiln[3]}")
    else:
        lines.append("| kiln 1.1B bf16, CUDA graphs | missing | | |")
    if cudnn:
        row("kiln 1.1B bf16, cuDNN's attention", cudnn[1], cudnn[2],
            f"KILN_CUDA_ATTENTION=cudnn ({cudnn_use(out, 'kiln_1b_cudnn')}), "
            f"median of steps 3-{cudnn[3]}")
    else:
        lines.append("| kiln 1.1B bf16, cuDNN's attention | missing | | |")
    if eager:
        row("kiln 1.1B bf16, launched one by one", eager[1], eager[2],
            f"train.graphs=false, median of steps 3-{eager[3]}")
    else:
        lines.append("| kiln 1.1B bf16, launched one by one | missing | | |")
    best = None
    for impl in ("pytorch-eager", "pytorch-compile"):
        r = torch.get(impl)
        if r and "tokens_per_s" in r:
            row(f"PyTorch {impl.split('-')[1]} ({r.get('torch', '?')})", r["tokens_per_s"],
                r["mfu"], f"peak {r.get('peak_mem_gib', 0):.1f} GiB")
            best = max(best or 0, r["tokens_per_s"])
        else:
            lines.append(f"| PyTorch {impl.split('-')[1]} | missing | | "
                         f"{(r or {}).get('error', '')[:80]} |")
    lines.append("")
    if kiln and best:
        lines.append(f"kiln / best PyTorch: {kiln[1] / best:.2f}x (the issue asks >= 1.2x); "
                     f"kiln MFU {100 * kiln[2]:.1f}% (asks >= 50%)")
    if kiln and cudnn:
        lines.append(f"cuDNN's attention: {100 * (cudnn[1] / kiln[1] - 1):+.1f}% tokens/s over "
                     f"kiln's own attention kernels")
    if kiln and eager:
        lines.append(f"CUDA graphs: {100 * (kiln[1] / eager[1] - 1):+.1f}% tokens/s over the "
                     f"kernels launched one by one")

    attention = json_lines(os.path.join(out, "attention.log"))
    if attention:
        lines += ["", "| attention (one 1.1B layer) | forward ms | backward ms | fwd TFLOP/s | "
                  "bwd TFLOP/s |", "|---|---:|---:|---:|---:|"]
        for r in attention:
            if "forward_ms" in r:
                lines.append(f"| {r['impl']} | {r['forward_ms']} | {r['backward_ms']} | "
                             f"{r['forward_tflops']} | {r['backward_tflops']} |")
            else:
                lines.append(f"| {r['impl']} | missing | | | {r.get('error', '')[:60]} |")

    def worst(name):
        found = [l for l in nonempty_lines(os.path.join(out, name + ".log"))
                 if l.startswith("worst")]
        return found[0] if found else "missing"

    lines += ["", "tiny, GPU against CPU (fp32, 30 steps): " + worst("curves"),
              "tiny bf16, cuDNN's attention against kiln's (30 steps): " + worst("curves_cudnn")
              + f" ({cudnn_use(out, 'train_cuda_cudnn')})"]
    ops = nonempty_lines(os.path.join(out, "cudnn_ops.log"))
    if not ops:
        verdict = "missing"
    elif any("FAILED" in l for l in ops):
        verdict = "FAILED"
    elif any("[  SKIPPED ]" in l for l in ops):
        verdict = "skipped"
    else:
        verdict = "passed" if any("[  PASSED  ]" in l for l in ops) else "no verdict"
    said = [l for l in ops if "not asked for" in l or "offers no" in l]
    said += [ops[i + 1] for i, l in enumerate(ops[:-1]) if l.endswith(": Skipped")]  # the reason
    lines.append("cuDNN attention against the reference: " + verdict
                 + ("; " + "; ".join(said)[:300] if said else ""))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    try:
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text)
    except OSError as e:
        print(f"summary: cannot write {out}/summary.md: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
