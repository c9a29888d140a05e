#!/usr/bin/env bash
# Tokenization throughput: `kiln data` (1 and 2 threads) against SentencePiece's own
# `spm_encode` on the same text and the same tokenizer, in one run.
#
#   bash bench/data_bench.sh            (uses ../shared/data when present, else builtin stories)
#
# The text is one document per line, so both tools encode exactly the same strings; kiln's
# count includes the BOS/EOS it adds per document.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SHARED="${SHARED_DATA:-$ROOT/../shared/data}"

if [ -f "$SHARED/llama2-tokenizer.model" ]; then
    model="$SHARED/llama2-tokenizer.model"
    cat "$SHARED"/nltk-gutenberg/*.txt "$SHARED"/wikitext-2/*.txt "$SHARED/tinyshakespeare.txt" \
        | grep -v '^[[:space:]]*$' > "$work/text.txt"
    what="Llama-2 tokenizer (32000), English books + WikiText-2 + Shakespeare"
else
    # No shared data: 8 MB of pseudo-English lines, and a tokenizer trained on them.
    /usr/bin/python3 - "$work/text.txt" <<'PY'
import random, sys
random.seed(1)
words = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "will more no out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()
with open(sys.argv[1], "w") as out:
    size = 0
    while size < 8_000_000:
        line = " ".join(random.choice(words) for _ in range(random.randint(5, 40))).capitalize() + "."
        out.write(line + "\n")
        size += len(line) + 1
PY
    "$KILN" tokenizer train --corpus "$work/text.txt" --vocab-size 512 --out "$work/t.model" \
        >/dev/null 2>&1
    model="$work/t.model"
    what="trained 512-piece tokenizer, generated English-like text"
fi
/usr/bin/python3 - "$work/text.txt" "$work/corpus.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8", errors="replace") as src, open(sys.argv[2], "w") as out:
    for line in src:
        out.write(json.dumps({"text": line.rstrip("\n")}) + "\n")
PY
bytes=$(stat -c %s "$work/text.txt")
lines=$(wc -l < "$work/text.txt")

now() { date +%s.%N; }
t0=$(now)
spm_encode --model "$model" --output_format=id < "$work/text.txt" > "$work/spm.ids"
t1=$(now)
spm_tokens=$(wc -w < "$work/spm.ids")
spm_s=$(echo "$t1 - $t0" | bc -l)

declare -A kiln_s
for threads in 1 2; do
    rm -rf "$work/out$threads"
    t0=$(now)
    "$KILN" data --corpus "$work/corpus.jsonl" --tokenizer "$model" --out "$work/out$threads" \
        --threads "$threads" --set data.seq_len=1024 >/dev/null 2>&1
    t1=$(now)
    kiln_s[$threads]=$(echo "$t1 - $t0" | bc -l)
done
kiln_tokens=$(( spm_tokens + 2 * lines ))
same=$(cmp -s "$work/out1/shard-00000.bin" "$work/out2/shard-00000.bin" && echo yes || echo NO)

printf '\n%s: %s lines, %.1f MB, %s spm tokens\n\n' "$what" "$lines" "$(echo "$bytes/1000000" | bc -l)" "$spm_tokens"
echo "| tool | threads | seconds | tokens/s | vs spm_encode |"
echo "|---|---:|---:|---:|---:|"
spm_rate=$(echo "$spm_tokens / $spm_s" | bc -l)
printf '| spm_encode | 1 | %.2f | %.0f | 1.00x |\n' "$spm_s" "$spm_rate"
for threads in 1 2; do
    rate=$(echo "$kiln_tokens / ${kiln_s[$threads]}" | bc -l)
    printf '| kiln data (tokenize+pack+write) | %s | %.2f | %.0f | %.2fx |\n' "$threads" \
        "${kiln_s[$threads]}" "$rate" "$(echo "$rate / $spm_rate" | bc -l)"
done
printf '\n2 threads / 1 thread: %.2fx; shards identical for 1 and 2 threads: %s\n' \
    "$(echo "${kiln_s[1]} / ${kiln_s[2]}" | bc -l)" "$same"
