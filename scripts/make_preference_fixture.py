"""Reference values for runner's preference losses (tests/fixtures/preference/losses.json).

Each case holds policy and reference sequence log-probs, response lengths, the loss settings,
and what TRL computes from them in float64: the step's loss, its gradient with respect to the
policy's chosen and rejected log-probs, and the implicit rewards. The formulas follow TRL 1.16's
code paths (DPOTrainer._compute_loss, ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss with
loss_type="simpo", KTOTrainer._compute_loss); where TRL exposes the loss as a method (ORPO,
SimPO) this script also calls it and checks that the float64 formula agrees with it.

Run: python scripts/make_preference_fixture.py  (torch; trl optional, for the cross-check)
"""

import json
import math
import pathlib
import types

import torch
import torch.nn.functional as F

torch.manual_seed(0)
PAIRS = 6
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/preference/losses.json"


def draw():
    len_c = torch.randint(3, 20, (PAIRS,)).double()
    len_r = torch.randint(3, 20, (PAIRS,)).double()
    # Per-token log-probs around -1.5, so sums scale with length as a model's do.
    pc = -(torch.rand(PAIRS, dtype=torch.float64) + 1.0) * len_c
    pr = -(torch.rand(PAIRS, dtype=torch.float64) + 1.0) * len_r
    rc = pc + torch.randn(PAIRS, dtype=torch.float64) * 3.0
    rr = pr + torch.randn(PAIRS, dtype=torch.float64) * 3.0
    return pc, pr, rc, rr, len_c, len_r


def dpo(loss_type, beta, eps, pc, pr, rc, rr, len_c, len_r):
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # TRL 1.16: -logsigmoid(beta * delta); eps > 0 is cDPO as TRL < 1.0 computed it.
        losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        avg = chosen_ratio / len_c.clamp(min=1) - rejected_ratio / len_r.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x):
    return torch.log1p(-torch.exp(x))


def orpo(beta, pc, pr, len_c, len_r):
    ac, ar = pc / len_c, pr / len_r
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    ratio = F.logsigmoid(log_odds)
    nll = -pc.sum() / len_c.sum()
    return nll - (beta * ratio).mean(), beta * ac.detach(), beta * ar.detach(), (ac, ar)


def simpo(beta, gamma, eps, pc, pr, len_c, len_r):
    ac, ar = pc / len_c, pr / len_r
    logits = (ac - ar) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    return losses.mean(), beta * ac.detach(), beta * ar.detach(), (ac, ar)


def kto(beta, wd, wu, policy, reference, desirable, policy_kl, reference_kl):
    kl = (policy_kl - reference_kl).mean().detach().clamp(min=0)
    ratio = policy - reference
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, wd * good, wu * bad)
    return losses.mean(), beta * ratio.detach(), kl


def trl_cross_check(name, fn):
    try:
        fn()
        print(f"{name}: agrees with TRL's method")
    except ImportError:
        print(f"{name}: trl not installed, formula not cross-checked")


def grads(loss, *xs):
    return [g.tolist() for g in torch.autograd.grad(loss, xs)]


cases = []
for loss_type, beta, eps in [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.1),
    ("ipo", 0.1, 0.0),
    ("hinge", 0.1, 0.0),
    ("robust", 0.1, 0.2),
]:
    pc, pr, rc, rr, len_c, len_r = draw()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, cr, rj = dpo(loss_type, beta, eps, pc, pr, rc, rr, len_c, len_r)
    gc, gr = grads(loss, pc, pr)
    cases.append(dict(
        kind="dpo", loss_type=loss_type, beta=beta, label_smoothing=eps,
        policy_chosen=pc.tolist(), policy_rejected=pr.tolist(),
        reference_chosen=rc.tolist(), reference_rejected=rr.tolist(),
        len_chosen=len_c.tolist(), len_rejected=len_r.tolist(),
        loss=loss.item(), grad_chosen=gc, grad_rejected=gr,
        rewards_chosen=cr.tolist(), rewards_rejected=rj.tolist(),
    ))

pc, pr, _, _, len_c, len_r = draw()
pc.requires_grad_(True)
pr.requires_grad_(True)
beta = 0.1
loss, cr, rj, (ac, ar) = orpo(beta, pc, pr, len_c, len_r)
gc, gr = grads(loss, pc, pr)
cases.append(dict(
    kind="orpo", beta=beta, policy_chosen=pc.tolist(), policy_rejected=pr.tolist(),
    len_chosen=len_c.tolist(), len_rejected=len_r.tolist(), loss=loss.item(),
    grad_chosen=gc, grad_rejected=gr, rewards_chosen=cr.tolist(), rewards_rejected=rj.tolist(),
))


def check_orpo():
    from trl.experimental.orpo import ORPOTrainer

    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, ac.detach(), ar.detach())
    ratio = F.logsigmoid((ac - ar) - (log1mexp(ac) - log1mexp(ar))).detach()
    assert torch.allclose(losses.double(), beta * ratio, rtol=1e-5), (losses, beta * ratio)


trl_cross_check("orpo", check_orpo)

for beta, gamma, eps in [(2.0, 0.5, 0.0), (2.5, 1.0, 0.1)]:
    pc, pr, _, _, len_c, len_r = draw()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, cr, rj, (ac, ar) = simpo(beta, gamma, eps, pc, pr, len_c, len_r)
    gc, gr = grads(loss, pc, pr)
    cases.append(dict(
        kind="simpo", beta=beta, gamma=gamma, label_smoothing=eps,
        policy_chosen=pc.tolist(), policy_rejected=pr.tolist(),
        len_chosen=len_c.tolist(), len_rejected=len_r.tolist(), loss=loss.item(),
        grad_chosen=gc, grad_rejected=gr, rewards_chosen=cr.tolist(), rewards_rejected=rj.tolist(),
    ))

    def check_simpo():
        from trl.experimental.cpo import CPOTrainer

        fake = types.SimpleNamespace(
            beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo", alpha=0.0,
            accelerator=types.SimpleNamespace(device="cpu"),
        )
        losses, *_ = CPOTrainer.cpo_loss(fake, ac.detach(), ar.detach())
        want, *_ = simpo(beta, gamma, eps, pc.detach(), pr.detach(), len_c, len_r)
        assert math.isclose(losses.mean().item(), want.item(), rel_tol=1e-6), (losses.mean(), want)

    trl_cross_check("simpo", check_simpo)

for beta, wd, wu in [(0.1, 1.0, 1.0), (0.3, 1.0, 1.5)]:
    policy, _, reference, _, length, _ = draw()
    desirable = torch.tensor([True, False, True, True, False, False])
    policy_kl = -(torch.rand(PAIRS, dtype=torch.float64) + 1.0) * length
    reference_kl = policy_kl + torch.randn(PAIRS, dtype=torch.float64) * 3.0 - 1.0
    policy.requires_grad_(True)
    loss, rewards, kl = kto(beta, wd, wu, policy, reference, desirable, policy_kl, reference_kl)
    (g,) = grads(loss, policy)
    cases.append(dict(
        kind="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
        policy=policy.tolist(), reference=reference.tolist(), length=length.tolist(),
        desirable=desirable.tolist(), policy_kl=policy_kl.tolist(), reference_kl=reference_kl.tolist(),
        loss=loss.item(), grad=g, rewards=rewards.tolist(), kl=kl.item(),
    ))

OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps({"source": "scripts/make_preference_fixture.py", "cases": cases}, indent=1) + "\n")
print(f"wrote {len(cases)} cases to {OUT}")
