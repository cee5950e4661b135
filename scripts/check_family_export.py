"""Loads what `runner export --format safetensors` writes for each family fixture back into
transformers and compares its logits with the fixture's (they must be identical).

  cargo build --release && python scripts/check_family_export.py   # needs torch + transformers 5
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

ROOT = "tests/fixtures/families"
RUNNER = os.environ.get("RUNNER", "target/release/runner")
torch.set_grad_enabled(False)

worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    for name in sorted(n for n in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, n))):
        src, out = os.path.join(ROOT, name), os.path.join(tmp, name)
        subprocess.run([RUNNER, "export", "--model", src, "--format", "safetensors", "--type", "f32",
                        "--out", out], check=True, capture_output=True)
        ids = torch.tensor([json.load(open(os.path.join(src, "expected.json")))["logits"]["ids"]])
        load = lambda d: AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
        diff = (load(src)(ids).logits - load(out)(ids).logits).abs().max().item()
        worst = max(worst, diff)
        print(f"{name}: max logit difference {diff}")
sys.exit(0 if worst == 0.0 else 1)
