"""Evaluation at dataset scale: streamed splits, many processes (accelerate), exact chunked k-NN, zero-shot.

Processes come from accelerate (`accelerate launch -m radio_scale.eval.cli ...`, or `radio-eval --processes N`,
which runs accelerate's launcher): `PartialState` gives the rank, world size and device, the split's work units
are divided with `split_between_processes`, and results are collected with accelerate's `gather`,
`pad_across_processes` and `gather_object`. Each sample is read by exactly one process and carries a global id;
padding rows added for the gather have id -1 and are dropped, so a metric counts every sample once.

k-NN (DINO protocol: weighted vote of the k nearest training points, weight exp(cos/T)): the held-out features
are gathered on every process (for ImageNet: 50k x D), then each process streams its share of the training split
batch by batch and keeps, per held-out point, the running top-k (cosine, label, id) by chunked matmul; the
per-process top-k lists are gathered and merged. The training features are never held: memory per process is the
held-out bank plus one batch, however large the training split. Ties in cosine are broken by the smaller training
id, so the neighbours do not depend on the number of processes.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from radio_scale.eval.streams import Batch, Split

Encoder = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- processes (accelerate)

def process_state(device: Optional[str] = None):
    """accelerate's PartialState (process group from accelerate's launcher, or a single process); cpu -> gloo."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _identity(x):
    return x


class _UnitStream(torch.utils.data.IterableDataset):
    """This process's work units, read in batches; DataLoader workers take every W-th unit."""

    def __init__(self, split: Split, units: Sequence, batch_size: int):
        self.split, self.units, self.batch_size = split, list(units), batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            last = None
            for b in self.split.read(unit, self.batch_size):
                if last is not None:
                    yield last, False
                last = b
            if last is not None:
                yield last, True  # the unit is done (drives the progress bar)


def stream(split: Split, state, batch_size: int = 64, num_workers: int = 0, desc: str = "") -> Iterator[Batch]:
    """This process's batches of `split` (its share of the work units), with a progress bar (ETA) on the main process."""
    from tqdm.auto import tqdm

    units = split.units(state.num_processes, batch_size)
    with state.split_between_processes(units) as mine:
        mine = list(mine)
    loader = torch.utils.data.DataLoader(_UnitStream(split, mine, batch_size), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity,
                                         persistent_workers=False, prefetch_factor=2 if num_workers else None)
    bar = tqdm(total=len(mine), desc=desc or split.name, unit="unit", disable=not state.is_main_process,
               mininterval=2.0, dynamic_ncols=True, leave=False)
    try:
        for batch, unit_done in loader:
            yield batch
            if unit_done:
                bar.update(1)
    finally:
        bar.close()


def gather_rows(state, ids: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every process's (ids [n], rows [n, ...]) -> all of them on every process, sorted by id, each id exactly once."""
    from accelerate.utils import gather, pad_across_processes

    if state.num_processes == 1:
        order = ids.argsort()
        return (ids[order], *(r[order] for r in rows))
    dev = state.device
    # a process that saw no sample does not know the row widths: agree on them first (-1: a 1-D row)
    local = [(-2 if r.shape[0] == 0 else (r.shape[1] if r.ndim > 1 else -1)) for r in rows]
    widths = gather(torch.tensor(local or [0], device=dev)[None]).max(dim=0).values.tolist()
    fixed = [r.reshape(0, w) if r.shape[0] == 0 and w >= 0 else r for r, w in zip(rows, widths)]
    ids_all = gather(pad_across_processes(ids.to(dev), dim=0, pad_index=-1)).cpu()
    out = [gather(pad_across_processes(r.to(dev), dim=0, pad_index=0)).cpu() for r in fixed]
    keep = ids_all >= 0
    ids_all = ids_all[keep]
    out = [r[keep] for r in out]
    order = ids_all.argsort()
    ids_all = ids_all[order]
    if ids_all.numel() > 1 and bool((ids_all[1:] == ids_all[:-1]).any()):
        raise RuntimeError("gather: a sample was read by two processes")
    return (ids_all, *(r[order] for r in out))


def sum_counters(state, counter: Counter) -> Counter:
    """The sum of every process's Counter (skipped samples by reason)."""
    if state.num_processes == 1:
        return Counter(counter)
    from accelerate.utils import gather_object

    total: Counter = Counter()
    for c in gather_object([dict(counter)]):
        total.update(c)
    return total


def sum_tensor(state, t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of a tensor over processes (accelerate's reduce)."""
    if state.num_processes == 1:
        return t
    from accelerate.utils import reduce

    return reduce(t.to(state.device), reduction="sum").cpu()


@torch.no_grad()
def extract(encoders: Mapping[str, Encoder], split: Split, state, batch_size: int = 64, num_workers: int = 0,
            desc: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, Counter]:
    """(ids, {encoder: features [N, D]}, labels, skipped) of the whole split, on every process, in id order."""
    ids, labels, skipped = [], [], Counter()
    feats: dict[str, list] = {name: [] for name in encoders}
    for b in stream(split, state, batch_size, num_workers, desc):
        skipped.update(b.skipped)
        if not len(b):
            continue
        ids.append(b.ids)
        labels.append(b.labels)
        for name, enc in encoders.items():
            feats[name].append(enc(b.images).float().cpu())
    ids_t = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    names = list(encoders)
    local = [torch.cat(feats[n]) if feats[n] else torch.zeros(0) for n in names]
    ids_t, labels_t, *out = gather_rows(state, ids_t, labels_t, *local)
    skipped = sum_counters(state, skipped)
    if ids_t.numel() == 0:
        raise ValueError(f"{desc or split.name}: no readable sample (skipped: {dict(skipped) or 'none'})")
    return ids_t, dict(zip(names, out)), labels_t, skipped


# ---------------------------------------------------------------- exact streaming k-NN

class StreamingTopK:
    """Exact running top-k (cosine) over training batches, for a fixed bank of held-out features.

    Order of the neighbours: cosine descending, ties by the smaller training id; so the top-k after any split of
    the training set over processes and batches is the same.
    """

    def __init__(self, test_feats: torch.Tensor, k: int = 20, test_chunk: int = 4096):
        if test_feats.ndim != 2:
            raise ValueError(f"k-NN: held-out features must be [N, D], got {tuple(test_feats.shape)}")
        self.test = F.normalize(test_feats.float(), dim=1)
        self.k, self.test_chunk = int(k), int(test_chunk)
        n = self.test.shape[0]
        self.values = torch.full((n, self.k), -math.inf, device=self.test.device)
        self.labels = torch.full((n, self.k), -1, dtype=torch.long, device=self.test.device)
        self.ids = torch.full((n, self.k), -1, dtype=torch.long, device=self.test.device)
        self.seen = 0

    def add(self, feats: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """One batch of training features [b, D] with labels [b] and global ids [b]."""
        if feats.shape[0] == 0:
            return
        if feats.ndim != 2 or feats.shape[1] != self.test.shape[1]:
            raise ValueError(f"k-NN: training features {tuple(feats.shape)} do not match held-out "
                             f"{tuple(self.test.shape)}")
        train = F.normalize(feats.float().to(self.test.device), dim=1)
        labels, ids = labels.long().to(self.test.device), ids.long().to(self.test.device)
        kk = min(self.k, train.shape[0])
        for s in range(0, self.test.shape[0], self.test_chunk):
            sim = self.test[s:s + self.test_chunk] @ train.T  # cosine [chunk, b]
            if kk < train.shape[0]:
                # candidates: the top kk, plus every point tied with the kk-th (so id tie-breaking stays exact)
                kth = sim.topk(kk, dim=1).values[:, -1:]
                cand = sim >= kth
                width = int(cand.sum(1).max())
                v, i = sim.masked_fill(~cand, -math.inf).topk(width, dim=1)
            else:
                v, i = sim, torch.arange(train.shape[0], device=sim.device).expand(sim.shape[0], -1)
            self._merge(slice(s, s + self.test_chunk), v, labels[i], ids[i])
        self.seen += int(feats.shape[0])

    def _merge(self, rows: slice, v: torch.Tensor, lab: torch.Tensor, ids: torch.Tensor) -> None:
        V = torch.cat([self.values[rows], v], 1)
        L = torch.cat([self.labels[rows], lab], 1)
        I = torch.cat([self.ids[rows], ids], 1)
        big = torch.iinfo(torch.long).max
        o = torch.where(I < 0, torch.full_like(I, big), I).argsort(dim=1, stable=True)  # id ascending
        V, L, I = V.gather(1, o), L.gather(1, o), I.gather(1, o)
        o = V.argsort(dim=1, descending=True, stable=True)[:, : self.k]  # cosine descending, ties keep id order
        self.values[rows], self.labels[rows], self.ids[rows] = V.gather(1, o), L.gather(1, o), I.gather(1, o)

    def merge(self, values: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold in another top-k list over other training samples (another process's)."""
        self._merge(slice(None), values.to(self.values.device), labels.to(self.values.device), ids.to(self.values.device))

    def scores(self, T: float = 0.07, num_classes: Optional[int] = None) -> torch.Tensor:
        """Per-class votes [N, C]: sum of exp(cos/T) over the k neighbours (float64), as knn.knn_scores."""
        if not math.isfinite(math.exp(1.0 / T)):
            raise ValueError(f"knn: temperature T={T} is too small (exp(1/T) overflows float64)")
        valid = self.ids >= 0
        num_classes = int(self.labels.max()) + 1 if num_classes is None else num_classes
        w = torch.where(valid, (self.values.double() / T).exp(), torch.zeros((), dtype=torch.float64))
        votes = torch.zeros(self.values.shape[0], num_classes, dtype=torch.float64, device=self.values.device)
        votes.scatter_add_(1, self.labels.clamp(min=0), w)
        return votes


def knn_topk_all_processes(state, topk: StreamingTopK) -> StreamingTopK:
    """Merge every process's top-k into one (the same on every process)."""
    if state.num_processes == 1:
        return topk
    from accelerate.utils import gather

    dev = state.device
    n = topk.values.shape[0]
    v = gather(topk.values.to(dev)).cpu().reshape(state.num_processes, n, topk.k)
    lab = gather(topk.labels.to(dev)).cpu().reshape(state.num_processes, n, topk.k)
    ids = gather(topk.ids.to(dev)).cpu().reshape(state.num_processes, n, topk.k)
    seen = int(sum_tensor(state, torch.tensor([topk.seen])).item())
    merged = StreamingTopK(topk.test.cpu(), topk.k, topk.test_chunk)
    for p in range(state.num_processes):
        merged.merge(v[p], lab[p], ids[p])
    merged.seen = seen
    return merged


def knn_streaming(encoders: Mapping[str, Encoder], train: Split, val: Split, state=None, k: int = 20,
                  T: float = 0.07, num_classes: Optional[int] = None, batch_size: int = 64, num_workers: int = 0,
                  test_chunk: int = 4096) -> dict[str, dict[str, float]]:
    """k-NN top-1/top-5 of each encoder's summary features: held-out bank gathered, training split streamed."""
    from radio_scale.eval.knn import topk_accuracy

    state = state or process_state()
    _, test_feats, test_labels, skipped_val = extract(encoders, val, state, batch_size, num_workers, desc="k-NN val")
    banks = {name: StreamingTopK(f, k, test_chunk) for name, f in test_feats.items()}
    skipped_train: Counter = Counter()
    with torch.no_grad():
        for b in stream(train, state, batch_size, num_workers, desc="k-NN train"):
            skipped_train.update(b.skipped)
            if not len(b):
                continue
            for name, enc in encoders.items():
                banks[name].add(enc(b.images).float().cpu(), b.labels, b.ids)
    skipped_train = sum_counters(state, skipped_train)
    if num_classes is None:
        names = train.classnames or val.classnames
        num_classes = len(names) if names else None
    out: dict[str, dict[str, float]] = {}
    for name, bank in banks.items():
        bank = knn_topk_all_processes(state, bank)
        if bank.seen == 0:
            raise ValueError(f"k-NN train: no readable sample (skipped: {dict(skipped_train) or 'none'})")
        C = num_classes or int(max(int(bank.labels.max()), int(test_labels.max()))) + 1
        res = topk_accuracy(bank.scores(T, C), test_labels)
        res.update({"n_train": float(bank.seen), "n_val": float(test_labels.numel()),
                    "skipped": float(sum(skipped_train.values()) + sum(skipped_val.values()))})
        out[name] = res
    return out


# ---------------------------------------------------------------- zero-shot, streamed

def zeroshot_streaming(encoders: Mapping[str, Encoder], classifiers: Mapping[str, torch.Tensor], val: Split,
                       state=None, batch_size: int = 64, num_workers: int = 0) -> dict[str, dict[str, float]]:
    """Zero-shot top-1/top-5 of each encoder against its text classifier [D, C], streaming the held-out split.

    Per-sample hits are gathered by id (each sample once), so the accuracy is the same on any number of processes.
    """
    state = state or process_state()
    ids, hits, skipped = [], {n: [] for n in encoders}, Counter()
    with torch.no_grad():
        for b in stream(val, state, batch_size, num_workers, desc="zero-shot"):
            skipped.update(b.skipped)
            if not len(b):
                continue
            ids.append(b.ids)
            for name, enc in encoders.items():
                emb = enc(b.images).float()
                logits = (F.normalize(emb, dim=1) @ classifiers[name].to(emb.device).float()).cpu()
                ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
                y = b.labels[:, None]
                hits[name].append(torch.stack([(ranked[:, :1] == y).any(1), (ranked == y).any(1)], 1).long())
    ids_t = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    names = list(encoders)
    local = [torch.cat(hits[n]) if hits[n] else torch.zeros(0, 2, dtype=torch.long) for n in names]
    ids_t, *gathered = gather_rows(state, ids_t, *local)
    skipped = sum_counters(state, skipped)
    n = ids_t.numel()
    if n == 0:
        raise ValueError(f"zero-shot: no readable sample (skipped: {dict(skipped) or 'none'})")
    return {name: {"top1": g[:, 0].sum().item() / n, "top5": g[:, 1].sum().item() / n, "n_val": float(n),
                   "skipped": float(sum(skipped.values()))} for name, g in zip(names, gathered)}


# ---------------------------------------------------------------- linear-probe segmentation, streamed

def _cache_train_features(encoders: Mapping[str, Encoder], train: Split, state, cache_dir, batch_size: int,
                          num_workers: int) -> tuple[list, Counter]:
    """Each process writes its batches' frozen features (fp16) and masks (uint8) to cache_dir/<i>/<first id>.pt."""
    from pathlib import Path

    cache = Path(cache_dir)
    names = list(encoders)
    for i in range(len(names)):
        (cache / str(i)).mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    with torch.no_grad():
        for b in stream(train, state, batch_size, num_workers, desc="segprobe features"):
            skipped.update(b.skipped)
            if not len(b):
                continue
            key = f"{int(b.ids.min()):020d}.pt"
            for i, name in enumerate(names):
                f = encoders[name](b.images).to(torch.float16).cpu()
                tmp = cache / str(i) / f".{key}.tmp{state.process_index}"
                torch.save({"feats": f, "masks": b.labels.to(torch.uint8), "ids": b.ids}, tmp)
                tmp.replace(cache / str(i) / key)
    state.wait_for_everyone()
    return [sorted((cache / str(i)).glob("*.pt")) for i in range(len(names))], sum_counters(state, skipped)


def _train_probe_from_files(files: Sequence, num_classes: int, cfg):
    """The linear probe (BatchNorm + 1x1 conv) trained on cached batches; deterministic, so every process trains
    the same probe (no communication, the same weights on 1 or N processes)."""
    from radio_scale.eval.segprobe import LinearSegHead

    if not files:
        raise ValueError("segprobe: no training feature was cached (no readable training sample)")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    first = torch.load(files[0], weights_only=True)
    head = LinearSegHead(first["feats"].shape[1], num_classes)
    sizes = [len(torch.load(f, weights_only=True)["ids"]) for f in files] if len(files) < 64 else None
    per_file = sizes or [len(first["ids"])] * len(files)
    steps = cfg.epochs * sum(-(-n // cfg.batch_size) for n in per_file)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    head.train()
    for _ in range(cfg.epochs):
        for fi in torch.randperm(len(files), generator=gen).tolist():
            blob = torch.load(files[fi], weights_only=True)
            feats, masks = blob["feats"].float(), blob["masks"].long()
            order = torch.randperm(feats.shape[0], generator=gen)
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                if len(idx) < 2 and len(order) > 1:  # BatchNorm needs more than one sample in train mode
                    continue
                logits = head(feats[idx], masks.shape[-2:])
                loss = F.cross_entropy(logits, masks[idx], ignore_index=255)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


def segprobe_streaming(encoders: Mapping[str, Encoder], train: Split, val: Split, num_classes: int, state=None,
                       cfg=None, cache_dir=None, batch_size: int = 16, num_workers: int = 0
                       ) -> dict[str, dict[str, float]]:
    """Linear-probe mIoU (ignore label 255 not scored) of each spatial encoder, the splits streamed.

    Training features are cached on disk once (fp16; a shared directory when processes span nodes), the probe
    is trained from the cache, and the held-out split is streamed through encoder + probe, summing one pixel
    confusion matrix per encoder over all processes (integer counts: the same mIoU on any number of processes).
    """
    import shutil
    import tempfile

    from radio_scale.eval.segprobe import ProbeConfig, confusion_matrix, iou_from_confusion

    state = state or process_state()
    cfg = cfg or ProbeConfig()
    own_cache = cache_dir is None
    if own_cache:  # one directory for all processes: the main process makes it and shares its name
        from accelerate.utils import broadcast_object_list

        box = [tempfile.mkdtemp(prefix="radio-segprobe-") if state.is_main_process else None]
        if state.num_processes > 1:
            broadcast_object_list(box)
        cache_dir = box[0]
    try:
        files, skipped_train = _cache_train_features(encoders, train, state, cache_dir, batch_size, num_workers)
        heads = {name: _train_probe_from_files(files[i], num_classes, cfg) for i, name in enumerate(encoders)}
        conf = {name: torch.zeros(num_classes, num_classes, dtype=torch.long) for name in encoders}
        skipped_val: Counter = Counter()
        n_val = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            for b in stream(val, state, batch_size, num_workers, desc="segprobe val"):
                skipped_val.update(b.skipped)
                if not len(b):
                    continue
                n_val += len(b)
                for name, enc in encoders.items():
                    f = enc(b.images).to(torch.float16).float().cpu()  # as cached for training
                    pred = heads[name](f, b.labels.shape[-2:]).argmax(1)
                    conf[name] += confusion_matrix(pred, b.labels, num_classes)
        n_val = int(sum_tensor(state, n_val).item())
        skipped = sum(sum_counters(state, skipped_val).values()) + sum(skipped_train.values())
        out = {}
        for name in encoders:
            c = sum_tensor(state, conf[name])
            iou = iou_from_confusion(c)
            valid = c.sum(1)
            out[name] = {"miou": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
                         "pixel_acc": float(c.diag().sum() / valid.sum().clamp(min=1)),
                         "pixels": float(valid.sum()),
                         "n_val": float(n_val), "skipped": float(skipped)}
        return out
    finally:
        state.wait_for_everyone()
        if own_cache and state.is_main_process:
            shutil.rmtree(cache_dir, ignore_errors=True)
