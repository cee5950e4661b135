"""Runs `runner generate --greedy --json` on every family fixture's prompts (as a user would, one
prompt per process) and compares prompt ids and tokens with transformers' in expected.json.

  cargo build --release && python3 scripts/check_family_generate.py
"""
import json
import os
import subprocess
import sys

ROOT = "tests/fixtures/families"
RUNNER = os.environ.get("RUNNER", "target/release/runner")

failed = 0
for name in sorted(n for n in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, n))):
    expected = json.load(open(os.path.join(ROOT, name, "expected.json")))
    same = 0
    for p in expected["prompts"]:
        out = subprocess.run([RUNNER, "generate", "--model", os.path.join(ROOT, name), "--prompt", p["text"],
                              "--max-new-tokens", "16", "--greedy", "--device", "cpu", "--json"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: runner failed: {out.stderr.strip()[-400:]}")
            break
        got = json.loads(out.stdout.strip().splitlines()[-1])
        ok = got["prompt_ids"] == p["ids"] and got["token_ids"] == p["tokens"]
        same += ok
        if not ok:
            print(f"{name}: {p['text']!r}: want {p['tokens']} got {got['token_ids']}")
    total = len(expected["prompts"])
    failed += same != total
    print(f"{name}: {same}/{total} prompts give transformers' prompt ids and greedy tokens")
sys.exit(1 if failed else 0)
