"""Distillation losses and loss balancers, checked against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from radio_scale.config.schema import LossConfig, TeacherConfig
from radio_scale.losses import (
    AdaLossBalancer,
    NaiveBalancer,
    UncertaintyBalancer,
    build_balancer,
    cosine_distance,
    spatial_loss,
    summary_loss,
    term_weights,
)


def test_summary_loss_is_one_minus_cosine_per_sample():
    pred = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 0.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, 5.0], [1.0, 1.0], [1.0, math.sqrt(3.0)], [-1.0, 0.0]])
    # orthogonal: 1 - 0; parallel (any length): 1 - 1; 60 degrees: 1 - 0.5; opposite: 1 - (-1)
    torch.testing.assert_close(summary_loss(pred, target), torch.tensor([1.0, 0.0, 0.5, 2.0]))


def test_spatial_loss_equals_the_hand_computed_mix_of_cosine_and_smooth_l1():
    # One sample, 2 channels, a 1 x 2 grid.
    pred = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # positions: (1, 0) and (3, 0)
    target = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # positions: (0, 1) and (1, 0)
    # cosine distance: position 1 orthogonal -> 1, position 2 parallel -> 0; mean = 0.5
    # smooth-L1 (beta 1) per element: |d| = 1, 1 (position 1) -> 0.5 * 1^2 = 0.5 each;
    #   |d| = 2, 0 (position 2) -> 2 - 0.5 = 1.5 and 0; mean over 4 elements = 2.5 / 4 = 0.625
    # total = 0.9 * 0.5 + 0.1 * 0.625 = 0.5125
    torch.testing.assert_close(spatial_loss(pred, target), torch.tensor([0.5125]))
    # other mixes weigh the same two parts: 0.5 * 0.5 + 2 * 0.625 = 1.5
    torch.testing.assert_close(spatial_loss(pred, target, alpha=0.5, beta=2.0), torch.tensor([1.5]))


def test_losses_are_per_sample():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    batch = spatial_loss(pred, target)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], spatial_loss(pred[i : i + 1], target[i : i + 1]))
    assert batch.shape == (3,) and len(set(batch.tolist())) == 3
    torch.testing.assert_close(cosine_distance(pred, target), 1 - F.cosine_similarity(pred, target, dim=1).mean((1, 2)))


def test_spatial_loss_upsamples_the_smaller_grid_to_the_larger():
    torch.manual_seed(0)
    small, large = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 6, 6)
    up = F.interpolate(small, size=(6, 6), mode="bilinear", align_corners=False)
    down = F.interpolate(large, size=(3, 3), mode="bilinear", align_corners=False)
    # the student's grid smaller than the teacher's: the student's prediction is upsampled
    torch.testing.assert_close(spatial_loss(small, large), spatial_loss(up, large))
    # the teacher's grid smaller: the teacher's features are upsampled
    torch.testing.assert_close(spatial_loss(large, small), spatial_loss(large, up))
    assert (spatial_loss(small, large) - spatial_loss(small, down)).abs().min() > 1e-3


def test_spatial_loss_resizes_both_grids_when_neither_dominates():
    torch.manual_seed(0)
    tall, wide = torch.randn(1, 4, 6, 2), torch.randn(1, 4, 2, 6)

    def up(x):
        return F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)

    torch.testing.assert_close(spatial_loss(tall, wide), spatial_loss(up(tall), up(wide)))


def test_loss_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"pred \[2, 4\] vs target \[2, 5\]"):
        summary_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="equal B and C"):
        spatial_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 6, 3, 3))


def test_term_weights_come_from_teacher_configs_and_skip_missing_summaries():
    teachers = [
        TeacherConfig(name="clip", family="open_clip", model="ViT-B-16", summary_weight=1.0, spatial_weight=0.5),
        TeacherConfig(name="sam", family="sam", model="vit_b", summary_weight=0.0, spatial_weight=2.0),
    ]
    weights = term_weights(teachers, {"clip": True, "sam": False})
    assert weights == {"clip/summary": 1.0, "clip/spatial": 0.5, "sam/spatial": 2.0}


TERMS = {"clip/summary": 1.0, "clip/spatial": 1.0, "dino/spatial": 0.5, "sam/summary": 0.0}


def test_naive_balancer_is_the_static_weighted_sum():
    bal = NaiveBalancer(TERMS)
    values = {"clip/summary": torch.tensor(0.4), "dino/spatial": torch.tensor(2.0), "sam/summary": torch.tensor(9.0)}
    out = bal(values)
    # 1.0 * 0.4 + 0.5 * 2.0 + 0.0 * 9.0 (clip/spatial is absent this step)
    torch.testing.assert_close(out.total, torch.tensor(1.4))
    assert {k: float(v) for k, v in out.weights.items()} == TERMS
    with pytest.raises(ValueError, match="unknown term 'eva/spatial'"):
        bal({"eva/spatial": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="term 'clip/summary' must be a scalar"):
        bal({"clip/summary": torch.ones(3)})


def test_uncertainty_balancer_learns_to_down_weight_a_persistently_larger_term():
    bal = UncertaintyBalancer(["big", "small"])
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    losses = {"big": torch.tensor(4.0), "small": torch.tensor(0.25)}
    out = bal(losses)
    # s = 0: total = (e^0 * 4 + 0) + (e^0 * 0.25 + 0); d/ds (e^-s L + s) = 1 - L -> -3 and +0.75
    torch.testing.assert_close(out.total, torch.tensor(4.25))
    out.total.backward()
    torch.testing.assert_close(bal.log_vars.grad, torch.tensor([-3.0, 0.75]))
    opt.step()
    torch.testing.assert_close(bal.log_vars.detach(), torch.tensor([0.3, -0.075]))
    for group in opt.param_groups:
        group["lr"] = 0.5
    for _ in range(60):
        opt.zero_grad()
        bal(losses).total.backward()
        opt.step()
    # the optimum is exp(s) = L: weights -> 1 / L
    torch.testing.assert_close(bal.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), rtol=0, atol=1e-3)
    w = bal(losses).weights
    assert w["big"] < 1.0 < w["small"]


def test_uncertainty_balancer_gives_absent_terms_a_zero_gradient():
    bal = UncertaintyBalancer({"a": 1.0, "b": 2.0})
    bal({"a": torch.tensor(3.0)}).total.backward()
    assert bal.log_vars.grad[1].item() == 0.0 and bal.log_vars.grad[0].item() == pytest.approx(-2.0)


def test_adaloss_weights_are_inverse_running_means_normalised_to_the_term_count():
    bal = AdaLossBalancer({"a": 1.0, "b": 1.0, "off": 0.0}, momentum=0.9)
    values = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)}
    out = bal(values)  # no statistics yet: every active term weighs 1
    torch.testing.assert_close(out.total, torch.tensor(2.0))
    bal.update({"a": 4.0, "b": 1.0})
    w = bal(values).weights
    # inverse means 1/4 and 1/1, normalised to sum to 2 active terms: 2 * 0.25 / 1.25 = 0.4 and 1.6
    assert (float(w["a"]), float(w["b"]), float(w["off"])) == pytest.approx((0.4, 1.6, 0.0))
    bal.update({"a": 2.0})  # EMA: 0.9 * 4 + 0.1 * 2 = 3.8
    w = bal(values).weights
    assert float(w["a"]) == pytest.approx(2 * (1 / 3.8) / (1 / 3.8 + 1.0))
    bal.update({"a": float("nan")})  # a diverged step is skipped
    assert float(bal(values).weights["a"]) == pytest.approx(2 * (1 / 3.8) / (1 / 3.8 + 1.0))
    out = bal(values)
    out.total.backward()
    # no gradient flows into the weights; the terms get exactly their weights
    assert all(not v.requires_grad for v in out.weights.values())
    assert values["a"].grad.item() == pytest.approx(float(out.weights["a"]))


def test_adaloss_forward_leaves_the_statistics_to_update():
    bal = AdaLossBalancer(["a", "b"])
    bal.update({"a": 2.0, "b": 8.0})
    before = {k: v.clone() for k, v in bal.state_dict().items()}
    for _ in range(3):
        bal({"a": torch.tensor(100.0), "b": torch.tensor(0.01)})
    for k, v in bal.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["uncertainty", "adaloss"])
def test_balancer_state_dict_round_trip(kind):
    cfg = LossConfig(balancer=kind, adaloss_momentum=0.5)
    bal = build_balancer(cfg, TERMS)
    values = {"clip/summary": torch.tensor(0.3), "clip/spatial": torch.tensor(1.2), "dino/spatial": torch.tensor(5.0)}
    if kind == "uncertainty":
        opt = torch.optim.SGD(bal.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            bal(values).total.backward()
            opt.step()
    else:
        for step in range(3):
            bal.update({k: float(v) * (step + 1) for k, v in values.items()})
    fresh = build_balancer(cfg, TERMS)
    assert bal(values).total.item() != pytest.approx(fresh(values).total.item())
    fresh.load_state_dict(bal.state_dict())
    torch.testing.assert_close(fresh(values).total, bal(values).total)
    for k, w in bal(values).weights.items():
        torch.testing.assert_close(fresh(values).weights[k], w)


def test_build_balancer_follows_the_loss_config():
    assert isinstance(build_balancer(LossConfig(), TERMS), NaiveBalancer)
    assert isinstance(build_balancer(LossConfig(balancer="uncertainty"), TERMS), UncertaintyBalancer)
    ada = build_balancer(LossConfig(balancer="adaloss", adaloss_momentum=0.9), TERMS)
    assert isinstance(ada, AdaLossBalancer) and ada.momentum == 0.9
    with pytest.raises(ValueError, match="loss.adaloss_momentum"):
        build_balancer(LossConfig(balancer="adaloss", adaloss_momentum=1.5), TERMS)
    with pytest.raises(ValueError, match="static weight of term 'x'"):
        build_balancer(LossConfig(), {"x": -1.0})


def test_weighting_gives_differentiable_weights_and_the_regulariser_for_a_distributed_sum():
    bal = UncertaintyBalancer({"a": 1.0, "b": 2.0})
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.5, -1.0]))
    w, reg = bal.weighting()
    torch.testing.assert_close(w.detach(), torch.tensor([math.exp(-0.5), 2 * math.exp(1.0)]))
    torch.testing.assert_close(reg.detach(), torch.tensor(1.0 * 0.5 + 2.0 * -1.0))
    # weight x term + regulariser reproduces forward() when every term is present
    la, lb = torch.tensor(3.0), torch.tensor(0.5)
    torch.testing.assert_close(w[0] * la + w[1] * lb + reg, bal({"a": la, "b": lb}).total)
    assert w.requires_grad and reg.requires_grad
    w, reg = NaiveBalancer({"a": 1.0, "b": 0.5}).weighting()
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5]))
    assert reg.item() == 0.0
