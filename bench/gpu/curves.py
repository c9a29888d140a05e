#!/usr/bin/env python3
"""Compares two kiln runs' loss curves step by step (their metrics.jsonl files).

usage: curves.py REFERENCE.jsonl OTHER.jsonl STEPS BOUND
Prints each step's losses and relative difference; exits 1 unless both runs have STEPS steps
and every relative difference is at most BOUND.
"""
import json
import sys


def main(argv):
    ref_path, other_path, steps, bound = argv[0], argv[1], int(argv[2]), float(argv[3])
    try:
        ref, other = ([json.loads(line) for line in open(p)] for p in (ref_path, other_path))
    except (OSError, ValueError) as e:
        print(f"curves: cannot read a run's metrics: {e}")
        return 1
    if len(ref) != steps or len(other) != steps:
        print(f"curves: {len(ref)} and {len(other)} steps, {steps} expected")
        return 1
    worst = 0.0
    for a, b in zip(ref, other):
        rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        worst = max(worst, rel)
        print(f"step {a['step']:3d}  {a['loss']:.6f}  {b['loss']:.6f}  rel {rel:.2e}  "
              f"tok/s {a['tokens_per_s']:.0f} {b['tokens_per_s']:.0f}")
    print(f"worst relative difference {worst:.2e} (bound {bound:g})")
    return 0 if worst <= bound else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
