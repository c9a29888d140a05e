#!/usr/bin/env python3
"""kiln's Hugging Face export, read by a real transformers install.

usage: hf_check.py HF_DIR SHARD ROWS KILN_EVAL_JSON [IDS_FILE]

Loads HF_DIR with transformers' AutoModelForCausalLM (float32) and computes the mean
next-token loss on the first ROWS rows of the kiln token shard SHARD, then compares it with
`kiln eval` on the same rows (KILN_EVAL_JSON, its output) and with the independent reference
(tests/reference/llama_ref.py, which reads the same folder without transformers). With
IDS_FILE (a line of text, then the ids `kiln tokenizer encode` gave it) AutoTokenizer must
load the folder's tokenizer and encode that text to the same ids.

Prints one JSON line. Exits 0 when the losses agree to fp32 rounding (relative 1e-5) and the
ids are equal, 1 when not, 2 when transformers is not installed here.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
import llama_ref as ref  # noqa: E402

BOUND = 1e-5


def transformers_loss(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for row in torch.from_numpy(tokens):
            out = model(input_ids=row[None, :], labels=row[None, :])
            total += float(out.loss.double()) * (row.numel() - 1)  # HF's mean over T - 1
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def tokenizer_ids(hf_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return tok(text, add_special_tokens=False).input_ids, type(tok).__name__


def main(argv):
    if len(argv) not in (4, 5):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 1
    hf_dir, shard, rows, kiln_json = argv[0], argv[1], int(argv[2]), argv[3]
    try:
        import transformers
    except ImportError:
        print("hf_check: transformers is not installed here", file=sys.stderr)
        return 2
    tokens = ref.read_token_shard(shard, rows)
    kiln = json.load(open(kiln_json))
    result = {
        "transformers": transformers.__version__,
        "rows": int(tokens.shape[0]),
        "kiln_eval": kiln["loss"],
        "reference": ref.eval_hf(hf_dir, shard, rows)["loss"],
        "transformers_loss": transformers_loss(hf_dir, tokens),
    }
    ok = kiln["rows"] == tokens.shape[0]
    for key in ("reference", "transformers_loss"):
        rel = abs(result[key] - kiln["loss"]) / abs(kiln["loss"])
        result[key + "_rel"] = rel
        ok = ok and rel <= BOUND
    if len(argv) == 5:
        lines = open(argv[4]).read().splitlines()
        text, want = lines[0], [int(x) for x in lines[1].split()]
        if want and want[0] == 1:  # kiln's encoder starts with BOS; compare the text's ids
            want = want[1:]
        try:
            got, kind = tokenizer_ids(hf_dir, text)
            result["tokenizer"] = kind
            result["ids_equal"] = got == want
            ok = ok and got == want
        except Exception as e:  # a tokenizer that does not load is a finding, not a crash
            result["tokenizer_error"] = f"{type(e).__name__}: {e}"
            ok = False
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
