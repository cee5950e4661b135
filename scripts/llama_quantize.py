#!/usr/bin/env python3
"""Runs llama.cpp's own quantizer (llama_model_quantize, as the llama-quantize tool, no imatrix)
through llama-cpp-python.

Usage: python3 scripts/llama_quantize.py IN.gguf OUT.gguf FTYPE   (FTYPE: q8_0 | q4_0 | q4_k_m)
"""
import sys

import llama_cpp

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
          "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def main() -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[sys.argv[3]]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
    sys.exit(rc)


if __name__ == "__main__":
    main()
