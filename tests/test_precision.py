"""Precision follows `precision` at every world size, and an unused head cannot spoil a step (one real rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path


WORKER = Path(__file__).parent / "workers" / "one_rank_worker.py"


def _run(mode: str, tmp_path: Path) -> dict:
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", RADIO_THREADS_PER_RANK="2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(WORKER), mode, str(out), str(tmp_path / "run")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())


def test_bf16_at_world_size_one(tmp_path):
    rep = _run("bf16", tmp_path)
    # the student's matmuls run in bf16 (one-rank FSDP2 mesh with the bf16 policy), on master weights in fp32
    assert rep["student_compute"] and all(c == ["torch.bfloat16"] * 3 for c in rep["student_compute"])
    assert rep["master_dtypes"] == ["torch.float32"]
    assert rep["finite"] and rep["loss"] > 0
    assert set(rep["teacher_dtypes"].values()) == {"torch.bfloat16"}
    # a blanket bf16 copy of a teacher computes exactly what FSDP2's bf16 parameter policy computes
    eq = rep["teacher_blanket_vs_policy"]
    assert eq["spatial_scale"] > 0
    assert eq["summary_max_abs"] == 0.0 and eq["spatial_max_abs"] == 0.0, eq


def test_overflowing_unused_head_does_not_skip_the_step(tmp_path):
    rep = _run("unused_inf", tmp_path)
    assert rep["finite"] == [True, True]  # today's 0 x inf = NaN would skip both steps
    assert rep["grad_norm"] > 0 and rep["clip_head_moved"] > 0
    assert rep["sam_head_grad_max"] and all(g == 0.0 for g in rep["sam_head_grad_max"])
    # the used head runs on the batch (2 images x 4x4 patches); the unused one on a single token
    assert ("sam", (1, 96)) in [tuple([c[0], tuple(c[1])]) for c in rep["head_inputs"]]
    assert all(c[1][0] == 1 for c in rep["head_inputs"] if c[0] == "sam")
    assert any(c[0] == "clip" and c[1][0] == 2 for c in rep["head_inputs"])
