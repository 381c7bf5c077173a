"""The paper's objective, piece by piece: per-teacher term means, no decay on tokens, one schedule, inert unused heads."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from radio_scale.config import ConfigError, load_config
from radio_scale.models.heads import AdaptorHeads, zero_link
from radio_scale.models.student import StudentOutput
from radio_scale.train.optim import param_groups, run_lr_at
from radio_scale.train.trainer import build_model, loss_denominators


def _group(name, teachers, ranks, batch):
    return SimpleNamespace(name=name, teachers=tuple(teachers), ranks=tuple(range(ranks)), batch_per_rank=batch)


def test_per_teacher_reduction_gives_sam_its_full_weight():
    # the paper's stage 2 on 64 GPUs: CLIP+DINOv2 32 ranks x 32 images, SAM 32 ranks x 2 images
    groups = [_group("clip_dino", ["clip", "dino"], 32, 32), _group("sam", ["sam"], 32, 2)]
    active = {"clip_dino": True, "sam": True}
    assert loss_denominators(groups, active, "per_teacher") == {"clip": 1024, "dino": 1024, "sam": 64}
    # per_sample: every term over the 1,088 samples of the step, so SAM weighs 64/1,088 = 6 % of the paper's γ
    assert loss_denominators(groups, active, "per_sample") == {"clip": 1088, "dino": 1088, "sam": 1088}
    # a teacher in two groups counts the samples of both; an unsampled group counts none
    groups = [_group("a", ["clip", "sam"], 2, 4), _group("b", ["sam"], 1, 3)]
    assert loss_denominators(groups, {"a": True, "b": True}, "per_teacher") == {"clip": 8, "sam": 11}
    assert loss_denominators(groups, {"a": True, "b": False}, "per_teacher") == {"clip": 8, "sam": 8}


def test_loss_reduction_and_schedule_are_config_keys_with_paper_defaults():
    cfg = load_config("two_stage")
    assert cfg.loss.reduction == "per_teacher" and cfg.optim.schedule == "run"
    assert load_config("smoke", ["loss.reduction=per_sample"]).loss.reduction == "per_sample"
    with pytest.raises(ConfigError, match="loss.reduction"):
        load_config("smoke", ["loss.reduction=mean"])
    # a run schedule warms up once: a later stage's warm-up or peak is refused by name
    with pytest.raises(ConfigError, match=r"stages\.1\.warmup_steps.*optim\.schedule") as e:
        load_config("smoke", ["stages.1.warmup_steps=5"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"stages\.1\.lr"):
        load_config("smoke", ["stages.1.lr=1e-4"])
    assert load_config("smoke", ["optim.schedule=per_stage", "stages.1.warmup_steps=5"]).stages[1].warmup_steps == 5


def test_learning_rate_spans_the_run_and_warms_up_once():
    cfg = load_config("smoke", ["optim.min_lr_ratio=0.0"])  # two stages of 12 steps, warm-up 2 in stage 0
    peak, stages, o = cfg.optim.lr, cfg.stages, cfg.optim
    lrs = [run_lr_at(s, stages, o) for s in range(24)]
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)  # warm-up once
    assert lrs[11] > lrs[12] > lrs[13]  # stage 2 continues the same cosine: no restart, no second warm-up
    assert lrs[12] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 10 / 22)))
    assert lrs[23] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 21 / 22)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone after the warm-up
    # per_stage: each stage has its own warm-up and cosine (the previous behaviour, kept as an option)
    cfg = load_config("smoke", ["optim.schedule=per_stage", "stages.1.warmup_steps=2"])
    per = [run_lr_at(s, cfg.stages, cfg.optim) for s in range(24)]
    assert per[0] == per[12] == pytest.approx(peak / 2) and per[13] == pytest.approx(peak)
    assert per[11] < per[12] < per[13]
    # the two-stage recipe: one cosine over 600k steps
    cfg = load_config("two_stage")
    mid = run_lr_at(300_000, cfg.stages, cfg.optim)
    assert run_lr_at(299_999, cfg.stages, cfg.optim) > mid > run_lr_at(300_001, cfg.stages, cfg.optim)
    assert mid == pytest.approx(cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * 298_000 / 598_000)))


def test_weight_decay_only_on_weight_matrices():
    cfg = load_config("smoke", ["student.num_registers=2", "student.spectral_reparam=true",
                                "loss.balancer=uncertainty"])
    model, _ = build_model(cfg)
    decay_group, no_decay_group = param_groups(model, 0.02)
    assert decay_group["weight_decay"] == 0.02 and no_decay_group["weight_decay"] == 0.0
    decayed = {id(p) for p in decay_group["params"]}
    names = dict(model.named_parameters())
    where = {n: id(p) in decayed for n, p in names.items()}
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(names)  # every parameter, once
    for n, p in names.items():
        leaf = n.split(".")[-1]
        if n in ("student.prefix_tokens", "student.cpe.pos") or n.startswith("balancer."):
            assert not where[n], n  # CLS + register tokens, the position grid, the balancer
        elif leaf in ("bias", "gamma") or ".norm" in n or p.ndim <= 1:
            assert not where[n], n  # biases, norms, σReparam's γ
        else:
            assert where[n] and p.ndim >= 2, n  # linear weights, the patch-embedding kernel
    assert where["student.patch_embed.weight"] and where["student.blocks.0.attn.qkv.weight"]
    assert not where["student.prefix_tokens"] and model.student.prefix_tokens.shape[1] == 3 + 2  # 3 CLS + 2 registers
    assert any(n.startswith("balancer.") for n in names)


def _heads():
    spec = lambda n, s: SimpleNamespace(name=n, embed_dim=6, summary_dim=5 if s else 0, has_summary=s)
    return AdaptorHeads(8, [spec("clip", True), spec("sam", False)])


def test_unused_head_overflowing_gives_finite_loss_and_zero_gradients():
    torch.manual_seed(0)
    heads = _heads()
    with torch.no_grad():
        heads.spatial["sam"][-1].bias.fill_(float("inf"))  # SAM's head overflows
    out = StudentOutput(summary={"clip": torch.randn(2, 8, requires_grad=True)},
                        patches=torch.randn(2, 8, 3, 3, requires_grad=True))
    preds = heads(out, ["clip"])
    assert set(preds) == {"clip"}
    loss = preds["clip"].summary.square().mean() + preds["clip"].spatial.square().mean()
    assert torch.isfinite(loss)  # 0 x inf would be NaN here
    loss.backward()
    for n, p in heads.spatial["sam"].named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n  # joins the reduction, learns nothing
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters() if p.grad is not None)
    assert torch.count_nonzero(heads.spatial["clip"][0].weight.grad) > 0
    # the unused head ran on one token, not the batch
    seen = []
    heads.spatial["sam"].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    heads(out, ["clip"])
    assert seen == [(1, 8)]


def test_zero_link_is_exactly_zero_with_zero_gradients():
    a = torch.tensor([float("inf"), 1.0], requires_grad=True)
    b = torch.tensor([[float("nan")]], requires_grad=True)
    z = zero_link(a, b)
    assert z.item() == 0.0 and z.shape == ()
    (z * 3 + 1).backward()
    assert torch.equal(a.grad, torch.zeros(2)) and torch.equal(b.grad, torch.zeros(1, 1))


def test_print_config_shows_the_objective_keys():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", "smoke", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reduction: per_teacher" in r.stdout and "schedule: run" in r.stdout
