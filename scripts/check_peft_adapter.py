"""Checks a runner-written LoRA adapter directory against peft's own definitions.

usage: python3 scripts/check_peft_adapter.py DIR [--layers 2 --hidden 8 --kv-dim 4 --intermediate 12]
       [--peft-src PATH]   (folder holding peft/, e.g. an unzipped `pip download --no-deps peft==0.21.2`)
       [--base HF_DIR --runner-logits FILE [--merged HF_DIR --runner-merged-logits FILE]]

1. adapter_config.json: with peft importable (needs torch), `peft.LoraConfig.from_pretrained(DIR)`
   must load it and `to_dict()` must give the same keys; without torch, the keys and default values are
   compared with the dataclass fields parsed (ast) from peft's source: PeftConfigMixin, PeftConfig and
   LoraConfig (minus runtime_config, which LoraConfig.to_dict pops).
2. adapter_model.safetensors (read with safetensors' numpy API): the tensor names must be exactly those
   peft saves for a Llama/Qwen2 model with this config (`base_model.model.` + module path +
   `.lora_A.weight` / `.lora_B.weight`, modules chosen as check_target_module_exists does), with shapes
   lora_A [r, in_features] and lora_B [out_features, r]; with use_dora also `.lora_magnitude_vector` [out].
3. With --base (torch, transformers and peft needed): loads the adapter with
   `peft.PeftModel.from_pretrained` onto `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`,
   runs the prompt ids of FILE (written by `runner generate --model HF_DIR --adapter DIR --logits FILE`)
   and prints the max abs difference from runner's logits; with --merged, the same for runner's merged
   folder loaded by transformers alone against `runner generate --model MERGED --logits FILE`, and for
   peft's own merge (`merge_and_unload`) against runner's merged weights.
"""

import argparse
import ast
import json
import os
import re
import sys

MODULES = {"self_attn.q_proj": ("hidden", "hidden"), "self_attn.k_proj": ("kv", "hidden"),
           "self_attn.v_proj": ("kv", "hidden"), "self_attn.o_proj": ("hidden", "hidden"),
           "mlp.gate_proj": ("inter", "hidden"), "mlp.up_proj": ("inter", "hidden"),
           "mlp.down_proj": ("hidden", "inter")}


def dataclass_fields(peft_src):
    fields = {}
    for fn, cls in [("peft/config.py", "PeftConfigMixin"), ("peft/config.py", "PeftConfig"),
                    ("peft/tuners/lora/config.py", "LoraConfig")]:
        tree = ast.parse(open(os.path.join(peft_src, fn)).read())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
        for stmt in node.body:
            if not isinstance(stmt, ast.AnnAssign):
                continue
            value = stmt.value
            if isinstance(value, ast.Call):
                kw = {k.arg: k.value for k in value.keywords}
                if "default_factory" in kw:
                    default = {"dict": {}, "list": []}.get(ast.unparse(kw["default_factory"]), "<factory>")
                else:
                    default = ast.literal_eval(kw["default"]) if "default" in kw else "<required>"
            else:
                default = ast.literal_eval(value) if value is not None else "<required>"
            fields[stmt.target.id] = default
    fields.pop("runtime_config")
    return fields


def check_config(path, peft_src):
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    try:
        import peft  # noqa: F401  (needs torch)
        loaded = peft.LoraConfig.from_pretrained(path)
        keys = set(loaded.to_dict())
        assert keys == set(config), f"keys differ from peft's to_dict: {sorted(keys ^ set(config))}"
        print(f"config: loaded with peft {peft.__version__} LoraConfig.from_pretrained; keys match")
    except ImportError as e:
        print(f"config: peft not importable ({e}); comparing with peft's dataclass source in {peft_src}")
        fields = dataclass_fields(peft_src)
        missing, unknown = set(fields) - set(config), set(config) - set(fields)
        assert not missing and not unknown, f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        set_by_save = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
                       "peft_version": "0.21.2"}
        user_keys = {"r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "use_rslora",
                     "use_dora", "layers_to_transform", "rank_pattern", "alpha_pattern", "revision"}
        for key, default in fields.items():
            want = set_by_save.get(key, default)
            if key not in user_keys:
                assert config[key] == want, f"{key}: file has {config[key]!r}, peft default {want!r}"
        assert list(config) == sorted(config), "peft writes sort_keys=True"
        print(f"config: {len(config)} keys = peft LoraConfig fields; non-user keys equal peft's defaults")
    return config


def targeted(config, key):
    target = config["target_modules"]
    if isinstance(target, str):
        if target == "all-linear":
            return any(key.endswith("." + m) for m in MODULES)
        return re.fullmatch(target, key) is not None
    return key in target or any(key.endswith(f".{t}") for t in target)


def check_tensors(path, config, dims):
    from safetensors import safe_open
    r = config["r"]
    want = {}
    for layer in range(dims["layers"]):
        if config.get("layers_to_transform") is not None:
            layers = config["layers_to_transform"]
            if layer not in (layers if isinstance(layers, list) else [layers]):
                continue
        for module, (out_dim, in_dim) in MODULES.items():
            key = f"model.layers.{layer}.{module}"
            if targeted(config, key):
                want[f"base_model.model.{key}.lora_A.weight"] = (r, dims[in_dim])
                want[f"base_model.model.{key}.lora_B.weight"] = (dims[out_dim], r)
                if config.get("use_dora"):
                    want[f"base_model.model.{key}.lora_magnitude_vector"] = (dims[out_dim],)
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="numpy") as f:
        got = {name: tuple(f.get_tensor(name).shape) for name in f.keys()}
        meta = f.metadata()
    assert got == want, f"names/shapes differ: extra {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}, " \
                        f"shape diffs {[(n, got[n], want[n]) for n in got if n in want and got[n] != want[n]]}"
    print(f"tensors: {len(got)} names and shapes are the ones peft saves; metadata {meta}")


def read_runner_logits(path):
    import json as _json
    import numpy as np
    rows = []
    for line in open(path):
        if line.strip():
            row = _json.loads(line)
            ids = row["prompt_ids"]
            rows.append((ids, np.asarray(row["logits"], dtype=np.float32).reshape(len(ids), row["vocab"])))
    return rows


def torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def check_logits(adapter_dir, base_dir, runner_file, merged_dir, runner_merged_file):
    import numpy as np
    import peft
    import torch
    import transformers
    torch.set_grad_enabled(False)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    worst = 0.0
    for ids, runner in read_runner_logits(runner_file):
        diff = float(np.abs(torch_logits(model, ids) - runner).max())
        worst = max(worst, diff)
        print(f"peft(base + adapter) vs runner(base + adapter), {len(ids)} tokens: max |diff| {diff:.3e}")
    report = {"adapter": worst}
    if merged_dir:
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
        peft_merged = model.merge_and_unload()
        sd_peft, sd_runner = peft_merged.state_dict(), merged.state_dict()
        w_diff = max(float((sd_peft[k] - sd_runner[k]).abs().max()) for k in sd_peft if k in sd_runner)
        print(f"peft merge_and_unload vs runner merged weights: max |diff| {w_diff:.3e}")
        m_worst = 0.0
        for ids, runner in read_runner_logits(runner_merged_file):
            diff = float(np.abs(torch_logits(merged, ids) - runner).max())
            peft_diff = float(np.abs(torch_logits(merged, ids) - torch_logits(peft_merged, ids)).max())
            m_worst = max(m_worst, diff)
            print(f"transformers(merged) vs runner(merged): max |diff| {diff:.3e}; vs peft-merged {peft_diff:.3e}")
        report.update(merged=m_worst, merged_weights=w_diff)
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--kv-dim", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--peft-src", default="/tmp/peft-src")
    ap.add_argument("--base")
    ap.add_argument("--runner-logits")
    ap.add_argument("--merged")
    ap.add_argument("--runner-merged-logits")
    a = ap.parse_args()
    config = check_config(a.dir, a.peft_src)
    if a.layers is not None:
        check_tensors(a.dir, config, {"layers": a.layers, "hidden": a.hidden, "kv": a.kv_dim, "inter": a.intermediate})
    if a.base:
        print(check_logits(a.dir, a.base, a.runner_logits, a.merged, a.runner_merged_logits))
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
