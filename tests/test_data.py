"""The training data stream: bad data is skipped and counted, views share geometry, streams are seeded and resumable."""
from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from radio_scale.data import (
    STUDENT_MEAN,
    STUDENT_STD,
    DataError,
    ViewSpec,
    build_loader,
    bundled_shards,
)
from radio_scale.data.views import longest_side_shape

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_VIEWS = [ViewSpec("clip", 32), ViewSpec("sam", 48, IMAGENET_MEAN, IMAGENET_STD, "longest_pad")]


def _members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def train_shards() -> list[str]:
    return bundled_shards("train")


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, train_shards) -> dict:
    """Four shards: one with bad members among 20 good ones, one cut mid-member, one not a tar, one missing."""
    d = tmp_path_factory.mktemp("corrupt")
    good = _members(train_shards[0])[:20]
    jpg = good[0][1]
    bad = [
        ("bad_trunc.jpg", jpg[: len(jpg) // 2]),  # truncated jpg bytes
        ("bad_zero.jpg", b""),  # zero-byte image
        ("bad_nokey.cls", b"3"),  # sample without an image key
        ("bad_text.jpg", b"this is not an image"),  # a non-image payload under an image key
        ("bad_notes.txt", b"hello"),  # a non-image file only
    ]
    mixed = good[:5] + bad[:2] + good[5:12] + bad[2:] + good[12:]
    a = _write_tar(d / "mixed.tar", mixed)
    cut_src = _members(train_shards[1])[:12]
    full = _write_tar(d / "full.tar", cut_src)
    with tarfile.open(full) as tf:
        cut_at = tf.getmembers()[8].offset_data + 50  # inside the 9th member: 8 samples survive
    b = d / "truncated.tar"
    b.write_bytes(Path(full).read_bytes()[:cut_at])
    c = d / "garbage.tar"
    c.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    missing = str(d / "vanished.tar")  # listed, but gone by the time it is read
    return {
        "shards": [a, str(b), str(c), missing],
        "good_keys": {n.split(".")[0] for n, _ in good} | {n.split(".")[0] for n, _ in cut_src[:8]},
        "names": {"mixed": a, "truncated": str(b), "garbage": str(c), "missing": missing},
    }


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same_batches(xs, ys) -> None:
    assert [b.keys for b in xs] == [b.keys for b in ys]
    for x, y in zip(xs, ys):
        assert torch.equal(x.student, y.student)
        for name in x.teachers:
            assert torch.equal(x.teachers[name], y.teachers[name])


# -- bad data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_over_corrupt_shards_uses_every_good_sample_and_counts_every_bad_one(corrupt, workers):
    loader = build_loader(corrupt["shards"], 32, SMALL_VIEWS, 4, seed=0, num_workers=workers, shuffle_buffer=8,
                          resampled=False)
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == sorted(corrupt["good_keys"])  # nothing lost, nothing repeated
    s = loader.stats()
    assert (s.seen, s.used) == (33, 28)
    assert s.skipped == {"undecodable": 2, "empty_image": 1, "missing_image": 2}
    assert s.shard_errors == {"corrupt_tar": 1, "not_a_tar": 1, "unreadable_shard": 1}
    n = corrupt["names"]
    assert s.by_shard == {
        n["mixed"]: {"undecodable": 2, "empty_image": 1, "missing_image": 2},
        n["truncated"]: {"corrupt_tar": 1},
        n["garbage"]: {"not_a_tar": 1},
        n["missing"]: {"unreadable_shard": 1},
    }


def test_a_bad_shard_is_named_once_in_a_warning_and_by_new_bad_shards(corrupt, caplog):
    loader = build_loader(corrupt["shards"], 32, SMALL_VIEWS, 4, seed=0, num_workers=0, shuffle_buffer=0,
                          shards_per_chunk=2, bad_shard_warn_after=3)
    with caplog.at_level(logging.WARNING, logger="radio_scale.data"):
        batches = _take(loader, 40)  # the infinite stream keeps going through the bad shards
    s = loader.stats()
    assert s.seen == s.used + sum(s.skipped.values()) and s.used == 40 * 4
    warnings = [r.getMessage().split()[2] for r in caplog.records if " is bad " in r.getMessage()]
    warned = set(warnings)
    assert len(warnings) == len(warned)  # each shard once
    # a shard-level failure names the shard at once; sample skips only once they reach bad_shard_warn_after
    shard_level = {"unreadable_shard", "empty_shard", "not_a_tar", "corrupt_tar", "duplicate_member"}
    assert {url for url, per in s.by_shard.items() if sum(per.values()) >= 3 or shard_level & set(per)} == warned
    assert {corrupt["names"][k] for k in ("missing", "truncated", "garbage")} <= warned
    assert [url for url, _ in loader.new_bad_shards()] == warnings and loader.new_bad_shards() == []
    assert all(len(b) == 4 for b in batches)


def test_a_wrong_image_key_stops_with_an_error_naming_the_key(train_shards):
    loader = build_loader(train_shards, 32, [], 4, seed=0, num_workers=0, shuffle_buffer=0, image_key="webp")
    with pytest.raises(DataError, match="image keys webp"):
        next(loader)


# -- determinism and resume ------------------------------------------------------------------------


def test_same_seed_same_batches_and_every_rank_and_seed_its_own_stream(train_shards):
    kw = dict(num_workers=0, shuffle_buffer=32, crop_scale=(0.35, 1.0))
    a = _take(build_loader(train_shards, 32, SMALL_VIEWS, 4, seed=1, **kw), 3)
    b = _take(build_loader(train_shards, 32, SMALL_VIEWS, 4, seed=1, **kw), 3)
    _same_batches(a, b)
    other_seed = _take(build_loader(train_shards, 32, SMALL_VIEWS, 4, seed=2, **kw), 3)
    other_rank = _take(build_loader(train_shards, 32, SMALL_VIEWS, 4, seed=1, rank=1, world_size=2, **kw), 3)
    keys = {k for x in a for k in x.keys}
    assert keys != {k for x in other_seed for k in x.keys}
    assert keys != {k for x in other_rank for k in x.keys}


def test_two_workers_serve_two_different_streams(train_shards):
    batches = _take(build_loader(train_shards, 32, SMALL_VIEWS, 8, seed=0, num_workers=2, shuffle_buffer=64), 4)
    assert [b.meta["stream"] for b in batches] == [0, 1, 0, 1]
    assert not set(batches[0].keys) & set(batches[1].keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_exactly_where_it_stopped(corrupt, train_shards, workers):
    shards = corrupt["shards"]  # chunks of 4 draws: the resumed chunk holds failing shards to fast-forward over
    kw = dict(seed=3, num_workers=workers, shuffle_buffer=16, shards_per_chunk=4)
    straight = build_loader(shards, 32, SMALL_VIEWS, 12, **kw)
    reference = _take(straight, 14)
    first = build_loader(shards, 32, SMALL_VIEWS, 12, **kw)
    _same_batches(_take(first, 5), reference[:5])
    position = json.loads(json.dumps(first.state_dict()))  # plain data: any checkpoint format can hold it
    first.close()
    resumed = build_loader(shards, 32, SMALL_VIEWS, 12, position=position, **kw)
    _same_batches(_take(resumed, 9), reference[5:])
    assert resumed.stats() == straight.stats()  # counters neither lost nor counted twice
    assert straight.stats().skipped and straight.stats().shard_errors  # the bad data was on the path


def test_resuming_with_another_worker_count_reseeds_instead_of_replaying(train_shards):
    kw = dict(seed=0, shuffle_buffer=64)
    before = build_loader(train_shards, 32, SMALL_VIEWS, 8, num_workers=2, **kw)
    seen = _take(before, 4)
    position = before.state_dict()
    before.close()
    resumed = build_loader(train_shards, 32, SMALL_VIEWS, 8, num_workers=0, position=position, **kw)
    fresh = build_loader(train_shards, 32, SMALL_VIEWS, 8, num_workers=0, **kw)
    after, start = _take(resumed, 2), _take(fresh, 2)
    assert [b.keys for b in after] != [b.keys for b in start]  # no replay from the start
    assert [b.keys for b in after] == [b.keys for b in _take(
        build_loader(train_shards, 32, SMALL_VIEWS, 8, num_workers=0, position=position, **kw), 2)]
    assert resumed.stats().used == 32 + 16 and resumed.stats().batches == 6
    assert seen[0].keys != after[0].keys


# -- finite passes (evaluation) --------------------------------------------------------------------


def test_finite_passes_split_shards_across_ranks_and_workers_without_overlap(train_shards):
    keys = []
    for rank in range(2):
        loader = build_loader(train_shards, 16, [], 64, seed=0, rank=rank, world_size=2, num_workers=2,
                              shuffle_buffer=0, resampled=False, crop_scale=None)
        keys += [k for b in loader for k in b.keys]
    assert len(keys) == len(set(keys)) == 512


def test_labelled_sets_yield_their_labels(tmp_path):
    shards = bundled_shards("lfw/val")
    loader = build_loader(shards, 32, [], 16, seed=0, num_workers=0, shuffle_buffer=0, resampled=False,
                          crop_scale=None)
    batches = list(loader)
    labels = torch.cat([b.labels for b in batches])
    keys = [k for b in batches for k in b.keys]
    # lfw images 0..99 are faces (label 0), 100..199 are not (label 1); val keeps every 4th
    assert labels.tolist() == [int(int(k[3:]) >= 100) for k in keys]
    assert len(keys) == 50 and list(loader) != []  # a second pass starts over


# -- views -----------------------------------------------------------------------------------------


def _square_shard(tmp_path: Path) -> str:
    members = []
    for i in range(24):
        img = np.zeros((100, 160, 3), dtype=np.uint8)
        x, y = 20 + 4 * i, 10 + 2 * i  # the bright square moves so crops see it at many places
        img[y : y + 40, x : x + 40] = 255
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        members.append((f"sq{i:03d}.png", buf.getvalue()))
    return _write_tar(tmp_path / "squares.tar", members)


def _bright_stats(view: torch.Tensor, mean, std) -> tuple[float, float, float] | None:
    """Centroid (x, y) and area of the bright square, relative to the view's content area."""
    content = (view != 0).any(0)  # zero only in the padding (normalised black is not zero)
    h = int(content.any(1).nonzero().max()) + 1
    w = int(content.any(0).nonzero().max()) + 1
    pix = view[:, :h, :w] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    bright = pix.mean(0) > 0.5
    if bright.sum() < 4:
        return None
    ys, xs = bright.nonzero(as_tuple=True)
    return float((xs.float().mean() + 0.5) / w), float((ys.float().mean() + 0.5) / h), float(bright.float().mean())


def test_student_and_teacher_views_share_one_crop(tmp_path):
    views = [ViewSpec("clip", 48), ViewSpec("dino", 56, IMAGENET_MEAN, IMAGENET_STD),
             ViewSpec("sam", 96, IMAGENET_MEAN, IMAGENET_STD, "longest_pad")]
    loader = build_loader(str(_square_shard(tmp_path)), 64, views, 24, seed=5, num_workers=0, shuffle_buffer=0,
                          crop_scale=(0.2, 1.0), crop_ratio=(0.5, 2.0), resampled=False)
    batch = next(loader).normalized()  # uint8 pixels from the loader, normalised as the trainer does on its device
    checked, positions = 0, []
    for i in range(len(batch)):
        ref = _bright_stats(batch.student[i], STUDENT_MEAN, STUDENT_STD)
        if ref is None:
            continue
        for v in views:
            got = _bright_stats(batch.teachers[v.name][i], v.mean, v.std)
            assert got is not None
            assert abs(got[0] - ref[0]) < 0.03 and abs(got[1] - ref[1]) < 0.03, (v.name, got, ref)
            assert abs(got[2] - ref[2]) < 0.03, (v.name, got, ref)
        positions.append(ref[:2])
        checked += 1
    assert checked >= 12
    assert np.std(np.array(positions), axis=0).min() > 0.05  # crops really differ between samples


def _bright_cells(view: torch.Tensor, mean, std, cell: int) -> torch.Tensor:
    """[B, 1, S/cell, S/cell]: the fraction of bright pixels per cell (a 'feature map' of the square's position)."""
    pix = view * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return F.avg_pool2d((pix.mean(1, keepdim=True) > 0.5).float(), cell)


def _centroids(maps: torch.Tensor) -> torch.Tensor:
    """[B, 2] (x, y) centre of mass of each map, in cells of its own grid, relative to the grid side."""
    b, _, h, w = maps.shape
    m = maps[:, 0] / maps[:, 0].sum((1, 2), keepdim=True).clamp(min=1e-9)
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    return torch.stack([(m.sum(1) * xs).sum(1), (m.sum(2) * ys).sum(1)], 1)


def test_sam_map_cropped_to_content_lines_up_with_the_student_grid(tmp_path):
    """SAM's view is padded; its feature map, cropped to each sample's content, lines up with the student's."""
    from radio_scale.losses import crop_to_content, match_grids

    sam = ViewSpec("sam", 96, IMAGENET_MEAN, IMAGENET_STD, "longest_pad")
    loader = build_loader(str(_square_shard(tmp_path)), 64, [sam], 24, seed=5, num_workers=0, shuffle_buffer=0,
                          crop_scale=(0.2, 1.0), crop_ratio=(0.5, 2.0), resampled=False)
    batch = next(loader).normalized()
    frac = batch.content["sam"]
    # the fractions are the view's real content: bottom/right of it is exact zero padding, inside it is not
    for i in range(len(batch)):
        h, w = round(float(frac[i, 0]) * 96), round(float(frac[i, 1]) * 96)
        x = batch.teachers["sam"][i]
        assert torch.count_nonzero(x[:, h:]) == 0 and torch.count_nonzero(x[:, :, w:]) == 0
        assert torch.count_nonzero(x[:, h - 1, :w]) > 0 and torch.count_nonzero(x[:, :h, w - 1]) > 0
    assert (frac < 0.9).any(1).float().mean() > 0.5  # most crops are far from square
    student = _bright_cells(batch.student, STUDENT_MEAN, STUDENT_STD, 8)  # 8x8 grid, as a patch-8 student
    teacher = _bright_cells(batch.teachers["sam"], IMAGENET_MEAN, IMAGENET_STD, 16)  # 6x6 grid, as SAM's
    visible = (student.flatten(1).sum(1) > 1) & (teacher.flatten(1).sum(1) > 1)
    assert visible.sum() >= 12
    pred, aligned = match_grids(student, crop_to_content(teacher, frac))
    _, raw = match_grids(student, teacher)
    err_aligned = (_centroids(pred) - _centroids(aligned))[visible].abs()
    err_raw = (_centroids(pred) - _centroids(raw))[visible].abs()
    # the square sits at the same student position, up to the coarse grids' rounding at the image border
    # (mean < 1/5 cell of the 8-cell student grid, worst < 1 cell) ...
    assert err_aligned.mean() < 0.025 and err_aligned.max() < 0.1, err_aligned
    # ... and position by position without the crop, it does not (off by a quarter of the image, up to)
    assert err_raw.mean() > 3 * err_aligned.mean() and err_raw.max() > 0.2, err_raw
    assert (pred - aligned)[visible].abs().mean() < 0.8 * (pred - raw)[visible].abs().mean()  # measured 0.069 vs 0.098
    # padded positions never enter: cells that are padding only are never read
    poisoned = teacher.clone()
    for i in range(len(batch)):
        rows, cols = math.ceil(float(frac[i, 0]) * 6 - 1e-4), math.ceil(float(frac[i, 1]) * 6 - 1e-4)
        poisoned[i, :, rows:] = 1e6
        poisoned[i, :, :, cols:] = 1e6
    assert crop_to_content(poisoned, frac).max() < 1e6
    assert crop_to_content(teacher, torch.ones(len(batch), 2)) is teacher  # nothing padded: unchanged


def test_longest_pad_keeps_aspect_and_pads_zeros_after_normalising_like_sam(tmp_path):
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(100, 160), (481, 640), (333, 250), (7, 1000)]:
        assert longest_side_shape(w, h, 1024)[::-1] == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    img = np.full((100, 160, 3), (200, 100, 50), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    shard = _write_tar(tmp_path / "flat.tar", [("flat.png", buf.getvalue())])
    sam = ViewSpec("sam", 64, IMAGENET_MEAN, IMAGENET_STD, "longest_pad")
    raw = next(build_loader(shard, 32, [sam], 1, seed=0, num_workers=0, resampled=False, crop_scale=None))
    assert raw.student.dtype == torch.uint8 and raw.teachers["sam"].dtype == torch.uint8  # pixels cross as uint8
    batch = raw.normalized()
    x = batch.teachers["sam"][0]
    expect = (torch.tensor([200, 100, 50]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, :40, :], expect.view(3, 1, 1).expand(3, 40, 64), atol=1e-5)  # 100x160 -> 40x64
    assert torch.count_nonzero(x[:, 40:, :]) == 0
    student = batch.student[0]
    s_expect = (torch.tensor([200, 100, 50]) / 255.0 - torch.tensor(STUDENT_MEAN)) / torch.tensor(STUDENT_STD)
    assert torch.allclose(student, s_expect.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    assert student.dtype == torch.float32 and student.shape == (3, 32, 32)


def test_bad_loader_arguments_fail_at_build_time_with_one_line(train_shards):
    for kwargs, needle in [
        (dict(batch_size=0), "batch_size"),
        (dict(crop_scale=(0.5, 1.5)), "crop_scale"),
        (dict(shards_per_chunk=0), "data.shards_per_chunk"),
        (dict(rank=2, world_size=2), "rank 2"),
        (dict(teacher_views=[ViewSpec("student", 32)]), "student"),
    ]:
        args = {**dict(shards=train_shards, student_res=32, teacher_views=[], batch_size=4), **kwargs}
        with pytest.raises(DataError, match=needle) as err:
            build_loader(**args)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="resize_mode"):
        ViewSpec("sam", 64, resize_mode="pad")
