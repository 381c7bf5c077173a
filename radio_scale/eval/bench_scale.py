"""Time the streamed evaluation per 1,000 images on this machine (the numbers in docs/evaluation.md).

    python -m radio_scale.eval.bench_scale [--arch vit_b16] [--images 320] [--seg-images 24] [--device cpu]

A student of the given preset (random weights: the cost does not depend on them) is run through the real
streamed code paths on offline data in the real formats: k-NN at 224 px over webdataset shards of JPEG photos
(the bundled crops, ~100-500 px, decoded + resized + centre-cropped as ImageNet), and the linear-probe
segmentation at 512 px over an ADE20K-layout tree. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def _shards_from_bundled(out: Path, n: int, per_shard: int = 64) -> Path:
    """n JPEG photos of the bundled 'train' set re-written as labelled shards (label = index % 10)."""
    import webdataset as wds

    from radio_scale.data.bundled import bundled_shards

    out.mkdir(parents=True, exist_ok=True)
    ds = wds.WebDataset(bundled_shards("train"), shardshuffle=False, empty_check=False).to_tuple("jpg")
    k = 0
    tar = None
    for (jpg,) in ds:
        if k % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(out / f"bench-{k // per_shard:06d}.tar", "w")
        for ext, data in (("jpg", jpg), ("cls", str(k % 10).encode())):
            info = tarfile.TarInfo(f"s{k:06d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        k += 1
        if k == n:
            break
    if tar is not None:
        tar.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m radio_scale.eval.bench_scale", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_b16")
    p.add_argument("--images", type=int, default=320, help="k-NN: training + held-out images (4:1)")
    p.add_argument("--seg-images", type=int, default=24, help="segprobe: training + held-out images (2:1)")
    p.add_argument("--knn-size", type=int, default=224)
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    from radio_scale.config.schema import StudentConfig
    from radio_scale.eval.encoders import student_spatial_encoder
    from radio_scale.eval.fixtures import write_ade20k_tree
    from radio_scale.eval.scale import knn_streaming, process_state, segprobe_streaming
    from radio_scale.eval.segdata import seg_splits
    from radio_scale.eval.segprobe import ProbeConfig
    from radio_scale.eval.streams import ShardSplit
    from radio_scale.models import build_student

    torch.manual_seed(0)
    student = build_student(StudentConfig(arch=args.arch), ["clip"]).eval().to(args.device)
    state = process_state(args.device)
    out: dict = {"arch": args.arch, "device": args.device, "torch_threads": torch.get_num_threads(),
                 "processes": state.num_processes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_val = args.images // 5
        _shards_from_bundled(tmp / "train", args.images - n_val)
        _shards_from_bundled(tmp / "val", n_val)

        @torch.no_grad()
        def summary(x):
            from radio_scale.eval.encoders import student_forward

            return student_forward(student, None, x, args.knn_size)[0].summary["clip"]

        t0 = time.perf_counter()
        res = knn_streaming({"s": summary}, ShardSplit(str(tmp / "train" / "*.tar"), args.knn_size),
                            ShardSplit(str(tmp / "val" / "*.tar"), args.knn_size), state, batch_size=args.batch_size)
        sec = time.perf_counter() - t0
        n = res["s"]["n_train"] + res["s"]["n_val"]
        out["knn"] = {"resolution": args.knn_size, "images": n, "seconds": round(sec, 2),
                      "seconds_per_1k_images": round(1000 * sec / n, 1)}

        n_val = args.seg_images // 3
        write_ade20k_tree(tmp / "ade", n_train=args.seg_images - n_val, n_val=n_val, size=64)
        tr, va, _ = seg_splits(str(tmp / "ade"), args.seg_size)
        enc = student_spatial_encoder(student, None, None, args.seg_size)
        t0 = time.perf_counter()
        seg = segprobe_streaming({"s": enc}, tr, va, tr.num_classes, state, ProbeConfig(epochs=1), tmp / "cache",
                                 batch_size=8)
        sec = time.perf_counter() - t0
        out["segprobe"] = {"resolution": args.seg_size, "images": args.seg_images, "epochs": 1,
                           "seconds": round(sec, 2),
                           "seconds_per_1k_images": round(1000 * sec / args.seg_images, 1),
                           "miou_random_weights": round(seg["s"]["miou"], 4)}
    if state.is_main_process:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
