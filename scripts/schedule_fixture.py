"""Writes tests/fixtures/train/schedule.json: lr multipliers of transformers' schedules.

The lambdas below are copied from transformers 5.24.0 src/transformers/optimization.py
(_get_constant_schedule_with_warmup_lr_lambda, lines 74-77; _get_linear_schedule_with_warmup_lr_lambda,
lines 101-104; _get_cosine_schedule_with_warmup_lr_lambda, lines 134-140) and
TrainingArguments.get_warmup_steps (training_args.py lines 2154-2161). They are pure math, so torch
is not needed: LambdaLR sets lr = base_lr * lr_lambda(step) where step counts optimizer steps from 0.
"""

import json
import math
import os


def constant(current_step, *, num_warmup_steps):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def linear(current_step, *, num_warmup_steps, num_training_steps):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def cosine(current_step, *, num_warmup_steps, num_training_steps, num_cycles=0.5):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def get_warmup_steps(warmup_steps, num_training_steps):
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(num_training_steps * warmup_steps)


cases = []
for kind in ["constant", "linear", "cosine"]:
    for total, warmup in [(10, 0), (10, 3), (100, 5), (100, 0.1), (37, 0.05), (7, 0.5), (5, 10), (1, 0), (50, 0.999)]:
        w = get_warmup_steps(warmup, total)
        fn = {"constant": lambda s: constant(s, num_warmup_steps=w),
              "linear": lambda s: linear(s, num_warmup_steps=w, num_training_steps=total),
              "cosine": lambda s: cosine(s, num_warmup_steps=w, num_training_steps=total)}[kind]
        cases.append({
            "scheduler": kind, "total_steps": total, "warmup": warmup, "warmup_steps": w,
            "base_lr": 2e-4, "lrs": [2e-4 * fn(s) for s in range(total + 2)],
        })

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "schedule.json")
with open(out, "w") as f:
    json.dump(cases, f, indent=1)
print(f"wrote {len(cases)} cases to {out}")
