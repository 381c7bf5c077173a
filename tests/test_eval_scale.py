"""Evaluation at dataset scale: streamed splits, exact chunked k-NN, bad data, many processes (accelerate)."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radio_scale.eval.knn import extract_features, knn_classify, knn_scores

WORKER = Path(__file__).parent / "workers" / "eval_scale_worker.py"


def _encoder(seed: int = 0, dim: int = 48):
    """A fixed, cheap image encoder (pooled pixels through a random projection): the k-NN under test, not a model."""
    W = torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(seed))
    return lambda x: F.adaptive_avg_pool2d(x.float(), 8).flatten(1) @ W


def _state():
    from radio_scale.eval.scale import process_state

    return process_state("cpu")


# ------------------------------------------------------------------ exact streaming k-NN

def test_streaming_topk_equals_in_memory_knn_votes_for_any_batching_with_ties():
    from radio_scale.eval.scale import StreamingTopK

    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 16, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)
    test = torch.randn(60, 16, generator=g)
    ref = knn_scores(train, labels, test, k=20, T=0.07, num_classes=7)
    # exact duplicates with different labels: ties at the k-th neighbour, broken by the smaller id
    dup_train = train.clone()
    dup_train[100:130] = train[5]
    dup_test = torch.cat([test, train[5:6], train[5:6] + 1e-3])
    sim = F.normalize(dup_test, dim=1) @ F.normalize(dup_train, dim=1).T
    top = sim.argsort(dim=1, descending=True, stable=True)[:, :20]  # stable: equal cosines keep id order
    dup_ref = torch.zeros(len(dup_test), 7, dtype=torch.float64).scatter_add_(
        1, labels[top], (sim.gather(1, top).double() / 0.07).exp())
    for sizes in ([500], [64] * 8, [1, 13, 7, 200, 279], [3] * 167):
        cases = [(train, test, ref)]
        if len(sizes) == 1:  # ties are exact only within one matmul (float32 rounding differs between shapes)
            cases.append((dup_train, dup_test, dup_ref))
        for feats, queries, expected in cases:
            bank, start = StreamingTopK(queries, k=20, test_chunk=17), 0
            for n in sizes:
                n = min(n, 500 - start)
                bank.add(feats[start:start + n], labels[start:start + n], torch.arange(start, start + n))
                start += n
            assert start == 500 and bank.seen == 500
            # the same neighbours (cosines differ from the one-matmul ones by float32 rounding only)
            want = (F.normalize(queries, dim=1) @ F.normalize(feats, dim=1).T).argsort(dim=1, descending=True,
                                                                                     stable=True)[:, :20]
            assert torch.equal(bank.ids.sort(dim=1).values, want.sort(dim=1).values)
            torch.testing.assert_close(bank.scores(0.07, 7), expected, rtol=1e-5, atol=0)
    # fewer training points than k: every one votes
    small = StreamingTopK(test[:3], k=20)
    small.add(train[:5], labels[:5], torch.arange(5))
    torch.testing.assert_close(small.scores(0.07, 7), knn_scores(train[:5], labels[:5], test[:3], 20, 0.07, 7),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["digits", "lfw"])
def test_streaming_knn_equals_in_memory_knn_on_the_bundled_sets(name):
    from radio_scale.eval.datasets import batches, classification_set
    from radio_scale.eval.scale import knn_streaming
    from radio_scale.eval.streams import classification_splits

    enc = _encoder()
    d = classification_set(name)
    ftr, _ = extract_features(enc, batches(d.train_images, d.train_labels))
    fte, _ = extract_features(enc, batches(d.test_images, d.test_labels))
    expected = knn_classify(ftr, d.train_labels, fte, d.test_labels, 20, 0.07, d.num_classes)
    train, val, _ = classification_splits(name)
    for batch_size in (64, 50):
        got = knn_streaming({"e": enc}, train, val, _state(), k=20, T=0.07, batch_size=batch_size)["e"]
        assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])
        assert got["n_train"] == len(d.train_labels) and got["n_val"] == len(d.test_labels) and got["skipped"] == 0
    assert 0.5 < expected["top1"] <= 1.0


# ------------------------------------------------------------------ the same images in the formats people have

def _save_png(img: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_class_folders(root: Path, images, labels, classnames):
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / classnames[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:05d}.png").write_bytes(_save_png(img))


def _write_shards(root: Path, images, labels, per_shard: int, prefix: str = "part"):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(root / f"{prefix}-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                for ext, data in (("png", _save_png(images[i])), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_class_folders_and_wds_shards_stream_the_same_knn_as_the_bundled_set(tmp_path):
    from radio_scale.eval.datasets import classification_set
    from radio_scale.eval.scale import knn_streaming
    from radio_scale.eval.streams import FolderSplit, ShardSplit, classification_splits

    d = classification_set("lfw")
    names = ["face", "non_face"]
    for split, x, y in (("train", d.train_images, d.train_labels), ("val", d.test_images, d.test_labels)):
        _write_class_folders(tmp_path / "folders" / split, x, y, names)
        _write_shards(tmp_path / "shards" / split, x, y, per_shard=37)
    enc = _encoder(1)
    ref = knn_streaming({"e": enc}, *classification_splits("lfw")[:2], _state())["e"]
    tr, va, name = classification_splits(str(tmp_path / "folders"))
    assert isinstance(tr, FolderSplit) and name == "folders" and tr.classnames == ["face", "non face"]
    assert knn_streaming({"e": enc}, tr, va, _state())["e"] == ref
    tr, va, _ = classification_splits(None, str(tmp_path / "shards" / "train" / "part-{000000..000004}.tar"),
                                      str(tmp_path / "shards" / "val"))
    assert isinstance(tr, ShardSplit) and len(tr.urls) == 5
    assert knn_streaming({"e": enc}, tr, va, _state(), batch_size=16)["e"] == ref
    assert knn_streaming({"e": enc}, tr, va, _state(), batch_size=16, num_workers=2)["e"] == ref  # decoding workers
    # --image-size: resize + centre crop, every image the same side
    tr, va, _ = classification_splits(str(tmp_path / "folders"), image_size=32)
    b = next(iter(va.read(va.units(1, 8)[0], 8)))
    assert b.images.shape == (8, 3, 32, 32) and 0 <= b.images.min() and b.images.max() <= 1


def test_bad_or_missing_files_are_counted_skips_or_one_line_errors(tmp_path):
    from radio_scale.eval.datasets import classification_set
    from radio_scale.eval.scale import extract
    from radio_scale.eval.streams import ShardSplit, classification_splits

    d = classification_set("lfw")
    x, y = d.test_images[:20], d.test_labels[:20]
    folder = tmp_path / "folder" / "val"
    _write_class_folders(folder, x, y, ["face", "non_face"])
    _write_class_folders(tmp_path / "folder" / "train", x, y, ["face", "non_face"])
    (folder / "face" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "face" / "empty.png").write_bytes(b"")
    _, va, _ = classification_splits(str(tmp_path / "folder"))
    ids, feats, labels, skipped = extract({"e": _encoder()}, va, _state())
    assert len(ids) == 20 and skipped == {"undecodable": 2}

    shards = tmp_path / "shards"
    _write_shards(shards, x, y, per_shard=10)
    with tarfile.open(shards / "extra-000000.tar", "w") as tar:  # a sample per failure mode
        for key, members in (("nolabel", {"png": _save_png(x[0])}), ("badlabel", {"png": _save_png(x[0]), "cls": b"x"}),
                             ("noimage", {"cls": b"1"}), ("broken", {"jpg": b"garbage", "cls": b"0"}),
                             ("good", {"png": _save_png(x[1]), "cls": b"1"})):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = (shards / "part-000001.tar").read_bytes()
    (shards / "part-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut short mid-member
    (shards / "notatar.tar").write_bytes(b"\0garbage" * 100)

    split = ShardSplit(str(shards / "*.tar"), classnames=["face", "non_face"])
    ids, _, _, skipped = extract({"e": _encoder()}, split, _state())
    assert skipped["no_label"] == 1 and skipped["bad_label"] == 1 and skipped["no_image"] == 1
    assert skipped["undecodable"] == 1 and skipped["bad_shard"] >= 1
    assert 10 + 1 <= len(ids) < 20 + 1  # the good shard, the good extra sample, the head of the cut shard

    for bad, match in ((tmp_path / "nowhere", "not a bundled set"), (tmp_path / "folder" / "val" / "face", "missing 'train/'")):
        with pytest.raises(FileNotFoundError, match=match) as e:
            classification_splits(str(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ShardSplit(str(tmp_path / "none-*.tar"))


# ------------------------------------------------------------------ bounded memory

def test_peak_memory_of_the_streamed_knn_does_not_grow_with_the_training_split(tmp_path):
    """Peak RSS on a synthetic set 10x the bundled digits (14,370 training images) vs the bundled size itself."""
    from radio_scale.eval.datasets import classification_set

    d = classification_set("digits")
    x, y = d.train_images, d.train_labels
    _write_shards(tmp_path / "x1", x, y, per_shard=500)
    big = tmp_path / "x10"
    for r in range(10):  # 10 copies, each shifted by one pixel so that they are different images
        _write_shards(big, torch.roll(x, shifts=r, dims=-1), y, per_shard=500, prefix=f"rep{r}")
    val = tmp_path / "val"
    _write_shards(val, d.test_images, d.test_labels, per_shard=500)
    peaks = {}
    for name in ("x1", "x10"):
        out = subprocess.run([sys.executable, str(WORKER), "rss", str(tmp_path / name), str(val)],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["x10"]["n_train"] == 10 * peaks["x1"]["n_train"] == 14370
    # holding the 10x bank in memory would take 14,370 x 3 x 64 x 64 x 4 bytes = 706 MB of pixels alone
    grow = peaks["x10"]["peak_rss_mb"] - peaks["x1"]["peak_rss_mb"]
    print(f"peak RSS: 1x {peaks['x1']['peak_rss_mb']:.0f} MB, 10x {peaks['x10']['peak_rss_mb']:.0f} MB "
          f"({peaks['x10']['seconds']:.1f} s for {peaks['x10']['n_train'] + peaks['x10']['n_val']:.0f} images)")
    assert grow < 40, peaks


# ------------------------------------------------------------------ many processes (accelerate, gloo on CPU)

def test_two_processes_give_the_same_knn_zeroshot_and_miou_as_one(tmp_path):
    from radio_scale.eval.fixtures import write_ade20k_tree

    write_ade20k_tree(tmp_path / "fix" / "ade", n_train=16, n_val=10, size=64)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    results = {}
    for n in (1, 2):
        out_file = tmp_path / f"world{n}.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", "0", "--num_cpu_threads_per_process", "1"]
        cmd += ["--multi_gpu"] if n > 1 else ["--cpu"]
        cmd += [str(WORKER), "world", str(out_file), str(tmp_path / "fix")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = json.loads(out_file.read_text())
    assert results[2]["processes"] == 2 and results[1]["processes"] == 1
    assert results[2]["per_process_val"] != [results[2]["n_val"], 0]  # the work really was split
    for key in ("knn", "zeroshot", "miou"):
        assert results[2][key] == results[1][key], key
    assert results[1]["knn"]["n_val"] == 360 and results[1]["zeroshot"]["n_val"] == 360
    assert results[1]["miou"]["n_val"] == 10 and 0 < results[1]["miou"]["miou"] <= 1


# ------------------------------------------------------------------ ADE20K / VOC / COCO readers

def test_ade20k_and_voc_readers_map_ignore_labels_and_class_counts(tmp_path):
    from PIL import Image

    from radio_scale.eval.fixtures import write_ade20k_tree, write_voc_tree
    from radio_scale.eval.segdata import ADE20K_CLASSES, VOC_CLASSES, seg_kind, seg_splits

    ade = write_ade20k_tree(tmp_path / "ade", n_train=4, n_val=3)
    voc = write_voc_tree(tmp_path / "voc", n_train=4, n_val=3)
    for spec, kind in ((tmp_path / "ade", "ade20k"), (ade, "ade20k"), (tmp_path / "voc", "voc"),
                       (tmp_path / "voc" / "VOCdevkit", "voc"), (voc, "voc")):
        assert seg_kind(str(spec)) == kind
    tr, va, name = seg_splits(str(tmp_path / "ade"), size=48)
    assert name == "ade20k" and len(tr) == 4 and len(va) == 3 and va.classnames == list(ADE20K_CLASSES)
    b = next(va.read(range(3), 3))
    raw = np.stack([np.asarray(Image.open(p)) for p in sorted((ade / "annotations" / "validation").glob("*.png"))])
    assert b.images.shape == (3, 3, 48, 48) and b.labels.shape == (3, 48, 48)
    # ADE: 0 ("other") -> 255, id c -> c - 1
    assert set(np.unique(raw)) >= {0, 1} and set(b.labels.unique().tolist()) <= set(range(150)) | {255}
    tr, va, _ = seg_splits(str(tmp_path / "ade"), size=0)  # as stored: exactly the stored ids, shifted
    full = next(va.read(range(3), 3)).labels.numpy()
    assert np.array_equal(full == 255, raw == 0) and np.array_equal(full[raw > 0], raw[raw > 0] - 1)
    tr, va, name = seg_splits(f"voc:{tmp_path / 'voc'}", size=0)
    assert name == "voc2012" and va.num_classes == 21 and va.classnames == list(VOC_CLASSES)
    vraw = np.stack([np.asarray(Image.open(p)) for p in sorted((voc / "SegmentationClass").glob("2012_val*.png"))])
    vb = next(va.read(range(3), 3)).labels.numpy()
    assert Image.open(next((voc / "SegmentationClass").glob("*.png"))).mode == "P"
    assert np.array_equal(vb, vraw) and 255 in vb and 0 in vb  # VOC: palette indices are the ids, 255 ignored
    # bad data: a missing mask, a broken image, a label out of range -> counted skips
    (voc / "SegmentationClass" / "2012_val00000.png").unlink()
    (voc / "JPEGImages" / "2012_val00001.jpg").write_bytes(b"garbage")
    bad = np.array(vraw[2])
    bad[0, 0] = 40
    from radio_scale.eval.fixtures import _voc_palette

    bad_png = Image.fromarray(bad, mode="P")
    bad_png.putpalette(_voc_palette())
    bad_png.save(voc / "SegmentationClass" / "2012_val00002.png")
    _, va, _ = seg_splits(str(voc), size=0)
    got = next(va.read(range(3), 3))
    assert len(got) == 0 and got.skipped == {"missing_mask": 1, "undecodable": 1, "bad_label": 1}
    with pytest.raises(FileNotFoundError, match="neither an ADE20K nor a Pascal VOC") as e:
        seg_splits(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="Segmentation/train.txt"):
        (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
        seg_splits(str(voc))


def test_streamed_miou_scores_every_non_ignored_pixel_once(tmp_path):
    from PIL import Image

    from radio_scale.eval.fixtures import write_ade20k_tree
    from radio_scale.eval.scale import segprobe_streaming
    from radio_scale.eval.segdata import seg_splits
    from radio_scale.eval.segprobe import ProbeConfig

    ade = write_ade20k_tree(tmp_path / "ade", n_train=8, n_val=5)
    tr, va, _ = seg_splits(str(tmp_path / "ade"), size=0)
    W = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    enc = lambda x: F.relu(F.conv2d(x.float(), W, stride=4))  # noqa: E731
    res = segprobe_streaming({"s": enc}, tr, va, tr.num_classes, _state(), ProbeConfig(epochs=2, batch_size=4),
                             cache_dir=tmp_path / "cache", batch_size=3)["s"]
    raw = np.stack([np.asarray(Image.open(p)) for p in sorted((ade / "annotations" / "validation").glob("*.png"))])
    assert res["pixels"] == (raw != 0).sum() and res["n_val"] == 5 and res["skipped"] == 0
    assert 0 <= res["miou"] <= 1 and 0 <= res["pixel_acc"] <= 1
    assert len(list((tmp_path / "cache" / "0").glob("*.pt"))) == 3  # 8 training images in batches of 3


def test_coco_reader_decodes_polygons_and_rle_and_skips_crowds_and_bad_files(tmp_path):
    from radio_scale.eval.datasets import digits_on_photos
    from radio_scale.eval.fixtures import rle_encode, write_coco_tree
    from radio_scale.eval.segdata import CocoInstances, rle_decode

    rng = np.random.default_rng(0)
    for shape in ((13, 17), (1, 5), (40, 3)):
        m = rng.random(shape) > 0.6
        assert np.array_equal(rle_decode(rle_encode(m, True)), m) and np.array_equal(rle_decode(rle_encode(m, False)), m)
    # pycocotools' string format worked by hand: runs [5, 3, 40, 2, 10] -> deltas from the 4th on [.., -1, -30],
    # 5-bit groups + 48 with a continuation bit: '5' '3' 'X1' 'O' 'RO'
    from radio_scale.eval.segdata import _rle_string_to_counts

    assert _rle_string_to_counts("53X1ORO") == [5, 3, 40, 2, 10]
    hand = np.zeros(60, bool)
    hand[5:8] = hand[48:50] = True
    assert np.array_equal(rle_decode({"size": [6, 10], "counts": "53X1ORO"}), hand.reshape(10, 6).T)
    assert rle_encode(hand.reshape(10, 6).T)["counts"] == "53X1ORO"
    ann = write_coco_tree(tmp_path / "coco", n=6, size=64, seed=3, crowd_every=4)
    data = json.loads(ann.read_text())
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    coco = CocoInstances(ann)
    assert coco.images_dir == tmp_path / "coco" / "val2017" and coco.skipped["crowd_object"] == crowd > 0
    assert coco.num_objects == len(data["annotations"]) - crowd and len(coco.categories) == 10
    seg = digits_on_photos(n=6, size=64, seed=3)
    kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
    assert kinds == {"list", "dict"}
    for i in range(len(coco)):
        item = coco.load(i)
        image_index = item.id - 1
        assert item.image.shape == (3, 64, 64) and item.masks.shape[1:] == (64, 64) and len(item.boxes) == len(item.masks)
        x0, y0, x1, y1 = item.boxes[0].tolist()
        assert x1 > x0 and y1 > y0
        for a, m in zip([a for a in data["annotations"] if a["image_id"] == item.id and not a["iscrowd"]], item.masks):
            if isinstance(a["segmentation"], dict):  # RLE masks are the pasted digits exactly
                assert any(np.array_equal(m.numpy(), g) for g in seg.instances[image_index].numpy())
    # bad files: a missing image and a broken one are counted; a bad JSON / a missing file is one line
    (tmp_path / "coco" / "val2017" / data["images"][0]["file_name"]).unlink()
    (tmp_path / "coco" / "val2017" / data["images"][1]["file_name"]).write_bytes(b"xx")
    coco = CocoInstances(ann)
    assert coco.load(0) is None and coco.load(1) is None
    assert coco.skipped["missing_file"] == 1 and coco.skipped["undecodable"] == 1
    (tmp_path / "bad.json").write_text("{not json")
    for path, err, match in ((tmp_path / "bad.json", ValueError, "not a JSON"),
                             (tmp_path / "none.json", FileNotFoundError, "no such file")):
        with pytest.raises(err, match=match) as e:
            CocoInstances(path, tmp_path / "coco" / "val2017")
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the command line, end to end

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The smoke recipe's tiny student + heads (random weights) exported, as radio-eval reads it."""
    from test_eval import _export, _tiny_config

    from radio_scale.models import AdaptorHeads, build_student
    from radio_scale.teachers.spec import teacher_spec

    cfg = _tiny_config()
    specs = [teacher_spec(t) for t in cfg.teachers]
    torch.manual_seed(0)
    student = build_student(cfg.student, [s.name for s in specs if s.has_summary]).eval()
    heads = AdaptorHeads(student.embed_dim, specs).eval()
    return _export(tmp_path_factory.mktemp("model"), cfg, student, heads)


def test_radio_eval_knn_on_two_processes_equals_one_process(tmp_path, tiny_export):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tables = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "radio_scale.eval.cli", "knn", "--model", str(tiny_export), "--data", "lfw",
               "--teacher", "clip", "--device", "cpu", "--out", str(out), "--processes", str(n), "--batch-size", "32"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rep = json.loads((out / "eval_report.json").read_text())
        assert rep["meta"]["processes"] == n
        tables[n] = rep["results"]["knn/lfw"]
    assert set(tables[1]) == {"student/head/clip", "teacher/clip"}
    assert tables[2] == tables[1]
    assert tables[1]["teacher/clip"]["n_train"] == 150 and tables[1]["teacher/clip"]["n_val"] == 50
    # a bad --data on 2 processes: exit code 1 and each process's one line, not the launcher's traceback
    proc = subprocess.run([sys.executable, "-m", "radio_scale.eval.cli", "knn", "--model", str(tiny_export), "--data",
                           str(tmp_path / "nowhere"), "--device", "cpu", "--processes", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines and all(line.startswith("radio-eval knn: classification data") for line in lines)


def test_radio_eval_segprobe_on_ade20k_and_sam_on_coco_layouts(tmp_path, tiny_export, capsys):
    from radio_scale.eval.cli import main
    from radio_scale.eval.fixtures import write_ade20k_tree, write_coco_tree, write_voc_tree

    write_ade20k_tree(tmp_path / "ade", n_train=6, n_val=3)
    write_voc_tree(tmp_path / "voc", n_train=6, n_val=3)
    ann = write_coco_tree(tmp_path / "coco", n=3)
    out = tmp_path / "rep"
    common = ["--model", str(tiny_export), "--device", "cpu", "--out", str(out)]
    assert main(["segprobe", *common, "--seg-data", str(tmp_path / "ade"), "--seg-size", "64", "--epochs", "1"]) == 0
    rep = json.loads((out / "eval_report.json").read_text())["results"]
    row = rep["segprobe/ade20k"]["student/backbone"]
    assert 0 <= row["miou"] <= 1 and row["n_val"] == 3 and row["skipped"] == 0
    assert main(["segprobe", *common, "--seg-data", f"voc:{tmp_path / 'voc'}", "--seg-size", "64", "--epochs", "1"]) == 0
    assert "segprobe/voc2012" in json.loads((out / "eval_report.json").read_text())["results"]
    assert main(["sam", *common, "--seg-data", str(ann)]) == 0
    row = json.loads((out / "eval_report.json").read_text())["results"]["sam/coco_val2017"]["student/sam"]
    data = json.loads(ann.read_text())
    assert row["num_masks"] == sum(1 - a["iscrowd"] for a in data["annotations"])
    assert 0 <= row["agreement_iou"] <= 1 and row["skipped"] == sum(a["iscrowd"] for a in data["annotations"])
    # bad input: one line on stderr, exit code 1
    capsys.readouterr()
    assert main(["segprobe", *common, "--seg-data", str(tmp_path / "coco")]) == 1
    assert main(["sam", *common, "--seg-data", str(tmp_path / "none.json")]) == 1
    assert main(["knn", *common, "--data", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("radio-eval ") for line in err)
