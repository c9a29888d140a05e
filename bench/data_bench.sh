#!/usr/bin/env bash
# Tokenization throughput: `kiln data` (1 and 2 threads with kiln's encoder, 2 threads with
# SentencePiece's) against SentencePiece's own `spm_encode` on the same bytes and the same
# tokenizer, in one run, on two corpus shapes:
#
#   lines:  one document per line (a .jsonl), so both tools encode exactly the same strings;
#   books:  a few large documents (English books concatenated into one .txt: one document),
#           which kiln encodes in segments cut before newlines, ids unchanged, and spm_encode
#           line by line.
#
#   bash bench/data_bench.sh [REPEATS]   (default 3; medians. Uses ../shared/data when present,
#                                         else generated text and a tokenizer trained on it)
#
# kiln's token counts are its own (BOS/EOS per document, and in the books the newlines, which
# spm_encode drops with the line ends): the table gives both the ratio of tokens/s and that of
# wall time on the same bytes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SHARED="${SHARED_DATA:-$ROOT/../shared/data}"
REPEATS="${1:-3}"

if [ -f "$SHARED/llama2-tokenizer.model" ]; then
    model="$SHARED/llama2-tokenizer.model"
    cat "$SHARED"/nltk-gutenberg/*.txt "$SHARED"/wikitext-2/*.txt "$SHARED/tinyshakespeare.txt" \
        | grep -av '^[[:space:]]*$' > "$work/text.txt"
    g="$SHARED/nltk-gutenberg"
    cat "$g"/austen-*.txt "$g"/chesterton-*.txt "$g/melville-moby_dick.txt" > "$work/books.txt"
    what="Llama-2 tokenizer (32000)"
    lines_what="English books + WikiText-2 + Shakespeare, non-blank lines"
    books_what="Austen, Chesterton, Melville concatenated: one document"
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
    # The large-document shape: the first 4.4 MB of the same text, as one .txt document.
    head -c 4400000 "$work/text.txt" > "$work/books.txt"
    what="trained 512-piece tokenizer"
    lines_what="generated English-like text"
    books_what="4.4 MB of the generated text: one document"
fi
/usr/bin/python3 - "$work/text.txt" "$work/lines.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8", errors="replace") as src, open(sys.argv[2], "w") as out:
    for line in src:
        out.write(json.dumps({"text": line.rstrip("\n")}) + "\n")
PY

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench SHAPE SPM_INPUT KILN_CORPUS DESCRIPTION
bench() {
    local shape="$1" spm_in="$2" corpus="$3" desc="$4"
    local t0 t1 run spm_tokens kiln_tokens spm_times=()
    local -A times
    local runs=(1:kiln 2:kiln 2:sentencepiece)
    # The tools take turns in each round, so that load from elsewhere on a shared machine falls
    # on all of them alike.
    for ((r = 0; r < REPEATS; r++)); do
        t0=$(now)
        spm_encode --model "$model" --output_format=id < "$spm_in" > "$work/spm.ids"
        t1=$(now)
        spm_times+=("$(echo "$t1 - $t0" | bc -l)")
        for run in "${runs[@]}"; do
            rm -rf "$work/$shape-$run"
            t0=$(now)
            "$KILN" data --corpus "$corpus" --tokenizer "$model" --out "$work/$shape-$run" \
                --threads "${run%:*}" --encoder "${run#*:}" --set data.seq_len=1024 \
                >/dev/null 2>"$work/kiln.log"
            t1=$(now)
            times[$run]+=" $(echo "$t1 - $t0" | bc -l)"
        done
    done
    spm_tokens=$(wc -w < "$work/spm.ids")
    local spm_s
    spm_s=$(median "${spm_times[@]}")
    local -A kiln_s
    for run in "${runs[@]}"; do
        # shellcheck disable=SC2086
        kiln_s[$run]=$(median ${times[$run]})
    done
    kiln_tokens=$(grep -o '[0-9]* tokens ->' "$work/kiln.log" | grep -o '^[0-9]*')
    local same=yes
    for f in "$work/$shape-1:kiln"/shard-*.bin; do
        for run in 2:kiln 2:sentencepiece; do
            cmp -s "$f" "$work/$shape-$run/$(basename "$f")" || same=NO
        done
    done
    printf '\n%s, %s: %.1f MB, %s lines; spm_encode %s tokens, kiln %s tokens\n\n' "$what" \
        "$desc" "$(echo "$(stat -c %s "$spm_in")/1000000" | bc -l)" "$(wc -l < "$spm_in")" \
        "$spm_tokens" "$kiln_tokens"
    echo "| tool | threads | seconds (median of $REPEATS) | tokens/s | tokens/s vs spm_encode | time vs spm_encode |"
    echo "|---|---:|---:|---:|---:|---:|"
    local spm_rate rate
    spm_rate=$(echo "$spm_tokens / $spm_s" | bc -l)
    printf '| spm_encode | 1 | %.2f | %.0f | 1.00x | 1.00x |\n' "$spm_s" "$spm_rate"
    for run in "${runs[@]}"; do
        rate=$(echo "$kiln_tokens / ${kiln_s[$run]}" | bc -l)
        printf '| kiln data --encoder %s (tokenize+pack+write) | %s | %.2f | %.0f | %.2fx | %.2fx |\n' \
            "${run#*:}" "${run%:*}" "${kiln_s[$run]}" "$rate" "$(echo "$rate / $spm_rate" | bc -l)" \
            "$(echo "$spm_s / ${kiln_s[$run]}" | bc -l)"
    done
    printf '\n2 threads / 1 thread: %.2fx; shards identical for every row: %s\n' \
        "$(echo "${kiln_s[1:kiln]} / ${kiln_s[2:kiln]}" | bc -l)" "$same"
}

bench lines "$work/text.txt" "$work/lines.jsonl" "$lines_what"
bench books "$work/books.txt" "$work/books.txt" "$books_what"
