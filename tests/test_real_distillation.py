"""Real knowledge, end to end, through the heterogeneous path: the shipped `distill_effnet_pair` recipe trains
through radio-launch on 2 ranks and distils two real ImageNet teachers at once, EfficientNet-Lite0 in group A
(64 px, the majority of each step's samples) and EfficientNet-Lite2 in group B (128 px, a 4x smaller batch), into
one small ViT; measured on held-out digits (digits/val, never in the distillation data) against each teacher and
against the best constant predictor of that teacher's features.

This is the suite's one long test (about five minutes): a real training run of the shipped recipe, launched
exactly as `benchmarks/real_distillation.py --pair` launches it (two ranks, one core each). The single-teacher
recipe `distill_effnet` is measured by the same benchmark (docs/real_distillation.md).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Measured (docs/real_distillation.md, seeds 0-3, digits/val): Lite0 gains 0.078-0.083 summary / 0.074-0.077
# spatial, k-NN ratio 0.94-0.98; Lite2 (the minority) gains 0.035-0.043 summary but -0.002-0.006 spatial: its 4x4
# map is not learnt beyond the constant at this budget (alone either), so for it the spatial check is that the
# student reaches the constant's level, far above the untrained student. Gains asserted at under half their size.
GAINS = {  # teacher -> (summary, spatial) cosine gain over the constant predictor on digits/val
    "effnet": (0.04, 0.035),
    "effnet2": (0.015, -0.02),
}
KNN_RATIO = 0.85  # Lite0 head: student k-NN top-1 / teacher k-NN top-1 on digits/val
KNN_GAIN = 0.08  # Lite2 head: student k-NN top-1 above the same student untrained (measured 0.13-0.20)


def _benchmark():
    spec = importlib.util.spec_from_file_location("real_distillation", ROOT / "benchmarks" / "real_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Held-out digits measurements, per teacher, of the pair recipe's export, trained here with radio-launch."""
    bench = _benchmark()
    run_dir = tmp_path_factory.mktemp("distill_effnet_pair") / "run"
    proc, _ = bench.launch(run_dir, ["tracking.system_metrics=false"], ranks=2, timeout=900, recipe=bench.PAIR_RECIPE)
    assert proc.returncode == 0, f"radio-launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    results = bench.evaluate(run_dir / "export", sets=("digits",))
    assert sorted(results) == ["effnet", "effnet2"]
    return {teacher: per_set["digits"] for teacher, per_set in results.items()}


@pytest.mark.parametrize("teacher", sorted(GAINS))
def test_both_teachers_of_the_pair_are_learnt_beyond_the_best_constant_on_held_out_digits(digits, teacher):
    r, (summary_gain, spatial_gain) = digits[teacher], GAINS[teacher]
    # the constant: the mean L2-normalised teacher feature over digits/train (the best constant for cosine)
    assert r["student_summary_cos"] - r["constant_summary_cos"] >= summary_gain, r
    assert r["student_spatial_cos"] - r["constant_spatial_cos"] >= spatial_gain, r
    # the measure itself discriminates: the same student untrained is below the constant by at least as much
    assert r["initial_summary_cos"] < r["constant_summary_cos"] - summary_gain, r
    assert r["initial_spatial_cos"] < r["constant_spatial_cos"] - abs(spatial_gain), r
    assert r["teacher_top1"] > 0.85, r  # the real ImageNet weights: far above chance (0.1)


def test_pair_student_knn_stays_near_lite0_and_rises_through_the_minority_head(digits):
    assert digits["effnet"]["top1_ratio"] >= KNN_RATIO, digits["effnet"]
    lite2 = digits["effnet2"]
    assert lite2["student_top1"] >= lite2["initial_top1"] + KNN_GAIN, lite2
