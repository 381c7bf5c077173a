"""Safe by default: local runs listen on loopback only, list files cannot smuggle in shell commands, make-shards
never writes a member name that escapes its directory, and exports load without unpickling anything."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

from radio_scale.config import ConfigError, load_config
from radio_scale.data import DataError, build_loader, bundled_shards, resolve_shards
from radio_scale.data.cli import main as radio_data
from radio_scale.launchers.cluster import ClusterConfig
from radio_scale.launchers.local import local_command, local_env, loopback_interface

# -- local runs listen on 127.0.0.1 only --------------------------------------------------------------------


def test_local_command_binds_the_rendezvous_and_the_stores_to_loopback(tmp_path):
    cmd = local_command(2, tmp_path / "config.yaml", tmp_path)
    assert cmd[1:3] == ["-m", "radio_scale.launchers.loopback_torchrun"]
    assert "--standalone" not in cmd  # it would pick a rendezvous endpoint on every interface
    joined = " ".join(cmd)
    assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1" in joined
    assert "--nproc-per-node 2" in joined and "-m radio_scale.train.entry" in joined
    lo = loopback_interface()
    assert lo is not None and local_env(ClusterConfig())["GLOO_SOCKET_IFNAME"] == lo
    # a site that routes gloo elsewhere on purpose keeps its setting
    assert local_env(ClusterConfig(env={"GLOO_SOCKET_IFNAME": "eth9"}))["GLOO_SOCKET_IFNAME"] == "eth9"


def test_dry_run_prints_the_loopback_command():
    r = subprocess.run([sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", "smoke", "--dry-run"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "--rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1" in r.stdout


WORKER = """
import json, os, sys, psutil, torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))
if dist.get_rank() == 0:
    agent = psutil.Process(os.getppid())
    found = {p.pid: sorted({c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
             for p in [agent, *agent.children(recursive=True)]}
    open(sys.argv[1], "w").write(json.dumps(found))
dist.barrier()
dist.destroy_process_group()
"""


def test_a_local_launch_listens_on_nothing_but_loopback(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "listening.json"
    cmd = local_command(2, tmp_path / "config.yaml", tmp_path)
    cmd = cmd[: cmd.index("-m", 3)] + [str(script), str(out)]  # the launcher's own arguments, a probe as the ranks
    env = {**local_env(ClusterConfig(tasks_per_node=2, threads_per_rank=1)), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    found = json.loads(out.read_text())
    addresses = {ip for ips in found.values() for ip in ips}
    assert len(found) == 3 and addresses == {"127.0.0.1"}, found  # torchrun's agent (two stores) and both ranks


# -- pipe: only where the user wrote it ------------------------------------------------------------------------


@pytest.fixture()
def listed(tmp_path) -> dict:
    src = bundled_shards("lfw/val")[0]
    good = tmp_path / "good.txt"
    good.write_text(f"{src}\n")
    evil = tmp_path / "shards.txt"
    evil.write_text(f"# shards\n{src}\n\npipe:cat {src}\n")
    nested = tmp_path / "outer.txt"
    nested.write_text("good.txt\nshards.txt\n")
    return {"src": src, "good": good, "evil": evil, "nested": nested}


def test_pipe_lines_in_list_files_are_refused_naming_the_file_and_line(listed):
    for spec, where in ((listed["evil"], listed["evil"]), (listed["nested"], listed["evil"])):
        with pytest.raises(DataError) as e:
            resolve_shards(str(spec))
        msg = str(e.value)
        assert f"list file {where} line 4 is a 'pipe:' command" in msg and "\n" not in msg
    with pytest.raises(DataError, match="line 4 is a 'pipe:' command"):
        build_loader(str(listed["evil"]), 32, [], 4)
    # what the user wrote is taken as it is; a list file's pipe: lines only behind the explicit flag
    assert resolve_shards(f"pipe:cat {listed['src']}") == [f"pipe:cat {listed['src']}"]
    assert resolve_shards(str(listed["evil"]), allow_pipe_in_lists=True) == [listed["src"], f"pipe:cat {listed['src']}"]
    assert resolve_shards(str(listed["good"])) == [listed["src"]]


def test_the_run_config_refuses_list_pipes_unless_data_allow_pipe_in_lists(listed, capsys):
    assert load_config("smoke").data.allow_pipe_in_lists is False
    assert load_config("smoke", ["data.allow_pipe_in_lists=true"]).data.allow_pipe_in_lists is True
    with pytest.raises(ConfigError, match="data.allow_pipe_in_lists"):
        load_config("smoke", ["data.allow_pipe_in_lists=maybe"])
    assert radio_data(["inspect", str(listed["evil"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 4 is a 'pipe:' command" in err[0]
    assert radio_data(["inspect", str(listed["evil"]), "--allow-pipe-in-lists", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["shards"]) == 2


# -- make-shards writes safe, unique member names -----------------------------------------------------------------


def test_make_shards_sanitises_member_names_and_keeps_keys_unique(tmp_path):
    with tarfile.open(bundled_shards("lfw/val")[0]) as tf:
        pngs = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".png")][:6]
    names = ["../../x", "/etc/y", "x", "sub/../../../z", "ok/nested", "C:/w"]
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in zip(names, pngs):
            info = tarfile.TarInfo(f"{name}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert radio_data(["make-shards", str(src), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    members = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard) as tf:
            members += [m.name for m in tf.getmembers()]
    keys = [m.rsplit(".", 1)[0] for m in members]
    assert len(keys) == len(set(keys)) == 6
    for m in members:
        parts = m.split("/")
        assert not m.startswith("/") and ".." not in parts and "" not in parts and ":" not in m, m
    assert sorted(keys) == sorted(["x", "etc/y", "x_1", "sub/z", "ok/nested", "w"])  # in source order: x, then x_1
    assert manifest["renamed_keys"] == 5 and manifest["total"] == 6
    loader = build_loader(str(tmp_path / "out"), 32, [], 6, num_workers=0, shuffle_buffer=0, resampled=False)
    assert sorted(k for b in loader for k in b.keys) == sorted(keys) and loader.stats().skipped == {}


# -- exports load without pickle ------------------------------------------------------------------------------------


def test_an_export_loads_without_unpickling_anything(tmp_path, monkeypatch):
    from radio_scale.eval.loading import load_student
    from radio_scale.train.export import export_student
    from radio_scale.train.trainer import build_model

    cfg = load_config("smoke")
    model, specs = build_model(cfg)
    out = export_student(model, cfg, specs, tmp_path / "export", is_main=True)

    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without pickle")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    student, heads, cfg2 = load_student(out)
    assert cfg2 == cfg
    key = "patch_embed.weight"
    assert torch.equal(student.state_dict()[key], model.student.state_dict()[key])
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors", "teachers.json"]
