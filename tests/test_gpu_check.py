"""benchmarks/gpu_check.py, the one-GPU acceptance run, cannot rot: its --cpu-dry mode runs every check on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = {"teachers", "precision", "windows", "memory", "balancer", "checkpoint", "eval", "export", "loader",
          "deepspeed", "eradio"}


def test_gpu_check_cpu_dry_runs_every_check_and_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry", "--json", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    checks = data["checks"]
    assert set(checks) == CHECKS and all(c["ok"] for c in checks.values()), checks
    assert "gpu_check: PASS" in r.stdout
    # the same code a GPU runs: bf16 compute in every student Linear under fully_shard, fp32 master weights
    assert checks["precision"]["compute_dtype"] == "torch.bfloat16" and checks["precision"]["fsdp_units"] > 1
    assert checks["precision"]["master_dtypes"] == ["torch.float32"]
    # three windows timed with the student's attention on fused kernels only; every teacher compared to fp32
    assert set(checks["windows"]["windows"]) == {"0", "2", "3"}
    assert set(checks["teachers"]["teachers"]) == {"dfn_clip", "openai_clip", "dinov2", "sam"}
    assert checks["checkpoint"]["restored_exactly"] and checks["checkpoint"]["moved_after_save"]
    assert checks["balancer"]["balancer"] == "UncertaintyBalancer"
    assert checks["memory"]["plan_estimate_gb"] > 0
    # E-RADIO rows (tiny presets in the dry run, eradio_b / eradio_l on a GPU): train and eval throughput, bf16
    rows = checks["eradio"]["students"]
    assert set(rows) == {"eradio_pico", "eradio_pico_noup"}
    assert all(r["dtype"] == "bf16" and r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["gflops_per_img"] > 0
               for r in rows.values())
    assert "| eradio | PASS |" in r.stdout
    # the DeepSpeed backend through the same acceptance steps: ZeRO-2, its checkpoint restored exactly, the export
    ds = checks["deepspeed"]
    assert ds["zero_stage"] == 2 and set(ds["windows"]) == {"0", "2", "3"}
    assert ds["checkpoint"]["restored_exactly"] and ds["export"]["ok"]


def test_gpu_check_knows_the_dense_bf16_peak_of_each_card():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    tflops = {n: gpu_check.card_peak(n) / 1e12 for n in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H200 NVL",
        "NVIDIA GH200 480GB")}
    assert tflops == {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 NVL": 835, "NVIDIA H100 PCIe": 756,
                      "NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989}
    assert gpu_check.card_peak("Some Other GPU") is None
