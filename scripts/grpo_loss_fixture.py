"""Writes tests/fixtures/grpo/loss.json: TRL's GRPO loss and its gradient on tiny fixed inputs.

The formula is TRL's `GRPOTrainer._get_per_token_logps` + `_compute_loss` (trl/trainer/grpo_trainer.py):
logits / temperature -> log_softmax -> the completion tokens' log-probs; ratio = exp(logp - old);
clipped with (1 - epsilon_low, 1 + epsilon_high); per_token_kl = exp(ref - logp) - (ref - logp) - 1;
per_token_loss = -min(ratio * A, clip(ratio) * A) + beta * kl; then "grpo" (masked mean per
sequence, mean over sequences), "bnpo" (masked token mean) or "dapo" (token sum / tokens in the
whole batch, here the same batch). clip_ratio counts tokens clipped in the direction that matters
(TRL's is_low_clipped | is_high_clipped). Run: python3 scripts/grpo_loss_fixture.py
"""

import json
import os

import torch


def per_token_logps(logits, targets, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def trl_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type):
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    l1 = coef_1 * adv.unsqueeze(1)
    l2 = coef_2 * adv.unsqueeze(1)
    per_token_loss = -torch.min(l1, l2)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # bnpo and dapo coincide for one micro-batch that is the whole batch
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    low = (coef_1 < 1 - eps_low) & (adv.unsqueeze(1) < 0)
    high = (coef_1 > 1 + eps_high) & (adv.unsqueeze(1) > 0)
    clip_ratio = ((low | high).float() * mask).sum() / mask.sum()
    kl_mean = (kl * mask).sum() / mask.sum()
    return loss, clip_ratio, kl_mean


def main():
    torch.manual_seed(0)
    rows, length, vocab = 3, 4, 5
    temperature = 0.7
    logits = torch.randn(rows, length, vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows, length))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    base = per_token_logps(logits, targets, temperature)
    # old and ref policies differ from the current one by up to +-0.5 nats, so some ratios leave
    # the clip range on both sides.
    old = base + torch.tensor([[0.4, -0.3, 0.05, -0.5], [0.0, 0.35, 0.2, -0.1], [-0.25, 0.1, 0.5, 0.3]], dtype=torch.float64)
    ref = base + torch.tensor([[0.2, 0.1, -0.4, 0.3], [-0.2, 0.5, 0.0, 0.1], [0.3, -0.3, 0.1, -0.2]], dtype=torch.float64)
    adv = torch.tensor([1.2, -0.8, 0.5], dtype=torch.float64)
    cases = []
    for loss_type, beta, eps_low, eps_high in [("grpo", 0.04, 0.2, 0.2), ("bnpo", 0.1, 0.2, 0.28), ("grpo", 0.0, 0.1, 0.3)]:
        x = logits.clone().requires_grad_(True)
        logps = per_token_logps(x, targets, temperature)
        loss, clip_ratio, kl = trl_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type)
        loss.backward()
        cases.append({
            "loss_type": loss_type, "beta": beta, "epsilon_low": eps_low, "epsilon_high": eps_high,
            "loss": loss.item(), "clip_ratio": clip_ratio.item(), "kl": kl.item(),
            "grad": x.grad.flatten().tolist(),
        })
    out = {
        "rows": rows, "length": length, "vocab": vocab, "temperature": temperature,
        "logits": logits.flatten().tolist(), "targets": targets.flatten().tolist(),
        "mask": mask.flatten().tolist(), "old_logps": old.flatten().tolist(),
        "ref_logps": ref.flatten().tolist(), "advantages": adv.tolist(), "cases": cases,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "grpo", "loss.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(path, [(c["loss_type"], round(c["loss"], 6), c["clip_ratio"]) for c in cases])


if __name__ == "__main__":
    main()
