"""Shard specs, the bundled offline dataset and the radio-data command."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radio_scale.data import DataError, build_loader, bundled_shards, ensure_bundled_data, resolve_shards
from radio_scale.data import bundled
from radio_scale.data.cli import main


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Three real shards (the bundled lfw/val shard under three names) and a list file."""
    d = tmp_path_factory.mktemp("shards")
    src = bundled_shards("lfw/val")[0]
    for i in range(3):
        shutil.copy(src, d / f"part-{i:03d}.tar")
    (d / "list.txt").write_text("# two of them\npart-000.tar\n\n" + str(d / "part-002.tar") + "\n")
    return d


# -- shard specs ---------------------------------------------------------------------------------


def test_resolve_shards_expands_braces_globs_directories_and_list_files(shard_dir):
    parts = [str(shard_dir / f"part-{i:03d}.tar") for i in range(3)]
    assert resolve_shards(str(shard_dir / "part-{000..002}.tar")) == parts
    assert resolve_shards(str(shard_dir / "part-*.tar")) == parts
    assert resolve_shards(str(shard_dir)) == parts
    assert resolve_shards(str(shard_dir / "list.txt")) == [parts[0], parts[2]]
    assert resolve_shards(f"{parts[0]}::{parts[1]}") == parts[:2]
    assert resolve_shards("https://data.example/s-{0..2}.tar") == [f"https://data.example/s-{i}.tar" for i in range(3)]
    assert resolve_shards("pipe:curl -s s3://b/{a,b}.tar") == ["pipe:curl -s s3://b/a.tar", "pipe:curl -s s3://b/b.tar"]
    assert resolve_shards("bundled") == bundled_shards("train") and len(resolve_shards("bundled")) == 4


@pytest.mark.parametrize("spec, needle", [
    ("{d}/part-{{000..004}}.tar", "{d}/part-003.tar (and 1 more of 5)"),
    ("{d}/nothing-*.tar", "no files match {d}/nothing-*.tar"),
    ("{d}/absent.txt", "list file not found: {d}/absent.txt"),
    ("{d}/absent.tar", "shard not found: {d}/absent.tar"),
    ("bundled:imagenet", "bundled set 'imagenet' does not exist"),
])
def test_bad_shard_specs_fail_at_build_time_with_one_line_naming_the_path(shard_dir, tmp_path, spec, needle):
    spec, needle = spec.format(d=shard_dir), needle.format(d=shard_dir)
    with pytest.raises(DataError) as err:
        build_loader(spec, 32, [], 4)
    assert needle in str(err.value) and "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"directory {empty} holds no .tar shards"):
        resolve_shards(str(empty))


def test_pipe_shards_are_read_through_the_command(shard_dir):
    spec = f"pipe:cat {shard_dir}/part-{{000..001}}.tar"
    loader = build_loader(spec, 32, [], 25, num_workers=0, shuffle_buffer=0, resampled=False, crop_scale=None)
    assert sum(len(b) for b in loader) == 100 and loader.stats().shard_errors == {}


# -- the bundled dataset ---------------------------------------------------------------------------


def test_sample_data_writes_real_varied_labelled_sets(tmp_path, capsys):
    root = tmp_path / "bundled"
    assert main(["sample-data", str(root)]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    counts = {name: s["count"] for name, s in manifest["sets"].items()}
    assert counts == {"train": 512, "digits/train": 1437, "digits/val": 360, "lfw/train": 150, "lfw/val": 50}
    assert manifest["sets"]["digits/val"]["labels"] == [str(i) for i in range(10)]
    assert {"astronaut", "chelsea", "coffee", "rocket", "china", "flower"} <= set(manifest["photos"])
    assert main(["inspect", str(root / "train"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["used"] == 512 and report["skipped"] == {}
    assert sum(1 for n in report["sizes"].values() if n) >= 3  # varied sizes
    assert main(["sample-data", str(root)]) == 0 and "already present" in capsys.readouterr().out


def test_concurrent_first_use_builds_the_bundled_data_once_and_atomically(tmp_path, monkeypatch):
    writes, barrier = [], threading.Barrier(2)

    def slow_write(out, progress=None):  # both callers are mid-write at the same time
        out = Path(out)
        out.mkdir(parents=True)
        (out / "train").mkdir()
        barrier.wait(timeout=10)
        (out / "manifest.json").write_text(json.dumps({"version": bundled.BUNDLED_VERSION, "sets": {}}))
        writes.append(out)

    monkeypatch.setattr(bundled, "write_sample_data", slow_write)
    root = tmp_path / "cache" / "bundled"
    results, errors = [], []

    def use():
        try:
            results.append(ensure_bundled_data(root))
        except Exception as exn:  # pragma: no cover - reported below
            errors.append(exn)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [root, root] and len(writes) == 2
    assert sorted(p.name for p in root.parent.iterdir()) == ["bundled"]  # the loser's temp dir is gone
    assert ensure_bundled_data(root) == root  # a complete directory is reused as is


def test_bundled_location_follows_radio_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIO_DATA_DIR", str(tmp_path / "here"))
    assert bundled.default_root() == tmp_path / "here"
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "junk").write_text("x")
    with pytest.raises(DataError, match="holds no manifest.json"):
        ensure_bundled_data()


# -- make-shards / inspect -------------------------------------------------------------------------


def _image_folder(root: Path) -> dict[str, int]:
    import skimage.data

    rng = np.random.default_rng(0)
    photos = {"cats": skimage.data.chelsea(), "coins": np.stack([skimage.data.coins()] * 3, -1)}
    n = {}
    for label, photo in photos.items():
        (root / label).mkdir(parents=True)
        for i in range(5):
            y, x = int(rng.integers(0, 100)), int(rng.integers(0, 100))
            crop = Image.fromarray(photo[y : y + 150, x : x + 200])
            crop.save(root / label / f"img.{i}.{'bmp' if i == 4 else 'jpg'}")  # dots in names, one bmp
        n[label] = 5
    (root / "cats" / "notes.md").write_text("not an image")
    return n


def test_make_shards_from_a_folder_keeps_labels_and_reshards(tmp_path, capsys):
    counts = _image_folder(tmp_path / "src")
    assert main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "4"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total"] == 10 and manifest["labels"] == ["cats", "coins"]
    assert list(manifest["counts"].values()) == [4, 4, 2]
    loader = build_loader(str(tmp_path / "out"), 32, [], 3, num_workers=0, shuffle_buffer=0, resampled=False)
    labels = [int(x) for b in loader for x in b.labels]
    assert loader.stats().skipped == {} and sorted(labels) == [0] * counts["cats"] + [1] * counts["coins"]

    assert main(["make-shards", str(tmp_path / "out"), str(tmp_path / "re"), "--samples-per-shard", "3"]) == 0
    again = json.loads((tmp_path / "re" / "manifest.json").read_text())
    assert again["total"] == 10 and again["labels"] == ["cats", "coins"] and len(again["shards"]) == 4
    assert main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out")]) == 2  # refuses to overwrite
    assert "already holds shards" in capsys.readouterr().err


def test_inspect_reports_bad_samples_by_reason_and_shard(tmp_path, capsys):
    good = bundled_shards("lfw/val")[0]
    with tarfile.open(good) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()][:6]
    members += [("x1.png", b""), ("x2.png", b"\x89PNG garbage"), ("x3.cls", b"1")]
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["inspect", str(bad)]) == 0
    text = capsys.readouterr().out
    assert "samples: 6   usable: 3   skipped: 3" in text
    for reason in ("empty_image", "undecodable", "missing_image"):
        assert reason in text
    assert main(["inspect", str(tmp_path / "nope.tar")]) == 2
    assert "shard not found" in capsys.readouterr().err
