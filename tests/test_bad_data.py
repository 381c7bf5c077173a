"""Bad data is visible, not only survived: shard-level failures are counted by reason in data/skipped, the counts are
cumulative over the stages and resumes of a run, each bad shard is named once in events.jsonl, and radio-monitor
status shows them."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from radio_scale.data import build_loader, bundled_shards
from radio_scale.data.loader import bad_data_metrics
from radio_scale.data.stream import BAD_DATA_REASONS, SHARD_ERROR_REASONS
from radio_scale.monitoring import rundir
from radio_scale.monitoring.status import collect_status, render_status
from radio_scale.train.data_totals import DataTally, loader_state_counters
from test_data import _write_tar  # one helper to write a shard from (name, bytes) members


def _members(path: str, n: int) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()][:n]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """One shard of each kind of shard-level failure, and a good one."""
    d = tmp_path_factory.mktemp("bad_shards")
    src = bundled_shards("train")[0]
    good = _members(src, 12)  # 12 jpg samples
    out = {"good": _write_tar(d / "good.tar", good)}
    (d / "empty.tar").write_bytes(b"")
    out["empty"] = str(d / "empty.tar")
    (d / "garbage.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out["garbage"] = str(d / "garbage.tar")
    full = _write_tar(d / "full.tar", good[:8])
    with tarfile.open(full) as tf:
        cut = tf.getmembers()[5].offset_data + 20  # inside the 6th member: 5 samples survive
    (d / "truncated.tar").write_bytes(Path(full).read_bytes()[:cut])
    out["truncated"] = str(d / "truncated.tar")
    a, b, c = good[8:11]  # not among the truncated shard's samples
    # a.jpg twice in a row (webdataset used to drop the rest of the shard), then b, then a.jpg again later
    out["duplicates"] = _write_tar(d / "duplicates.tar", [a, (a[0], b[1]), b, c, (a[0], c[1])])
    out["missing"] = str(d / "vanished.tar")
    out["keys"] = {"a": a[0].split(".")[0], "b": b[0].split(".")[0], "c": c[0].split(".")[0]}
    return out


def _one_pass(urls, workers=0):
    return build_loader(list(urls), 32, [], 4, seed=0, num_workers=workers, shuffle_buffer=0, resampled=False)


def test_every_kind_of_shard_failure_is_counted_under_its_own_reason(shards):
    names = ["empty", "garbage", "truncated", "duplicates", "missing"]
    loader = _one_pass([shards[n] for n in names])
    keys = [k for b in loader for k in b.keys]
    s = loader.stats()
    assert s.by_shard == {
        shards["empty"]: {"empty_shard": 1},
        shards["garbage"]: {"not_a_tar": 1},
        shards["truncated"]: {"corrupt_tar": 1},
        shards["duplicates"]: {"duplicate_member": 2},
        shards["missing"]: {"unreadable_shard": 1},
    }
    assert set(s.shard_errors) == set(SHARD_ERROR_REASONS)
    # the members before a cut are kept; a duplicate member is dropped and the first copy kept: keys stay unique
    dup = [k for k in keys if k in shards["keys"].values()]
    assert sorted(dup) == sorted(shards["keys"].values())
    assert len(keys) == len(set(keys)) == 5 + 3


def test_metrics_count_shard_failures_as_skips_by_reason_with_fixed_keys(shards):
    loader = _one_pass([shards["good"], shards["garbage"], shards["missing"]])
    for _ in loader:
        pass
    m = loader.stats().as_metrics()
    assert m["data/skipped"] == 2 and m["data/skipped/not_a_tar"] == 1 and m["data/skipped/unreadable_shard"] == 1
    assert m["data/seen"] == m["data/used"] == 12
    # the trainer all-reduces these values: the same keys in the same order on every rank, whatever it met
    assert list(bad_data_metrics({})) == list(bad_data_metrics(loader.stats().counters()))
    assert [k for k in bad_data_metrics({}) if k.startswith("data/skipped/")] == [f"data/skipped/{r}" for r in BAD_DATA_REASONS]


def _stage(loader) -> SimpleNamespace:
    return SimpleNamespace(loaders={"g": loader})


def _bad_events(run_dir: Path) -> list[dict]:
    return [e for e in rundir.read_events(run_dir) if e["kind"] == "bad_shard"]


def test_counts_carry_over_a_stage_change_and_each_bad_shard_is_named_once(tmp_path, shards):
    run = tmp_path / "run"
    bad = [shards["truncated"], shards["missing"], shards["garbage"]]
    tally = DataTally(run, rank=0, world_size=2, checkpoint_root=run / "checkpoints")
    first = _one_pass([shards["good"], *bad])
    stage1 = _stage(first)
    step = 0
    for _ in first:
        tally.update(stage1, step)
        step += 1
    m1 = tally.update(stage1, step)  # a finite pass reports what came after its last sample at its end
    assert m1["data/skipped"] == 3 and m1["data/seen"] == 12 + 5

    second = _one_pass([shards["good"], shards["missing"]])  # a new stage builds new loaders
    stage2 = _stage(second)
    for _ in second:
        tally.update(stage2, step)
        step += 1
    m2 = tally.update(stage2, step)
    assert m2["data/seen"] == m1["data/seen"] + 12  # cumulative: nothing went back to zero
    assert m2["data/skipped"] == 4 and m2["data/skipped/unreadable_shard"] == 2
    # the carried counts are in the new loader's own state: every later checkpoint holds them
    saved = loader_state_counters(second.state_dict())
    assert (saved["seen"], saved["shard_errors"]) == (m2["data/seen"], {"corrupt_tar": 1, "unreadable_shard": 2,
                                                                         "not_a_tar": 1})

    events = _bad_events(run)
    assert sorted(e["shard"] for e in events) == sorted(bad)  # each once, though `missing` failed in both stages
    assert {e["shard"]: e["reasons"] for e in events}[shards["truncated"]] == {"corrupt_tar": 1}
    assert all(e["rank"] == 0 and "bad data shard" in e["message"] for e in events)

    # another rank meeting the same bad shards names none of them again
    other = DataTally(run, rank=1, world_size=2, checkpoint_root=run / "checkpoints")
    third = _one_pass(bad)
    for _ in third:
        other.update(_stage(third), 0)
    other.update(_stage(third), 0)
    assert len(_bad_events(run)) == 3 and len(os.listdir(run / rundir.BAD_SHARDS_DIR)) == 3


def _checkpoint(root: Path, step: int, rank_states: list[dict]) -> Path:
    path = root / f"step_{step:09d}"
    path.mkdir(parents=True)
    for r, state in enumerate(rank_states):
        torch.save(state, path / f"rank_{r:05d}.pt")
    (path / rundir.CHECKPOINT_COMPLETE).write_text("{}")
    return path


def _drained(urls) -> dict:
    loader = _one_pass(urls)
    for _ in loader:
        pass
    return loader.state_dict()


def test_a_resume_that_cannot_restore_the_streams_carries_the_checkpoints_counts(tmp_path, shards):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    saved0 = _drained([shards["good"], shards["garbage"]])  # rank 0: 12 seen, 1 shard error
    saved1 = _drained([shards["truncated"], shards["empty"]])  # rank 1: 5 seen, 2 shard errors
    _checkpoint(root, 8, [{"stage": 0, "data": {"g": saved0}}, {"stage": 0, "data": {"g": saved1}}])

    # same world size, checkpoint written at a stage end (the next stage starts fresh streams): this rank's own
    fresh = _one_pass([shards["good"]])
    next(fresh)
    m = DataTally(run, 1, 2, root).update(_stage(fresh), 8)
    assert (m["data/seen"], m["data/skipped"], m["data/skipped/empty_shard"]) == (5 + 4, 2, 1)

    # another world size: rank 0 carries every old rank's counts, the others none (the all-reduce sums them)
    fresh = _one_pass([shards["good"]])
    next(fresh)
    assert DataTally(run, 0, 1, root).update(_stage(fresh), 8)["data/seen"] == 12 + 5 + 4
    fresh = _one_pass([shards["good"]])
    next(fresh)
    assert DataTally(run, 2, 3, root).update(_stage(fresh), 8)["data/seen"] == 4

    # streams restored from the checkpoint already hold the counts: nothing is added twice
    restored = build_loader([shards["good"], shards["garbage"]], 32, [], 4, seed=0, num_workers=0, shuffle_buffer=0,
                            resampled=False, position=saved0)
    m = DataTally(run, 0, 2, root).update(_stage(restored), 8)
    assert m["data/seen"] == 12 and m["data/skipped/not_a_tar"] == 1


def test_status_shows_the_data_counters_and_the_bad_shards(tmp_path, capsys):
    run = tmp_path / "run"
    rundir.atomic_write_json(run / rundir.PLAN, {"world_size": 2, "stages": [{"name": "s1", "steps": 10}]})
    rundir.append_jsonl(run / rundir.METRICS, {"step": 3, "stage": 0, **bad_data_metrics(
        {"seen": 40, "used": 38, "skipped": {"undecodable": 2}, "shard_errors": {"corrupt_tar": 1}})})
    for i, url in enumerate(["/d/a.tar", "/d/b.tar"]):
        assert rundir.claim_bad_shard(run, url) and not rundir.claim_bad_shard(run, url)
        rundir.append_event(run, "bad_shard", i, f"bad data shard {url}: corrupt_tar x1", shard=url,
                            reasons={"corrupt_tar": 1}, step=3)
    st = collect_status(run)
    assert st.bad_shard_count == 2 and [b["shard"] for b in st.bad_shards] == ["/d/a.tar", "/d/b.tar"]
    assert st.data["data/skipped"] == 3 and st.data["data/skipped/corrupt_tar"] == 1
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(render_status(st))
    text = console.file.getvalue()
    assert "bad shards" in text and "2, newest: /d/a.tar (corrupt_tar x1); /d/b.tar" in text
    assert "skipped=3" in text and "skipped/undecodable=2" in text and "skipped/empty_shard" not in text
    assert json.loads(json.dumps(st.to_dict(), default=str))["bad_shard_count"] == 2


def test_a_run_counts_bad_data_cumulatively_over_its_stages_and_a_resume(tmp_path, shards):
    """A real one-rank smoke run reading bad shards among good ones, then resumed from its stage-boundary checkpoint."""
    import shutil

    from launch_helpers import FAST, events, metrics, one_node_cluster, run_launch

    from radio_scale.train.data_totals import checkpoint_data_counters

    run = tmp_path / "run"
    bad = [shards["garbage"], shards["empty"], shards["duplicates"]]
    overrides = [*FAST, "tracking.system_metrics=false", "data.shards=" + "::".join(["bundled", *bad])]
    cluster = one_node_cluster(tmp_path, 1)
    r = run_launch(run, overrides, cluster=cluster)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    logged = metrics(run)
    assert [m["step"] for m in logged] == list(range(1, 9))
    assert all(set(bad_data_metrics({})) <= set(m) for m in logged)
    seen = [m["data/seen"] for m in logged]
    skipped = [m["data/skipped"] for m in logged]
    assert all(b > a for a, b in zip(seen, seen[1:]))  # across the stage change at step 4 too
    assert all(b >= a for a, b in zip(skipped, skipped[1:])) and skipped[-1] >= 1
    named = [e["shard"] for e in events(run) if e["kind"] == "bad_shard"]
    assert named and len(named) == len(set(named)) and set(named) <= set(bad)
    final = checkpoint_data_counters(run / "checkpoints" / "step_000000008", 0, 1)
    assert final["seen"] == seen[-1] and sum(final["shard_errors"].values()) + sum(final["skipped"].values()) == skipped[-1]
    st = collect_status(run)
    assert st.bad_shard_count == len(named) and st.data["data/seen"] == seen[-1]

    # resume from the checkpoint written at the end of stage 1: stage 2's loaders start fresh, the counts do not
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"step_{step:09d}")
    shutil.rmtree(run / "export")
    r = run_launch(run, overrides, cluster=cluster)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert checkpoint_data_counters(run / "checkpoints" / "step_000000008", 0, 1) == final
    assert sorted(e["shard"] for e in events(run) if e["kind"] == "bad_shard") == sorted(named)  # none named twice
