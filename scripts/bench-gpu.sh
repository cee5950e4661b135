#!/usr/bin/env bash
# GPU machine: runner's benchmarks and PyTorch's on the same card, printed side by side.
# Usage: scripts/bench-gpu.sh RUNNER_BIN [kernels|model|all] [PEFT_BASELINE.py]
#   kernels: bf16 matmul (cuBLAS vs burn vs torch), attention fwd+bwd, chunked CE (bench_torch.py)
#   model:   LoRA SFT steps at Qwen2.5-0.5B (vs peft_baseline.py), prefill/decode at batch 1 and 32
set -euo pipefail
bin=${1:?runner binary}
what=${2:-all}
peft=${3:-}
here=$(dirname "$0")
tmp=$(mktemp -d)
if [[ $what == kernels || $what == all ]]; then
    "$bin" bench all --with-burn | tee "$tmp/kernels.jsonl"
    python3 "$here/bench_torch.py" all --ours "$tmp/kernels.jsonl"
fi
if [[ $what == model || $what == all ]]; then
    for b in 1 32; do
        "$bin" bench decode --shape 0.5b --batch $b --seq 128 --steps 64 --dtype bf16 | tee -a "$tmp/model.jsonl"
        python3 "$here/bench_model_torch.py" decode --shape 0.5b --batch $b --seq 128 --steps 64 | tee -a "$tmp/torch.jsonl"
    done
    for gc in "" "--gradient-checkpointing"; do
        for dt in bf16 f32; do
            "$bin" bench sft --shape 0.5b --batch 8 --seq 1024 --steps 6 --dtype $dt $gc | tee -a "$tmp/model.jsonl" || true
        done
    done
    if [[ -n $peft ]]; then
        for gc in 0 1; do python3 "$peft" --sizes 0.5b --gc $gc | tee -a "$tmp/torch.jsonl"; done
    fi
    python3 "$here/bench_model_torch.py" table --ours "$tmp/model.jsonl" --theirs "$tmp/torch.jsonl"
fi
