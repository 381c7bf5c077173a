"""What a 64-GPU run would hit first (issue 18), each reproduced on this CPU: two gloo ranks, faked SLURM
environments, a tracking server that hangs, tiny teachers. GPU-only parts are in benchmarks/gpu_check.py."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from radio_scale.config import ConfigError, load_config, recipe_names
from radio_scale.distributed import env as dist_env
from radio_scale.distributed.plan import make_plan

WORKER = Path(__file__).parent / "workers" / "cluster_worker.py"


def run_worker(mode: str, out: Path, timeout: int = 600) -> list[dict]:
    """tests/workers/cluster_worker.py on two gloo ranks under torchrun; every rank's JSON report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RADIO_THREADS_PER_RANK="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return [json.loads((out / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)]


# ---------------------------------------------------------------------------------------------- 1. balancers
def test_every_balancer_trains_on_two_ranks_and_uncertainty_weights_move_identically(tmp_path):
    ranks = run_worker("balancers", tmp_path)
    for kind in ("naive", "uncertainty", "adaloss"):
        for rep in ranks:
            assert [s["finite"] for s in rep[kind]["steps"]] == [True] * 3, kind
        # every rank computes the same weights (from the same gathered parameters / reduced statistics)
        assert [s["weights"] for s in ranks[0][kind]["steps"]] == [s["weights"] for s in ranks[1][kind]["steps"]]
    assert all(w == 1.0 for s in ranks[0]["naive"]["steps"] for w in s["weights"].values())
    unc = [s["weights"] for s in ranks[0]["uncertainty"]["steps"]]
    assert unc[0]["clip/summary"] == 1.0 and unc[-1]["clip/summary"] != unc[0]["clip/summary"]  # learned: moved
    assert ranks[0]["uncertainty"]["params"] == ranks[1]["uncertainty"]["params"]  # log_vars equal on both ranks
    assert any(v != 0.0 for v in ranks[0]["uncertainty"]["params"]["log_vars"])
    ada = [s["weights"] for s in ranks[0]["adaloss"]["steps"]]
    assert ada[-1] != ada[0]


# ---------------------------------------------------------------------------------------------- 2. eval in bf16
def test_periodic_evaluation_runs_under_bf16_on_two_ranks(tmp_path):
    ranks = run_worker("eval_bf16", tmp_path)
    assert all(rep["finite"] == [True, True] for rep in ranks)  # training goes on after the evaluation
    (rec,) = ranks[0]["eval"]
    assert rec["step"] == 1
    for t in ("clip", "dino"):
        assert 0.0 <= rec[f"eval/knn/digits/{t}/top1"] <= 1.0
        assert -1.0 <= rec[f"eval/fidelity/{t}/spatial_cosine"] <= 1.0


# ---------------------------------------------------------------------------------------------- 3. rendezvous
TWO_NODES = {"SLURM_JOB_ID": "77001", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu-a[007-008]", "SLURM_NTASKS_PER_NODE": "8"}


def _slurm_env(monkeypatch, **values):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_ARRAY_JOB_ID",
              "SLURM_STEP_NUM_NODES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_a_two_node_slurm_job_meets_at_the_first_host_of_its_node_list(monkeypatch):
    seen = []
    for procid, localid in (("0", "0"), ("9", "1")):
        _slurm_env(monkeypatch, **TWO_NODES, SLURM_PROCID=procid, SLURM_LOCALID=localid)
        dist_env._env_from_slurm()
        seen.append({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "gpu-a007"  # not 127.0.0.1
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]  # every task derives the same port from the job id
    assert (seen[1]["RANK"], seen[1]["WORLD_SIZE"], seen[1]["LOCAL_RANK"]) == ("9", "16", "1")
    # a multi-node job whose node list is missing fails loudly instead of waiting for 127.0.0.1 forever
    _slurm_env(monkeypatch, **{k: v for k, v in TWO_NODES.items() if k != "SLURM_JOB_NODELIST"},
               SLURM_PROCID="3", SLURM_LOCALID="3")
    with pytest.raises(RuntimeError, match="2-node SLURM job without SLURM_JOB_NODELIST"):
        dist_env._env_from_slurm()


def test_slurm_node_lists_expand_like_scontrol_show_hostnames():
    h = dist_env.slurm_hostnames
    assert h("node[01-04],other") == ["node01", "node02", "node03", "node04", "other"]
    assert h("gpu[8-10,12]") == ["gpu8", "gpu9", "gpu10", "gpu12"]
    assert h("rack[1-2]-n[08-09]") == ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert h("login1") == ["login1"]
    for bad in ("node[01-", "node[a-b]", "a,,b"):
        with pytest.raises(ValueError):
            h(bad)


def test_a_task_that_sees_one_gpu_drives_gpu_zero_whatever_its_local_rank():
    assert dist_env.cuda_device_index(5, visible=1) == 0  # srun --gpus-per-task=1
    assert dist_env.cuda_device_index(5, visible=8) == 5  # a task that sees the node's 8 GPUs
    with pytest.raises(RuntimeError, match="local rank 9 but only 8 GPUs are visible"):
        dist_env.cuda_device_index(9, visible=8)


def test_two_faked_slurm_tasks_rendezvous_through_the_node_list(tmp_path):
    code = ("import os, torch, torch.distributed as dist\n"
            "from radio_scale.distributed.env import init_distributed, shutdown\n"
            "env = init_distributed(timeout_s=60, device='cpu')\n"
            "t = torch.ones(1); dist.all_reduce(t)\n"
            "print(env.rank, env.world_size, int(t.item()), os.environ['MASTER_ADDR'])\n"
            "shutdown()\n")
    torch_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in torch_env}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        job = str(s.getsockname()[1])  # the port derives from the job id: any id works
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_JOB_ID": job, "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
                                   "SLURM_JOB_NODELIST": "localhost,127.0.0.2", "SLURM_PROCID": str(r),
                                   "SLURM_LOCALID": "0", "OMP_NUM_THREADS": "1"})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.split() for o, _ in outs) == [["0", "2", "2", "localhost"], ["1", "2", "2", "localhost"]]


# ---------------------------------------------------------------------------------------------- 4. timeouts
def test_every_shipped_recipe_orders_watchdog_timeouts_below_the_collective_timeout():
    for name in recipe_names():
        mon = load_config(name).monitor
        assert max(mon.hang_timeout_s, mon.startup_timeout_s, mon.checkpoint_timeout_s) < mon.collective_timeout_s, name


def test_a_collective_timeout_below_a_watchdog_timeout_is_one_line_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        load_config("two_stage", ["monitor.collective_timeout_s=600"])
    msg = str(err.value)
    assert "\n" not in msg and "monitor.collective_timeout_s" in msg
    assert "monitor.startup_timeout_s=3600" in msg and "monitor.checkpoint_timeout_s=3600" in msg
    assert "monitor.hang_timeout_s" in msg  # 900 >= 600 too
    with pytest.raises(ConfigError, match="monitor.checkpoint_timeout_s=5000"):
        load_config("two_stage", ["monitor.checkpoint_timeout_s=5000"])


def test_teacher_groups_get_the_collective_timeout(tmp_path, monkeypatch):
    import datetime

    import torch.distributed as dist

    made = []
    real = dist.new_group

    def recording(*args, **kwargs):
        made.append(kwargs.get("timeout"))
        return real(*args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "new_group", recording)
        cfg = load_config("smoke")
        make_plan(cfg, 1, 1).build_process_groups(timeout_s=cfg.monitor.collective_timeout_s)
    finally:
        dist.destroy_process_group()
    assert made == [datetime.timedelta(seconds=900)] * 2  # both groups of stage 2, not the backend's 10 min
    # and the trainer's stage builder passes the run's value
    src = (Path(__file__).parents[1] / "radio_scale" / "train" / "stage.py").read_text()
    assert "build_process_groups(timeout_s=cfg.monitor.collective_timeout_s)" in src


# ---------------------------------------------------------------------------------------------- 5. device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a usable GPU")
def test_device_cuda_from_the_cluster_file_refuses_to_start_on_a_rank_without_a_gpu(tmp_path, monkeypatch):
    from radio_scale.config import config_to_yaml
    from radio_scale.launchers.slurm import SlurmRankJob

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(config_to_yaml(load_config("smoke")))
    job = SlurmRankJob(str(config), str(tmp_path / "run"), max_requeues=1, env={}, threads=None, device="cuda")
    with pytest.raises(RuntimeError) as err:
        job()
    msg = str(err.value)
    assert "\n" not in msg and f"rank 0 on {socket.gethostname()}" in msg and "device 'cuda'" in msg


def test_the_cluster_device_travels_with_the_submitted_job(tmp_path, monkeypatch):
    import submitit

    from radio_scale.launchers.cluster import load_cluster
    from radio_scale.launchers.slurm import submit

    made = {}

    class FakeExecutor:
        def __init__(self, folder, max_num_timeout=3, python=None):
            pass

        def update_parameters(self, **params):
            made["params"] = params

        def submit(self, fn):
            made["fn"] = fn
            return "job"

    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    example = Path(__file__).parents[1] / "cluster_configs" / "h100_slurm_example.yaml"
    submit(load_cluster(str(example)), 8, tmp_path / "config.yaml", tmp_path, "two_stage")
    assert made["fn"].device == "cuda"
    # 6. srun gets --cpus-per-task: sbatch's is not inherited by srun on recent SLURM
    assert made["params"]["srun_args"] == ["--cpus-per-task=12"]


# ---------------------------------------------------------------------------------------------- 6. cpus
def test_srun_line_of_the_sbatch_script_carries_cpus_per_task(tmp_path):
    from radio_scale.launchers.cluster import load_cluster
    from radio_scale.launchers.slurm import sbatch_preview

    example = Path(__file__).parents[1] / "cluster_configs" / "h100_slurm_example.yaml"
    text = sbatch_preview(load_cluster(str(example)), 8, "two_stage", tmp_path / "slurm")
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=12" in srun[0].split()
    assert "#SBATCH --cpus-per-task=12" in text


# ---------------------------------------------------------------------------------------------- 7. teachers
def test_every_teacher_family_is_sharded_one_fsdp_unit_per_block(tmp_path):
    ranks = run_worker("teacher_units", tmp_path)
    blocks = {"clip": "model.visual.transformer.resblocks.", "dino": "model.blocks.",
              "sam": "model.image_encoder.blocks."}
    for rep in ranks:
        for name, prefix in blocks.items():
            r = rep[name]
            per_block = [u for u in r["units"] if u.startswith(prefix)]
            assert len(per_block) == 2 and len(r["units"]) == 3, (name, r["units"])  # 2 blocks + the encoder's rest
            assert r["max_abs_diff"] < 1e-6  # the sharded forward computes what the whole teacher computes
            assert r["local_params"] < r["params"]  # this rank holds only its shard of the encoder
    # CLIP's text tower (and its scalar logit_scale) stays whole: only the image tower is sharded
    assert not any("transformer.resblocks" in u and "visual" not in u for u in ranks[0]["clip"]["units"])


def _auto(recipe="two_stage"):
    return load_config(recipe, [f"teachers.{t}.sharding=auto" for t in ("dfn_clip", "openai_clip", "dinov2", "sam")])


def test_auto_teacher_sharding_is_decided_by_memory_and_printed():
    roomy = make_plan(load_config("two_stage"), 64, 1)  # the shipped recipe: every teacher "auto"
    assert all(set(g.teacher_sharding.values()) == {"replicate"} for g in roomy.groups)  # 6.3 GB of teachers fit
    assert all(g.teacher_comm_gb == 0 for g in roomy.groups)
    tight = make_plan(_auto(), 64, 1, memory_limit_gb=12)
    clip_dino = tight.group("clip_dino")
    # too tight to hold every teacher: the largest (DINOv2-g) is sharded first, the rest stay replicated
    assert clip_dino.teacher_sharding == {"dfn_clip": "replicate", "openai_clip": "replicate", "dinov2": "fsdp"}
    assert clip_dino.memory_gb <= 12 and clip_dino.teacher_comm_gb > 0
    table = tight.table()
    assert "dinov2:F" in table and "dfn_clip:R" in table and "gather GB" in table
    assert tight.to_dict()["groups"][0]["teacher_comm_gb"] == pytest.approx(clip_dino.teacher_comm_gb)


def test_planner_counts_sharded_teachers_communication():
    cfg = load_config("two_stage", ["teachers.dinov2.sharding=fsdp", "teachers.sam.sharding=fsdp"])
    fast = make_plan(cfg, 64, 1, interconnect_gbps=400)
    slow = make_plan(cfg, 64, 1, interconnect_gbps=0.5)
    g_fast, g_slow = fast.group("clip_dino"), slow.group("clip_dino")
    # bf16 DINOv2-g encoder gathered once per step: ~2.2 GB, whatever the bandwidth
    assert g_fast.teacher_comm_gb == pytest.approx(g_slow.teacher_comm_gb) and 1.5 < g_fast.teacher_comm_gb < 3
    assert g_slow.teacher_comm_s == pytest.approx(g_fast.teacher_comm_s * 800)
    # hidden behind the teachers' compute at 400 GB/s, it dominates the step at 0.5 GB/s
    assert g_slow.step_time_s > g_fast.step_time_s + 1.0
    assert g_slow.step_flops == pytest.approx(g_fast.step_flops)  # FLOPs are FLOPs


# ---------------------------------------------------------------------------------------------- 8. tracking
@pytest.fixture
def hanging_server():
    """A 'tracking server' on 127.0.0.1 that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    stop, conns = threading.Event(), []

    def accept():
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for c in conns:
        c.close()
    srv.close()


def test_a_tracking_outage_never_stalls_a_step_and_loses_no_step(tmp_path, hanging_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from radio_scale.monitoring.tracking import Tracker, read_metric_history

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(None, tmp_path, "radio_scale", "outage", flush_timeout_s=5)
    run_id = tracker.start()
    store = tracker._client
    tracker._client = MlflowClient(tracking_uri=hanging_server)  # the server goes down
    slowest = 0.0
    for step in range(1, 31):
        t0 = time.perf_counter()
        tracker.log_metrics({"loss": float(step), "lr": 1e-3}, step)
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.2  # a synchronous client would block for its whole timeout (and retries) here
    time.sleep(2.5)
    assert tracker.pending > 0  # nothing dropped: held while the server hangs
    t0 = time.perf_counter()
    assert tracker.flush(timeout_s=1) is False and time.perf_counter() - t0 < 3  # a bounded wait at exit
    tracker._client = store  # the server is back
    assert tracker.end("FINISHED", timeout_s=60) is True
    history = read_metric_history(tracker.uri, run_id, "loss")
    assert history == [(s, float(s)) for s in range(1, 31)]  # every step, in order
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------- 9. shared files
def test_heartbeats_are_written_by_wall_time_with_the_mean_step_time(tmp_path):
    from radio_scale.monitoring.heartbeat import Heartbeat

    mon = load_config("smoke").monitor
    assert (mon.heartbeat_every_s, mon.heartbeat_every) == (5.0, 0)  # by time, not every step
    now = [0.0]
    hb = Heartbeat(tmp_path, rank=3, every=mon.heartbeat_every, every_s=mon.heartbeat_every_s, clock=lambda: now[0])
    written = []
    for step in range(1, 101):  # 0.25 s per step: 25 s
        now[0] += 0.25
        if hb.beat(step, 0, loss=1.0, step_time=0.1 if step % 2 else 0.3, phase="train"):
            written.append(step)
    assert written == [1, 21, 41, 61, 81]  # the first step, then every 5 s: 5 writes instead of 100
    beat = json.loads(hb.path.read_text())
    # straggler detection still sees every step: the mean compute time since the previous write
    assert beat["step"] == 81 and beat["steps_timed"] == 20 and beat["step_time"] == pytest.approx(0.2)
    assert hb.beat(77, 0, phase="checkpoint")  # a phase change is written at once
    assert hb.beat(78, 0, phase="train", force=True)  # as the trainer forces the last step of a stage
    with pytest.raises(ValueError):
        Heartbeat(tmp_path, rank=0, every=0, every_s=0)


def test_only_one_rank_writes_the_requeue_record_when_every_rank_asks_at_once(tmp_path, monkeypatch):
    import stat

    from radio_scale.config import config_to_yaml
    from radio_scale.launchers.slurm import SlurmRankJob
    from radio_scale.monitoring import rundir

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\nsleep 0.2\necho "$@" >> "{log}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for k, v in {"SLURM_JOB_ID": "4343", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_config("smoke")))
    progress_step = rundir.progress_step

    def slow_progress_step(*args, **kwargs):  # 64 ranks' heartbeats on a busy shared disk take a while to read
        time.sleep(0.3)
        return progress_step(*args, **kwargs)

    monkeypatch.setattr(rundir, "progress_step", slow_progress_step)
    jobs = [SlurmRankJob(str(run / "config.yaml"), str(run), max_requeues=5, env={}, threads=None) for _ in range(8)]
    barrier = threading.Barrier(len(jobs))
    answers = []

    def hung(job):  # every rank's watchdog fires at the same moment
        barrier.wait()
        answers.append(job._requeue("rank hung", failure=True))

    threads = [threading.Thread(target=hung, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == len(jobs) and True in answers  # the owner requeued; the others did nothing
    assert log.read_text().splitlines() == ["requeue 4343"]
    state = json.loads((run / rundir.REQUEUES).read_text())
    assert state["count"] == 1 and len(state["history"]) == 1
    assert [e["kind"] for e in rundir.read_events(run)].count("requeue") == 1


# ---------------------------------------------------------------------------------------------- 10. CPE in bf16
@pytest.mark.parametrize("how", ["bf16 grid", "autocast"])
def test_cpe_samples_the_position_grid_at_fp32_positions_under_bf16(how, monkeypatch):
    import torch.nn.functional as F

    import radio_scale.models.cpe as cpe_module
    from radio_scale.models.cpe import CroppedPosEmbed

    grids = []
    real = F.grid_sample

    def recording(inp, grid, *args, **kwargs):
        grids.append((inp.dtype, grid.detach().clone()))
        return real(inp, grid, *args, **kwargs)

    monkeypatch.setattr(cpe_module.F, "grid_sample", recording)
    torch.manual_seed(0)
    ref = CroppedPosEmbed(16, 128).train()
    low = CroppedPosEmbed(16, 128).train()
    low.load_state_dict(ref.state_dict())
    if how == "bf16 grid":
        low.to(torch.bfloat16)  # what FSDP's bf16 parameter policy gathers
    for m in (ref, low):
        m.generator = torch.Generator().manual_seed(7)
    out_ref = ref(27, 27, 4)
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_low = low(27, 27, 4)
    else:
        out_low = low(27, 27, 4)
    (dt_ref, g_ref), (dt_low, g_low) = grids
    assert dt_low == torch.float32 and g_low.dtype == torch.float32  # crop and interpolation in fp32
    assert torch.allclose(g_low, g_ref, atol=1e-6, rtol=0)  # the same positions (bf16 boxes: 1/4-1/2 cell off)
    assert out_low.dtype == low.pos.dtype  # cast at the end
    # the result is the fp32 sampling of the (bf16-valued) grid, cast once
    expect = real(low.pos.float().expand(4, -1, -1, -1), g_ref, mode="bilinear", padding_mode="border",
                  align_corners=False).to(low.pos.dtype)
    assert torch.equal(out_low, expect)
    eval_low = low.eval()(27, 27, 1)
    assert eval_low.dtype == low.pos.dtype


# ---------------------------------------------------------------------------------------------- 11. uint8 views
def test_loader_views_are_uint8_and_normalise_on_the_device_exactly_as_before(tmp_path):
    from radio_scale.data import ViewSpec, build_loader
    from radio_scale.data.views import stack_view_float

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    views = [ViewSpec("clip", 48), ViewSpec("dino", 56, *imagenet), ViewSpec("sam", 96, *imagenet, "longest_pad")]
    loader = build_loader("bundled", 64, views, 8, seed=3, num_workers=0, shuffle_buffer=16,
                          crop_ratio=(0.5, 2.0))
    batch = next(loader)
    assert batch.student.dtype == torch.uint8 and all(v.dtype == torch.uint8 for v in batch.teachers.values())
    norm = batch.normalized(torch.device("cpu"))
    assert norm.student.dtype == torch.float32 and norm.content is batch.content and norm.keys == batch.keys
    # the former host-side float32 views, from the same pixels
    def hwc(x, h=None, w=None):
        return [x[i, :, : (h[i] if h else None), : (w[i] if w else None)].permute(1, 2, 0).numpy()
                for i in range(len(x))]

    assert torch.equal(norm.student, stack_view_float(hwc(batch.student), batch.student_view))
    for v in views[:2]:
        assert torch.equal(norm.teachers[v.name], stack_view_float(hwc(batch.teachers[v.name]), v))
    frac = batch.content["sam"]
    h = [round(float(f) * 96) for f in frac[:, 0]]
    w = [round(float(f) * 96) for f in frac[:, 1]]
    assert any(x < 96 for x in h + w)  # padded samples present
    assert torch.equal(norm.teachers["sam"], stack_view_float(hwc(batch.teachers["sam"], h, w), views[2]))
    assert batch.teachers["sam"].element_size() * 4 == norm.teachers["sam"].element_size()  # 4x fewer bytes
    assert norm.normalized().student is norm.student  # already normalised: unchanged
