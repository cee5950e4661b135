#!/usr/bin/env bash
# GPU machine: runner's LoRA/QLoRA training memory and speed next to Unsloth's, on the same card.
# Usage: scripts/bench-memory.sh RUNNER_BIN OUT_DIR CASE...
#   A CASE is `SHAPE:BATCHxSEQ:CHECKPOINTING[:METHOD]`, e.g. 1.5b:8x1024:offload or
#   7b:8x1024:true:qlora (CHECKPOINTING: false, true or offload; METHOD: lora (default) or qlora),
#   or `max:SHAPE:CHECKPOINTING[:METHOD]:FROM` for `runner bench sft --max-context` from FROM
#   tokens. With UNSLOTH=DIR (a folder holding ../shared/bench/unsloth with its wheels built),
#   each case also runs unsloth_bench.py (--gc 1 for true/offload: Unsloth's checkpointing is
#   always offloaded).
# Every line goes to OUT_DIR/memory.jsonl; a table is printed last. Peak memory is live buffers
# (runner: gpu_peak_gib; Unsloth: torch.cuda.max_memory_allocated).
set -uo pipefail
bin=${1:?runner binary}
out=${2:?output folder}
shift 2
mkdir -p "$out"
log="$out/memory.jsonl"
if [[ -n ${UNSLOTH:-} && ! -d /tmp/site/unsloth ]]; then
    (cd "$UNSLOTH" && bash install.sh >/dev/null) || { echo "unsloth install failed"; UNSLOTH=; }
fi
for case in "$@"; do
    IFS=: read -r a b c d e <<<"$case"
    if [[ $a == max ]]; then
        shape=$b gc=$c method=${d:-lora} from=${e:-8192}
        timeout 1500 "$bin" bench sft --max-context --shape "$shape" --batch 1 --seq "$from" \
            --dtype bf16 --method "$method" --gradient-checkpointing "$gc" --context-step 8192 \
            | tail -1 | sed "s/^{/{\"who\":\"runner\",\"case\":\"$case\",/" | tee -a "$log"
        continue
    fi
    shape=$a batch=${b%x*} seq=${b#*x} gc=$c method=${d:-lora}
    timeout 900 "$bin" bench sft --shape "$shape" --batch "$batch" --seq "$seq" --steps 5 --warmup 2 \
        --dtype bf16 --method "$method" --gradient-checkpointing "$gc" 2>"$out/stderr-$shape-$gc-$method.txt" \
        | sed "s/^{/{\"who\":\"runner\",\"case\":\"$case\",/" | tee -a "$log"
    if [[ -n ${UNSLOTH:-} ]]; then
        ugc=$([[ $gc == false ]] && echo 0 || echo 1)
        uq=$([[ $method == qlora ]] && echo 1 || echo 0)
        (cd "$UNSLOTH" && PYTHONPATH=/tmp/site timeout 900 python3 unsloth_bench.py --sizes "$shape" \
            --batch "$batch" --seq "$seq" --gc "$ugc" --qlora "$uq" --steps 5 --warm 2 2>/dev/null) \
            | grep '^{' | sed "s/^{/{\"who\":\"unsloth\",\"case\":\"$case\",/" | tee -a "$log"
    fi
done
python3 - "$log" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'case':28} {'who':8} {'tok/s':>10} {'peak GiB':>9} {'reserved':>9}")
for r in rows:
    tps = r.get("tokens_per_s")
    peak = r.get("gpu_peak_gib", r.get("peak_gib"))
    res = r.get("gpu_reserved_gib")
    extra = f" max_context={r['max_context']}" if "max_context" in r else ""
    extra += f" error={r['error'][:80]}" if "error" in r else ""
    def f(v, w, p):
        return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else "-".rjust(w)
    print(f"{r['case']:28} {r['who']:8} {f(tps, 10, 0)} {f(peak, 9, 2)} {f(res, 9, 2)}{extra}")
EOF
