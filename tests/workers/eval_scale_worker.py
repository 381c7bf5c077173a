"""Worker of tests/test_eval_scale.py.

  rss <train shards dir> <val shards dir>         streamed k-NN in this process; prints peak RSS as JSON
  world <out.json> <fixture dir>                  k-NN, zero-shot and mIoU under accelerate (1 or N processes)
"""
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _encoder(seed: int = 0, dim: int = 48):
    W = torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(seed))
    return lambda x: F.adaptive_avg_pool2d(x.float(), 8).flatten(1) @ W


def _spatial_encoder(seed: int = 0, dim: int = 16):
    """Patch features of a fixed random 4x4 patchify + ReLU: [B, dim, H/4, W/4]."""
    W = torch.randn(dim, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.5
    return lambda x: F.relu(F.conv2d(x.float(), W, stride=4))


def rss(train_dir: str, val_dir: str) -> None:
    from radio_scale.eval.scale import knn_streaming, process_state
    from radio_scale.eval.streams import ShardSplit

    t0 = time.perf_counter()
    train = ShardSplit(str(Path(train_dir) / "*.tar"), classnames=[str(i) for i in range(10)])
    val = ShardSplit(str(Path(val_dir) / "*.tar"), classnames=[str(i) for i in range(10)])
    res = knn_streaming({"e": _encoder()}, train, val, process_state("cpu"), k=20, T=0.07, batch_size=64)["e"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({**res, "peak_rss_mb": peak, "seconds": time.perf_counter() - t0}))


def world(out: str, fixtures: str) -> None:
    from radio_scale.eval.scale import knn_streaming, process_state, segprobe_streaming, zeroshot_streaming
    from radio_scale.eval.segdata import seg_splits
    from radio_scale.eval.segprobe import ProbeConfig
    from radio_scale.eval.streams import classification_splits

    torch.set_num_threads(1)
    state = process_state("cpu")
    train, val, _ = classification_splits("digits")
    enc = _encoder()
    knn = knn_streaming({"e": enc}, train, val, state, k=20, T=0.07, batch_size=64)["e"]
    classifier = F.normalize(torch.randn(48, 10, generator=torch.Generator().manual_seed(1)), dim=0)
    zs = zeroshot_streaming({"e": enc}, {"e": classifier}, val, state, batch_size=50)["e"]
    # how many held-out samples this process read itself (the work must really be split)
    from radio_scale.eval.scale import stream

    mine = sum(len(b) for b in stream(val, state, 64))
    from accelerate.utils import gather_object

    per_process = gather_object([mine]) if state.num_processes > 1 else [mine]
    seg_train, seg_val, _ = seg_splits(str(Path(fixtures) / "ade"), size=64)
    miou = segprobe_streaming({"s": _spatial_encoder()}, seg_train, seg_val, seg_train.num_classes, state,
                              ProbeConfig(epochs=3, batch_size=4), batch_size=4)["s"]
    if state.is_main_process:
        Path(out).write_text(json.dumps({"processes": state.num_processes, "knn": knn, "zeroshot": zs, "miou": miou,
                                         "per_process_val": per_process, "n_val": knn["n_val"]}))


if __name__ == "__main__":
    {"rss": rss, "world": world}[sys.argv[1]](*sys.argv[2:])
