#!/usr/bin/env python3
"""Reads a GGUF with gguf-py's GGUFReader and writes every tensor dequantized by gguf-py (f32,
file order, concatenated) to OUT, plus a JSON summary on stdout (names, types, shapes, keys).
Used by runner-gguf tests to check gguf-py accepts our files and agrees on the values.

Usage: python3 scripts/gguf_py_dequant.py FILE.gguf OUT.f32
"""
import json
import sys

import numpy as np
import gguf
from gguf import quants


def main() -> None:
    r = gguf.GGUFReader(sys.argv[1])
    out = []
    summary = {"keys": list(r.fields.keys()), "tensors": []}
    for t in r.tensors:
        qt = t.tensor_type
        data = np.asarray(t.data)
        deq = quants.dequantize(data, qt).astype(np.float32).reshape(-1)
        out.append(deq)
        summary["tensors"].append({"name": t.name, "type": qt.name, "shape": [int(d) for d in t.shape]})
    np.concatenate(out).tofile(sys.argv[2])
    arch = r.fields["general.architecture"].contents()
    summary["architecture"] = arch
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
