#!/usr/bin/env bash
# Adapters between runner and peft, both ways, for every PEFT method, on SmolLM2-135M-Instruct.
#
# usage: scripts/check_peft_methods.sh [RUNNER] [OUT_DIR]
#   RUNNER defaults to target/release/runner; needs python3 with torch, transformers and peft
#   (CPU is enough), and the recipes below already run (`runner run recipes/<name>.toml`).
#
# 1. runner -> peft: each recipe's trained adapter is loaded by peft.PeftModel.from_pretrained onto
#    the base HF folder runner trained it on; peft's logits must equal runner's
#    (`runner generate --adapter ... --logits`, float64 on the CPU) within 1e-3. Each line also
#    says how far runner's and peft's float32 logits are from a float64 peft run, which tells
#    an implementation difference from float32 rounding.
# 2. peft -> runner: peft writes an adapter of each method (non-zero weights), runner loads it with
#    `runner generate --adapter` and must give peft's logits within 1e-3 (each line again with
#    both sides' distance from float64 peft).
# Exit status 1 if any comparison fails.
set -u
RUNNER=${1:-target/release/runner}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
PROMPTS="$OUT/prompts.jsonl"
printf '%s\n' '"Below is an instruction that describes a task. Write a response.\n\n### Instruction:\nName three primary colors.\n\n### Response:\n"' \
  '"Give one tip for staying healthy."' > "$PROMPTS"
failed=0
# Runs a comparison and prints its verdict line; a failure marks the whole check failed.
check() {
  local out
  out=$("$@" 2>&1) || failed=1
  echo "${out##*$'\n'}"
}

# recipe:stage that holds the adapter (sft stages keep it in adapter/)
for entry in alpaca:lora dora:dora adalora:adalora prompt-tuning:prompt_tuning p-tuning:p_tuning advertisegen:prefix; do
  recipe=${entry%%:*}; label=${entry#*:}
  base=$("$RUNNER" path "recipes/$recipe.toml" base 2>/dev/null) || { echo "$label: recipes/$recipe.toml base not built; skipped"; failed=1; continue; }
  sft=$("$RUNNER" path "recipes/$recipe.toml" sft 2>/dev/null) || { echo "$label: recipes/$recipe.toml sft not built; skipped"; failed=1; continue; }
  logits="$OUT/runner_$label.jsonl"
  "$RUNNER" generate --model "$base" --adapter "$sft/adapter" --prompts "$PROMPTS" --max-new-tokens 1 --logits "$logits" > /dev/null 2>"$OUT/gen_$label.err" \
    || { echo "$label: runner generate failed: $(tail -2 "$OUT/gen_$label.err")"; failed=1; continue; }
  echo -n "runner -> peft, $label ($recipe): "
  check python3 scripts/peft_roundtrip.py load --base "$base" --adapter "$sft/adapter" --logits "$logits" --exact
done

# peft -> runner, on the SmolLM2 base of the first recipe that has been run
base=""
for recipe in alpaca dora adalora prompt-tuning p-tuning advertisegen; do
  base=$("$RUNNER" path "recipes/$recipe.toml" base 2>/dev/null) && break
done
[ -n "$base" ] || { echo "no SmolLM2 recipe has been run (runner run recipes/alpaca.toml)"; exit 1; }
"$RUNNER" generate --model "$base" --prompts "$PROMPTS" --max-new-tokens 1 --logits "$OUT/base.jsonl" > /dev/null 2>&1
echo -n "base model: "
check python3 scripts/peft_roundtrip.py base --base "$base" --logits "$OUT/base.jsonl"
for method in lora dora adalora prompt_tuning p_tuning p_tuning_lstm prefix; do
  dir="$OUT/peft_$method"
  python3 scripts/peft_roundtrip.py make --base "$base" --method "$method" --out "$dir" --ids-from "$OUT/base.jsonl" --exact > /dev/null 2>&1 \
    || { echo "peft -> runner, $method: peft could not write the adapter"; failed=1; continue; }
  "$RUNNER" generate --model "$base" --adapter "$dir" --prompts "$PROMPTS" --max-new-tokens 1 --logits "$dir/runner_logits.jsonl" > /dev/null 2>"$dir/gen.err" \
    || { echo "peft -> runner, $method: runner could not load it: $(tail -2 "$dir/gen.err")"; failed=1; continue; }
  echo -n "peft -> runner, $method: "
  check python3 scripts/peft_roundtrip.py compare "$dir/peft_logits.jsonl" "$dir/runner_logits.jsonl" --exact "$dir/peft_logits_f64.jsonl"
done
exit $failed
