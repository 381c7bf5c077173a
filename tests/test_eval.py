"""The evaluation suite: k-NN, mIoU + linear probe, zero-shot, SAM drop-in, fidelity, FLOPs, reports, pictures, CLI."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radio_scale.eval.knn import knn_classify, knn_scores
from radio_scale.eval.report import EvalReport, read_report
from radio_scale.eval.segprobe import ProbeConfig, evaluate_segprobe, mean_iou


# ------------------------------------------------------------------ k-NN

def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_votes_equal_hand_computed_exp_cosine_weights():
    # class 0 at 0° and 10°, class 1 at 25°, class 2 at 90° and 180°; the test point sits at 20°
    train = torch.tensor([_unit(0), _unit(10), _unit(25), _unit(90), _unit(180)]) * torch.tensor([[3.0], [0.5], [2.0], [1.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    test = torch.tensor([_unit(20)]) * 4.0  # norms must not matter: features are L2-normalised
    c = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    for T in (0.07, 0.01):
        scores = knn_scores(train, labels, test, k=3, T=T, num_classes=3)[0]
        # the 3 nearest are 25° (5° away), 10° (10° away) and 0° (20° away); 90° and 180° get no vote
        expected = [math.exp(c(10) / T) + math.exp(c(20) / T), math.exp(c(5) / T), 0.0]
        assert scores.tolist() == pytest.approx(expected, rel=1e-4)
    # the weighting decides: at T=0.07 two farther class-0 neighbours outvote the nearest one, at T=0.01 they do not
    assert knn_classify(train, labels, test, torch.tensor([0]), k=3, T=0.07)["top1"] == 1.0
    assert knn_classify(train, labels, test, torch.tensor([1]), k=3, T=0.01)["top1"] == 1.0
    assert knn_classify(train, labels, test, torch.tensor([2]), k=3, T=0.01) == {"top1": 0.0, "top5": 1.0}


def test_knn_top1_is_one_on_separable_features_and_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 5
    ytr, yte = torch.arange(200) % 10, torch.arange(60) % 10
    xtr = centres[ytr] + torch.randn(200, 32, generator=g)
    xte = centres[yte] + torch.randn(60, 32, generator=g)
    acc = knn_classify(xtr, ytr, xte, yte, k=20, T=0.07, num_classes=10, batch_size=7)  # batching must not matter
    assert acc == {"top1": 1.0, "top5": 1.0}
    shuffled = ytr[torch.randperm(200, generator=g)]
    assert knn_classify(xtr, shuffled, xte, yte, k=20, T=0.07)["top1"] < 0.4


# ------------------------------------------------------------------ mIoU and the linear probe

def test_mean_iou_matches_hand_computation_with_ignored_pixels():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [2, 2, 2, 0]])
    # class 0: TP 2, FN 1 -> 2/3; class 1: TP 3, FP 2 -> 3/5; class 2: TP 3, FN 1 -> 3/4 (ignored pixels count nowhere);
    # class 3 appears nowhere and is left out of the mean
    assert mean_iou(pred, target, num_classes=4) == pytest.approx((2 / 3 + 3 / 5 + 3 / 4) / 3)
    assert mean_iou(target.clamp(max=2), target.clamp(max=2), num_classes=3) == 1.0
    with pytest.raises(ValueError, match="class 7"):
        mean_iou(pred, torch.full_like(target, 7), num_classes=4)


def _blocky_labels(n, grid, up, classes, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (n, grid, grid), generator=g)
    return coarse, coarse.repeat_interleave(up, 1).repeat_interleave(up, 2)


def test_linear_probe_learns_one_hot_label_features_to_miou_above_09():
    coarse_tr, masks_tr = _blocky_labels(24, 8, 4, 4, seed=0)
    coarse_te, masks_te = _blocky_labels(8, 8, 4, 4, seed=1)
    masks_tr[:, :2] = 255  # ignored rows must not break training
    feats = lambda labels: F.one_hot(labels, 4).permute(0, 3, 1, 2).float()  # noqa: E731
    probe = ProbeConfig(epochs=15, batch_size=12, lr=0.1)
    out = evaluate_segprobe(lambda x: x, feats(coarse_tr), masks_tr, feats(coarse_te), masks_te, num_classes=4, cfg=probe)
    assert out["miou"] > 0.9 and out["pixel_acc"] > 0.9
    # features that carry no label information cannot reach that
    noise = lambda n, seed: torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    blind = evaluate_segprobe(lambda x: x, noise(24, 3), masks_tr, noise(8, 4), masks_te, num_classes=4, cfg=probe)
    assert blind["miou"] < 0.5


# ------------------------------------------------------------------ reports

def test_report_writes_json_and_markdown_that_read_back(tmp_path):
    rep = EvalReport("runs/x/export", meta={"resolution": 64})
    rep.add("knn/digits", {"student/head/clip": {"top1": 0.75, "top5": 0.98}, "teacher/clip": {"top1": 0.8, "top5": 1.0}})
    rep.add("fidelity", {"sam": {"spatial_cosine": 0.5, "spatial_mse": float("nan")}})
    js, md = rep.write(tmp_path / "out")
    raw = json.loads(js.read_text())
    assert raw["results"]["knn/digits"]["teacher/clip"]["top1"] == 0.8
    assert raw["results"]["fidelity"]["sam"]["spatial_mse"] is None  # NaN is not JSON
    back = read_report(js)
    assert back.results["knn/digits"] == rep.results["knn/digits"]
    text = md.read_text()
    assert "## knn/digits" in text and "| student/head/clip | 0.75 | 0.98 |" in text and "| sam | 0.5 | n/a |" in text
    assert rep.flat()["eval/knn/digits/teacher/clip/top5"] == 1.0


# ------------------------------------------------------------------ tiny real teachers and student

def _tiny_config():
    """The smoke recipe's tiny teachers (open_clip, DINOv2, SAM: real classes, random weights), no EfficientNet."""
    from radio_scale.config import config_from_dict, config_to_dict, load_config

    raw = config_to_dict(load_config("smoke"))
    raw["teachers"].pop("effnet")
    for stage in raw["stages"]:
        for g in stage["groups"]:
            g["teachers"] = [t for t in g["teachers"] if t != "effnet"]
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def tiny():
    from radio_scale.models import AdaptorHeads, build_student
    from radio_scale.teachers import build_teacher
    from radio_scale.teachers.spec import teacher_spec

    cfg = _tiny_config()
    teachers = {t.name: build_teacher(t) for t in cfg.teachers}
    specs = [teacher_spec(t) for t in cfg.teachers]
    torch.manual_seed(0)
    student = build_student(cfg.student, [s.name for s in specs if s.has_summary]).eval()
    heads = AdaptorHeads(student.embed_dim, specs).eval()
    return cfg, teachers, student, heads


@pytest.fixture(scope="module")
def digits_small():
    from radio_scale.eval.datasets import ClassificationSet, classification_set

    d = classification_set("digits")
    return ClassificationSet("digits", d.train_images[:200], d.train_labels[:200], d.test_images[:60],
                             d.test_labels[:60], d.classnames)


class _TeacherAsStudent(torch.nn.Module):
    """A perfect student for one teacher: its summary and spatial 'head outputs' are the teacher's own."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        from radio_scale.data.views import STUDENT_MEAN, STUDENT_STD
        from radio_scale.eval.encoders import teacher_view
        from radio_scale.models import StudentOutput

        pixels = x * torch.tensor(STUDENT_STD).view(1, 3, 1, 1) + torch.tensor(STUDENT_MEAN).view(1, 3, 1, 1)
        out = self.teacher(teacher_view(pixels, self.teacher))
        self.last = out
        return StudentOutput(summary={self.teacher.name: out.summary} if out.summary is not None else {},
                             patches=out.spatial)

    def heads(self, out, names=None, run_unused=True):
        from radio_scale.models import HeadOutput

        return {self.teacher.name: HeadOutput(out.summary.get(self.teacher.name), out.patches)}


def test_zeroshot_through_a_perfect_student_equals_the_clip_teachers_encode_image(tiny, digits_small):
    from radio_scale.eval.datasets import batches
    from radio_scale.eval.encoders import student_summary_encoder
    from radio_scale.eval.suite import clip_image_encoder
    from radio_scale.eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot, zeroshot_classify

    _, teachers, _, _ = tiny
    clip = teachers["clip"]
    templates = ["a photo of the number {}.", "a blurry photo of a {}."]
    classifier = build_zeroshot_classifier(clip, digits_small.classnames, templates)
    # the class weight is the normalised mean of the normalised prompt embeddings (open_clip's recipe)
    with torch.no_grad():
        emb = F.normalize(clip.encode_text(clip.tokenizer([t.format("7") for t in templates])), dim=-1)
    assert torch.allclose(classifier[:, 7], F.normalize(emb.mean(0), dim=0), atol=1e-5)
    assert zeroshot_classify(classifier.T * 3.0, classifier, torch.arange(10))["top1"] == 1.0

    perfect = _TeacherAsStudent(clip)
    through_student = evaluate_zeroshot(student_summary_encoder(perfect, perfect.heads, "clip", clip.input_size),
                                        clip, batches(digits_small.test_images, digits_small.test_labels, 32),
                                        digits_small.classnames, classifier=classifier)
    through_teacher = evaluate_zeroshot(clip_image_encoder(clip), clip,
                                        batches(digits_small.test_images, digits_small.test_labels, 32),
                                        digits_small.classnames, classifier=classifier)
    assert through_student == through_teacher
    assert 0.0 <= through_teacher["top1"] <= through_teacher["top5"] <= 1.0


def test_sam_decoding_equals_segment_anythings_predictor_on_the_same_embedding(tiny):
    from segment_anything.utils.transforms import ResizeLongestSide

    from radio_scale.eval.encoders import teacher_spatial_encoder
    from radio_scale.eval.sam_dropin import decode_box_masks, sam_decoder_of

    sam = tiny[1]["sam"]
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))  # not square: padding matters
    emb = teacher_spatial_encoder(sam)(image[None])
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 60.0, 20.0]])
    ours = decode_box_masks(sam_decoder_of(sam), emb, boxes, (48, 64))
    predictor = sam.predictor()
    predictor.features, predictor.is_image_set = emb, True
    predictor.original_size, predictor.input_size = (48, 64), ResizeLongestSide.get_preprocess_shape(48, 64, sam.input_size)
    theirs, _, _ = predictor.predict_torch(None, None, predictor.transform.apply_boxes_torch(boxes, (48, 64)),
                                           multimask_output=False, return_logits=True)
    assert torch.allclose(ours, theirs[:, 0], atol=1e-5)


def test_sam_dropin_with_the_teachers_own_embedding_agrees_perfectly_and_noise_does_not(tiny):
    from radio_scale.eval.datasets import digits_on_photos
    from radio_scale.eval.encoders import teacher_spatial_encoder
    from radio_scale.eval.sam_dropin import boxes_from_masks, decode_box_masks, evaluate_sam_dropin, sam_decoder_of

    sam = tiny[1]["sam"]
    data = digits_on_photos(n=4, size=64, seed=3)
    own = teacher_spatial_encoder(sam)
    # the random tiny decoder's logits sit just below SAM's threshold 0: threshold at their median so that masks are
    # half the image and agreement is not trivially "both empty"
    logits = decode_box_masks(sam_decoder_of(sam), own(data.images[0][None]), boxes_from_masks(data.instances[0]), (64, 64))
    thr = float(logits.median())
    same = evaluate_sam_dropin(own, sam, list(data.images), gt_masks=data.instances, mask_threshold=thr)
    assert same["agreement_iou"] == 1.0 and same["logit_mse"] == 0.0
    assert same["num_masks"] == sum(len(i) for i in data.instances)
    g = torch.Generator().manual_seed(0)

    def noisy(x):
        e = own(x)
        return e + torch.randn(e.shape, generator=g) * e.std()

    off = evaluate_sam_dropin(noisy, sam, list(data.images), gt_masks=data.instances, mask_threshold=thr)
    assert off["agreement_iou"] < 0.9 and off["logit_mse"] > 0


def test_fidelity_of_a_teacher_against_itself_is_cosine_one_and_mse_zero(tiny, digits_small):
    from radio_scale.eval.encoders import teacher_view
    from radio_scale.eval.fidelity import teacher_fidelity
    from radio_scale.eval.suite import fidelity_task

    _, teachers, _, _ = tiny
    images = digits_small.test_images[:6]
    for name in ("clip", "sam"):
        t = teachers[name]
        perfect = _TeacherAsStudent(t)
        table = fidelity_task(perfect, perfect.heads, [t], images, resolution=t.input_size)[name]
        assert table["spatial_cosine"] == pytest.approx(1.0, abs=1e-5) and table["spatial_mse"] == pytest.approx(0, abs=1e-9)
        if t.has_summary:
            assert table["summary_cosine"] == pytest.approx(1.0, abs=1e-5) and table["summary_mse"] == pytest.approx(0, abs=1e-9)
        else:
            assert "summary_cosine" not in table
    out = teachers["clip"](teacher_view(images, teachers["clip"]))
    # a coarser prediction is bilinearly brought up to the teacher grid (the loss's rule): the same upsampling of
    # the same map is a perfect match; a constant offset c costs exactly c^2 of MSE
    coarse = F.interpolate(out.spatial, scale_factor=0.5, mode="bilinear", align_corners=False)
    target = F.interpolate(coarse, size=out.spatial.shape[-2:], mode="bilinear", align_corners=False)
    fid = teacher_fidelity(out.summary + 0.5, coarse, out.summary, target)
    assert fid["spatial_cosine"] == pytest.approx(1.0, abs=1e-5) and fid["spatial_mse"] == pytest.approx(0, abs=1e-9)
    assert fid["summary_mse"] == pytest.approx(0.25, rel=1e-5) and fid["summary_cosine"] < 1.0


def test_flop_counter_agrees_with_the_analytic_student_flops(tiny):
    from radio_scale.eval.throughput import count_flops, flop_crosscheck, measure_throughput

    cfg, _, student, _ = tiny
    for res, window in ((64, 0), (128, 2)):
        check = flop_crosscheck(student, cfg.student, res, num_summary_tokens=2, window_size=window)
        assert check["rel_diff"] < 0.03, check
    # global attention over 64 tokens costs more than 2x2 windows: the counter sees the attention matmuls
    assert count_flops(student, torch.zeros(1, 3, 128, 128)) > count_flops(student, torch.zeros(1, 3, 128, 128), window_size=2)
    res = measure_throughput(lambda x: student(x), 64, 2, warmup=1, iters=2, flops_per_image=10**9, peak_flops=1e12)
    assert res.images_per_s > 0 and res.mfu == pytest.approx(res.images_per_s * 1e-3)


def test_periodic_eval_logs_knn_of_every_summary_head_and_fidelity(tiny, monkeypatch):
    from radio_scale.eval import datasets, report

    cfg, teachers, student, heads = tiny
    small = {"digits": _small_digits()}
    monkeypatch.setattr(datasets, "classification_set", lambda name: small[name])

    class Recorder:
        def log_metrics(self, metrics, step):
            self.logged = (dict(metrics), step)

    rec = Recorder()
    modes = []
    hook = student.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    student.train()  # as the trainer holds it
    try:
        metrics = report.run_periodic_eval(student, heads, teachers, cfg, step=7, tracker=rec, fidelity_images=4)
        restored = student.training
    finally:
        hook.remove()
        student.eval()
    assert modes and not any(modes) and restored  # evaluated in eval mode (no random CPE crops), then given back
    assert rec.logged == (metrics, 7)
    for head in ("clip", "dino"):
        assert 0 <= metrics[f"eval/knn/digits/{head}/top1"] <= metrics[f"eval/knn/digits/{head}/top5"] <= 1
    for t in ("clip", "dino", "sam"):
        assert -1 <= metrics[f"eval/fidelity/{t}/spatial_cosine"] <= 1 and metrics[f"eval/fidelity/{t}/spatial_mse"] > 0
    assert "eval/fidelity/sam/summary_cosine" not in metrics


def _small_digits():
    from radio_scale.eval.datasets import ClassificationSet, classification_set

    d = classification_set("digits")
    return ClassificationSet("digits", d.train_images[:100], d.train_labels[:100], d.test_images[:30],
                             d.test_labels[:30], d.classnames)


# ------------------------------------------------------------------ data sets, pictures

def test_segmentation_folder_round_trips_and_names_a_missing_mask(tmp_path):
    from radio_scale.eval.datasets import digits_on_photos, load_segmentation_folder, write_segmentation_folder

    seg = digits_on_photos(n=5, size=48, seed=1)
    assert set(seg.masks.unique().tolist()) <= set(range(11)) | {255} and (seg.masks > 0).any()
    for inst, mask in zip(seg.instances, seg.masks):  # every digit instance is labelled with a digit class
        assert len(inst) >= 1 and ((mask[inst.any(0)] >= 1) & (mask[inst.any(0)] <= 10)).all()
    root = write_segmentation_folder(tmp_path / "seg", seg)
    back = load_segmentation_folder(root)
    assert torch.equal(back.masks, seg.masks) and back.classnames == seg.classnames
    assert (back.images - seg.images).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG
    assert load_segmentation_folder(root, size=32).masks.shape == (5, 32, 32)
    (root / "masks" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="00003.png"):
        load_segmentation_folder(root)


def test_loss_curves_and_pca_maps_are_written_as_png(tmp_path):
    import matplotlib.image

    from radio_scale.eval.pictures import pca_pair, plot_loss_curves, plot_pca_maps, read_loss_history

    recs = [{"step": s, "loss/total": 2.0 / s, "loss/clip/summary": 1.0 / s, "lr": 1e-3} for s in range(1, 6)]
    text = "\n".join(json.dumps(r) for r in recs) + '\n{"step": 6, "loss/to'  # a run killed mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    hist = read_loss_history(tmp_path)
    assert set(hist) == {"loss/total", "loss/clip/summary"} and hist["loss/total"] == ([1, 2, 3, 4, 5], [2.0, 1.0, 2 / 3, 0.5, 0.4])
    png = plot_loss_curves(tmp_path, tmp_path / "pics" / "loss.png")
    assert matplotlib.image.imread(png).shape[-1] in (3, 4)

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 6, 6, generator=g)
    same_s, same_t = pca_pair(teacher.clone(), teacher)
    assert np.array_equal(same_s, same_t) and same_t.shape == (6, 6, 3) and 0 <= same_t.min() and same_t.max() <= 1
    flipped, _ = pca_pair(-teacher, teacher)
    assert not np.allclose(flipped, same_t)  # one shared basis: opposite features get other colours
    png = plot_pca_maps(torch.rand(3, 32, 32, generator=g), {"dino": (teacher, teacher)}, tmp_path / "pca.png")
    assert matplotlib.image.imread(png).ndim == 3


# ------------------------------------------------------------------ loading and the command line

def _export(tmp_path, cfg, student, heads):
    from safetensors.torch import save_file

    from radio_scale.config import config_to_yaml

    out = tmp_path / "export"
    out.mkdir()
    tensors = {**{f"student.{k}": v.contiguous() for k, v in student.state_dict().items()},
               **{f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()}}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_student_reads_exports_and_dcp_checkpoints_of_a_run(tmp_path, tiny):
    import torch.distributed.checkpoint as dcp

    from radio_scale.config import config_to_yaml
    from radio_scale.eval.loading import ModelLoadError, load_student

    cfg, _, student, heads = tiny
    export = _export(tmp_path, cfg, student, heads)
    s2, h2, cfg2 = load_student(export)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), s2.state_dict().values()))
    # a run directory with checkpoints only (the trainer's layout): the newest complete one is read without a process group
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    state = {f"student.{k}": v.clone() + 1.0 for k, v in student.state_dict().items()}
    state.update({f"heads.{k}": v.clone() for k, v in heads.state_dict().items()})
    ckpt = run / "checkpoints" / "step_000000004"
    dcp.save({"model": state}, checkpoint_id=str(ckpt))
    (ckpt / ".complete").write_text("{}")
    dcp.save({"model": state}, checkpoint_id=str(run / "checkpoints" / "step_000000008"))  # no marker: half-written
    s3, _, _ = load_student(run)
    key = "patch_embed.weight"
    assert torch.equal(s3.state_dict()[key], student.state_dict()[key] + 1.0)
    with pytest.raises(ModelLoadError, match="incomplete"):
        load_student(run / "checkpoints" / "step_000000008")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not an export"):
        load_student(tmp_path / "empty")


def test_radio_eval_all_on_a_tiny_exported_model_writes_every_table(tmp_path, tiny):
    from PIL import Image

    from radio_scale.eval.cli import main
    from radio_scale.eval.datasets import digits_on_photos, write_segmentation_folder

    cfg, _, student, heads = tiny
    export = _export(tmp_path, cfg, student, heads)
    # a small labelled image folder (real faces / non-faces) and a small segmentation folder
    from radio_scale.eval.datasets import classification_set

    lfw = classification_set("lfw")
    pick = lambda labels, n: torch.cat([torch.nonzero(labels == c)[:n, 0] for c in (0, 1)])  # noqa: E731
    tr, te = pick(lfw.train_labels, 12), pick(lfw.test_labels, 6)
    for split, images, labels in (("train", lfw.train_images[tr], lfw.train_labels[tr]),
                                  ("val", lfw.test_images[te], lfw.test_labels[te])):
        for i, (img, y) in enumerate(zip(images, labels)):
            d = tmp_path / "faces" / split / lfw.classnames[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(d / f"{i}.png")
    write_segmentation_folder(tmp_path / "seg", digits_on_photos(n=10, size=64, seed=2))
    out = tmp_path / "report"
    code = main(["all", "--model", str(export), "--data", str(tmp_path / "faces"), "--seg-data", str(tmp_path / "seg"),
                 "--out", str(out), "--teacher", "clip", "--epochs", "2", "--iters", "1", "--batch", "2",
                 "--max-images", "4", "--peak-tflops", "1.0", "--device", "cpu"])
    assert code == 0
    rep = json.loads((out / "eval_report.json").read_text())["results"]
    assert set(rep) == {"knn/faces", "zeroshot/faces", "segprobe/seg", "sam/seg", "fidelity/faces", "throughput"}
    assert set(rep["knn/faces"]) == {"student/head/clip", "teacher/clip"}
    assert set(rep["zeroshot/faces"]) == {"student/clip", "teacher/clip"}
    assert 0 <= rep["knn/faces"]["teacher/clip"]["top1"] <= 1 and 0 <= rep["segprobe/seg"]["student/backbone"]["miou"] <= 1
    assert 0 <= rep["sam/seg"]["student/sam"]["agreement_iou"] <= 1 and rep["sam/seg"]["student/sam"]["num_masks"] > 0
    assert rep["throughput"]["student@64"]["images_per_s"] > 0 and rep["throughput"]["student@64"]["rel_diff"] < 0.03
    md = (out / "eval_report.md").read_text()
    assert "## fidelity/faces" in md and "| clip |" in md  # --teacher clip restricts fidelity to it
    assert (out / "pca_maps.png").is_file()
    # bad input: one line naming what is wrong, exit code 1
    assert main(["knn", "--model", str(tmp_path / "nowhere")]) == 1
    assert main(["knn", "--model", str(export), "--data", "imagenet"]) == 1
