"""Real knowledge, end to end: the shipped `distill_effnet` recipe trains through radio-launch and distils the
real ImageNet EfficientNet-Lite0 into a small ViT; measured on held-out digits (digits/val, never in the
distillation data) against the teacher and against the best constant predictor.

This is the suite's one long test (about five minutes): a real training run of the shipped recipe, launched
exactly as `benchmarks/real_distillation.py` launches it (one rank, the machine's cores as its threads).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Measured (docs/real_distillation.md, seeds 0-2): summary gain 0.088-0.091, spatial gain 0.084-0.085,
# k-NN ratio 0.963-0.985. The gains are asserted at under half their measured size; the k-NN ratio at the
# project's goal. (On digits an untrained student's k-NN is already close to the teacher's: the cosine gains
# are what show the transfer; see the docs.)
SUMMARY_GAIN = 0.04  # student summary cosine - constant predictor's, on digits/val
SPATIAL_GAIN = 0.035  # the same for the spatial map
KNN_RATIO = 0.9  # student k-NN top-1 / teacher k-NN top-1 on digits/val


def _benchmark():
    spec = importlib.util.spec_from_file_location("real_distillation", ROOT / "benchmarks" / "real_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Held-out digits measurements of the shipped recipe's export, trained here with radio-launch."""
    bench = _benchmark()
    run_dir = tmp_path_factory.mktemp("distill_effnet") / "run"
    proc, _ = bench.launch(run_dir, ["tracking.system_metrics=false"], ranks=1, timeout=900)
    assert proc.returncode == 0, f"radio-launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return bench.evaluate(run_dir / "export", sets=("digits",))["digits"]


def test_distilled_student_beats_the_best_constant_predictor_on_held_out_digits(digits):
    # the constant: the mean L2-normalised teacher feature over digits/train (the best constant for cosine)
    assert digits["student_summary_cos"] - digits["constant_summary_cos"] >= SUMMARY_GAIN, digits
    assert digits["student_spatial_cos"] - digits["constant_spatial_cos"] >= SPATIAL_GAIN, digits
    # the measure itself discriminates: the same student untrained is far below the constant
    assert digits["initial_summary_cos"] < digits["constant_summary_cos"] - SUMMARY_GAIN, digits
    assert digits["initial_spatial_cos"] < digits["constant_spatial_cos"] - SPATIAL_GAIN, digits


def test_distilled_student_knn_reaches_ninety_percent_of_the_teacher_on_held_out_digits(digits):
    assert digits["teacher_top1"] > 0.85, digits  # the real ImageNet weights: far above chance (0.1)
    assert digits["top1_ratio"] >= KNN_RATIO, digits
