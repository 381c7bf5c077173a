"""The student backbone: resolutions, windowed attention, CPE, spectral reparametrisation, heads, analytic cost."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from radio_scale.config.schema import StudentConfig
from radio_scale.models import (
    AdaptorHeads,
    SpectralLinear,
    build_student,
    student_forward_flops,
    student_param_count,
)
from radio_scale.models.presets import STUDENT_PRESETS
from radio_scale.models.student import Attention

TINY = StudentConfig(arch="vit_pico16", patch_size=8, embed_dim=32, depth=3, num_heads=2, cpe_grid=16,
                     num_registers=1, window_sizes=(0, 2))
TEACHERS = ["clip", "dino"]


def tiny_student(**overrides):
    torch.manual_seed(0)
    return build_student(replace(TINY, **overrides), TEACHERS).eval()


def images(b=2, h=32, w=32, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (64, 64), (32, 56)])
@pytest.mark.parametrize("window", [None, 3])
def test_student_outputs_one_summary_per_teacher_and_a_patch_grid_at_any_multiple_of_the_patch(hw, window):
    model = tiny_student()
    out = model(images(h=hw[0], w=hw[1]), window_size=window)
    assert set(out.summary) == set(TEACHERS)
    assert all(s.shape == (2, 32) for s in out.summary.values())
    assert out.patches.shape == (2, 32, hw[0] // 8, hw[1] // 8)
    assert torch.isfinite(out.patches).all()


def test_windowed_attention_changes_the_output_but_uses_the_same_weights():
    model = tiny_student()
    x = images(h=48, w=48)
    n_params = sum(p.numel() for p in model.parameters())
    glob, win = model(x, window_size=0), model(x, window_size=2)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert (glob.patches - win.patches).abs().max() > 1e-3
    assert (glob.summary["clip"] - win.summary["clip"]).abs().max() > 1e-5
    torch.testing.assert_close(model(x, window_size=None).patches, glob.patches)


def test_a_window_covering_the_whole_grid_is_global_attention():
    model = tiny_student()
    x = images(h=32, w=48)  # 4 x 6 patch grid
    glob = model(x, window_size=0)
    for ws in (6, 7):
        covered = model(x, window_size=ws)
        torch.testing.assert_close(covered.patches, glob.patches)


def test_windowed_attention_equals_full_attention_masked_to_window_plus_prefix():
    # 3 x 5 grid with 2 x 2 windows: the grid is padded to 4 x 6 and the padding must never be attended.
    torch.manual_seed(0)
    prefix, (h, w), ws, dim = 2, (3, 5), 2, 16
    attn = Attention(dim, num_heads=2, num_prefix_tokens=prefix).eval()
    x = torch.randn(2, prefix + h * w, dim)
    n = prefix + h * w
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:prefix, :] = True  # prefix tokens see everything
    allowed[:, :prefix] = True  # every patch sees the prefix tokens
    for i in range(h * w):
        for j in range(h * w):
            same = (i // w) // ws == (j // w) // ws and (i % w) // ws == (j % w) // ws
            allowed[prefix + i, prefix + j] = same
    q, k, v = attn.qkv(x).reshape(2, n, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, n, dim))
    torch.testing.assert_close(attn(x, ws, (h, w)), ref, rtol=1e-5, atol=1e-6)


def test_a_windowed_block_keeps_patches_in_their_window_while_summary_tokens_see_the_whole_image():
    model = tiny_student(depth=1)
    x = images(h=32, w=32)  # 4 x 4 patches, windows of 2 x 2 patches
    y = x.clone()
    y[:, :, :8, :8] += 1.0  # change only the top-left patch
    a, b = model(x, window_size=2), model(y, window_size=2)
    changed = (a.patches - b.patches).abs().amax(dim=(0, 1)) > 1e-6  # [4, 4] patch grid
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True  # the top-left window only
    assert torch.equal(changed, expected)
    assert (a.summary["clip"] - b.summary["clip"]).abs().max() > 1e-6
    g1, g2 = model(x, window_size=0), model(y, window_size=0)
    assert ((g1.patches - g2.patches).abs().amax(dim=(0, 1)) > 1e-6).all()  # global: every patch changes


def test_global_blocks_ignore_the_window_size():
    model = tiny_student(global_blocks=(1,))
    assert [blk.always_global for blk in model.blocks] == [False, True, False]
    grid = (6, 6)
    tokens = torch.randn(2, model.num_prefix_tokens + 36, 32)
    for i, blk in enumerate(model.blocks):
        same = torch.allclose(blk(tokens, 2, grid), blk(tokens, 0, grid))
        assert same == (i == 1), f"block {i}"
    all_global = tiny_student(global_blocks=(0, 1, 2))
    x = images(h=48, w=48)
    torch.testing.assert_close(all_global(x, window_size=2).patches, all_global(x, window_size=0).patches)


def test_cpe_crops_randomly_in_training_and_resizes_the_whole_grid_in_eval():
    model = tiny_student()
    cpe = model.cpe
    cpe.train()
    a, b = cpe(4, 6, 2), cpe(4, 6, 2)
    assert a.shape == (2, 32, 4, 6)
    assert (a - b).abs().max() > 1e-4  # two draws differ
    assert (a[0] - a[1]).abs().max() > 1e-4  # each sample has its own crop
    cpe.eval()
    e1, e2 = cpe(4, 6, 2), cpe(4, 6, 2)
    torch.testing.assert_close(e1, e2)
    # RADIO's inference rule: resize to the longer side, square, then the top-left 4 x 6
    square = F.interpolate(cpe.pos, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(e1[0], square[0, :, :4, :6])
    torch.testing.assert_close(cpe(6, 6, 1), square)
    assert cpe(16, 16, 2) is cpe.pos  # the grid's own size: the grid itself


def test_a_full_area_square_crop_equals_the_eval_resize():
    model = tiny_student(cpe_scale=(1.0, 1.0), cpe_ratio=(1.0, 1.0))
    cpe = model.cpe
    cpe.train()
    for h, w in [(5, 5), (9, 9)]:  # training views are square; there the eval rule is a plain resize of the grid
        cpe.train()
        crop = cpe(h, w, 3)
        cpe.eval()
        whole = cpe(h, w, 3)
        torch.testing.assert_close(crop, whole.expand_as(crop), rtol=1e-5, atol=1e-6)
    # non-square at eval: RADIO's rule (resize to the longer side, square, top-left h x w), not a full-area stretch
    cpe.train()
    stretch = cpe(5, 7, 1)
    cpe.eval()
    assert not torch.allclose(stretch, cpe(5, 7, 1), atol=1e-4)


def test_cpe_crops_stay_inside_the_grid_with_area_and_aspect_in_range():
    cpe = tiny_student(cpe_scale=(0.3, 0.6), cpe_ratio=(0.5, 2.0)).cpe
    cpe.generator = torch.Generator().manual_seed(0)
    cx, cy, hw, hh = cpe.crop_boxes(2000).unbind(1)
    assert ((cx.abs() + hw) <= 1 + 1e-6).all() and ((cy.abs() + hh) <= 1 + 1e-6).all()
    area, aspect = hw * hh, hw / hh
    unclamped = (hw < 1) & (hh < 1)
    assert area[unclamped].min() >= 0.3 - 1e-6 and area.max() <= 0.6 + 1e-6
    assert aspect[unclamped].min() >= 0.5 - 1e-5 and aspect[unclamped].max() <= 2.0 + 1e-5
    assert area.max() - area.min() > 0.2 and cx.std() > 0.1  # and they do vary


def test_seeded_training_forwards_are_reproducible():
    def run(seed):
        torch.manual_seed(seed)
        model = build_student(TINY, TEACHERS).train()
        return model(images(h=48, w=40), window_size=2).patches

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert (run(0) - run(1)).abs().max() > 1e-3
    model = tiny_student().train()  # a dedicated generator makes the crops independent of the global RNG
    model.cpe.generator = torch.Generator().manual_seed(5)
    first = model(images())
    model.cpe.generator = torch.Generator().manual_seed(5)
    torch.manual_seed(123)
    torch.testing.assert_close(model(images()).patches, first.patches, rtol=0, atol=0)


def test_spectral_reparam_wraps_every_attention_and_mlp_linear():
    model = tiny_student(spectral_reparam=True)
    for blk in model.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert isinstance(lin, SpectralLinear)
    assert not any(isinstance(m, SpectralLinear) for m in tiny_student().modules())
    # FSDP2 (fully_shard) refuses 0-dim parameters.
    assert all(p.dim() >= 1 for p in model.parameters())


def test_spectral_reparam_effective_weight_has_spectral_norm_gamma():
    torch.manual_seed(0)
    lin = SpectralLinear(48, 96)
    # Initialised so the layer is the plain linear map: γ = σ(W).
    torch.testing.assert_close(lin.effective_weight(), lin.weight, rtol=1e-4, atol=1e-6)
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    torch.testing.assert_close(lin.gamma.detach()[0], sigma, rtol=1e-3, atol=0)
    with torch.no_grad():
        lin.gamma.fill_(2.5)
        lin.weight.mul_(7.0)  # σ(W) changes; the power iteration tracks it during training
    lin.train()
    for _ in range(5):
        lin(torch.randn(4, 48))
    eff = lin.effective_weight().detach()
    torch.testing.assert_close(torch.linalg.matrix_norm(eff, ord=2), torch.tensor(2.5), rtol=1e-3, atol=0)
    lin(torch.randn(4, 48)).sum().backward()
    assert lin.gamma.grad is not None and lin.gamma.grad.abs().item() > 0


def test_activation_checkpointing_keeps_outputs_and_gradients_and_saves_less():
    x = images(h=40, w=48)

    def run(checkpointing):
        # spectral reparam: its power iteration updates state in training forwards, so each run starts fresh
        model = tiny_student(spectral_reparam=True, drop_path=0.2).train()  # DropPath: masks must be replayed
        model.set_activation_checkpointing(checkpointing)
        assert all(blk.checkpointing == checkpointing for blk in model.blocks)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, window_size=2).patches
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        buffers = [b.clone() for b in model.buffers()]
        return out.detach(), grads, sum(saved), buffers

    ref, ref_grads, ref_bytes, ref_buffers = run(False)
    out, grads, ckpt_bytes, buffers = run(True)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    for b, r in zip(buffers, ref_buffers):  # the recompute does not advance the power iteration a second time
        torch.testing.assert_close(b, r)
    assert ckpt_bytes < 0.5 * ref_bytes, (ckpt_bytes, ref_bytes)  # only block inputs are kept


def test_bad_inputs_raise_one_line_errors_naming_the_problem():
    model = tiny_student()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="window_size"):
        model(torch.zeros(1, 3, 32, 32), window_size=-1)
    with pytest.raises(ValueError, match="student.global_blocks"):
        build_student(replace(TINY, global_blocks=(3,)), TEACHERS)
    with pytest.raises(ValueError, match="student.arch"):
        build_student(replace(TINY, arch="vit_zz"), TEACHERS)
    with pytest.raises(ValueError, match="student.num_heads"):
        build_student(replace(TINY, num_heads=5), TEACHERS)


def test_explicit_dims_override_the_preset():
    model = build_student(StudentConfig(arch="vit_pico16", embed_dim=48, depth=3, num_heads=4, cpe_grid=8), ["a"])
    assert model.embed_dim == 48 and len(model.blocks) == 3 and model.blocks[0].attn.num_heads == 4
    assert model.patch_size == STUDENT_PRESETS["vit_pico16"].patch_size


def test_param_count_matches_the_built_model():
    for sc in (TINY, replace(TINY, spectral_reparam=True, num_registers=3)):
        model = build_student(sc, TEACHERS)
        assert student_param_count(sc, len(TEACHERS)) == sum(p.numel() for p in model.parameters())


def test_flops_match_the_design_numbers_for_vit_h16():
    vit_h = StudentConfig(arch="vit_h16")
    assert student_forward_flops(vit_h, 432) == pytest.approx(1007e9, rel=0.05)
    assert student_forward_flops(vit_h, 1024) == pytest.approx(7913e9, rel=0.05)
    windowed = replace(vit_h, global_blocks=(7, 15, 23, 31))
    # window 16 on a 64x64 grid: 28 of 32 blocks pay 1/16 of the attention term
    assert student_forward_flops(windowed, 1024, window_size=16) < 0.75 * student_forward_flops(vit_h, 1024)
    assert student_forward_flops(windowed, 1024, window_size=64) == student_forward_flops(vit_h, 1024)


@pytest.mark.parametrize("hw,window", [((48, 48), 0), ((40, 56), 2), ((48, 40), 4)])
def test_flops_equal_the_counted_flops_of_the_real_forward(hw, window):
    sc = replace(TINY, global_blocks=(1,))
    model = build_student(sc, TEACHERS).eval()
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as counted batched matmuls (the fused CPU kernel is not counted).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, *hw), window_size=window)
    analytic = student_forward_flops(sc, hw, window_size=window, num_summary_tokens=len(TEACHERS))
    assert analytic == pytest.approx(counter.get_total_flops(), rel=1e-6)


def spec(name, embed_dim, summary_dim, has_summary):
    return SimpleNamespace(name=name, embed_dim=embed_dim, summary_dim=summary_dim, has_summary=has_summary)


HEAD_TEACHERS = [spec("clip", 24, 16, True), spec("dino", 20, 20, True), spec("sam", 40, 0, False)]


def test_adaptor_heads_map_student_features_to_each_teacher_width():
    model = tiny_student()
    torch.manual_seed(0)
    heads = AdaptorHeads(32, HEAD_TEACHERS)
    assert heads.hidden_dim == 40
    assert set(heads.summary) == {"clip", "dino"} and set(heads.spatial) == {"clip", "dino", "sam"}
    for mlp in list(heads.summary.values()) + list(heads.spatial.values()):
        kinds = [type(m).__name__ for m in mlp]
        assert kinds == ["Linear", "LayerNorm", "GELU", "Linear"]
        assert mlp[0].in_features == 32 and mlp[0].out_features == 40
    out = model(images(h=32, w=48))
    preds = heads(out)
    assert preds["clip"].summary.shape == (2, 16) and preds["clip"].spatial.shape == (2, 24, 4, 6)
    assert preds["dino"].summary.shape == (2, 20) and preds["dino"].spatial.shape == (2, 20, 4, 6)
    assert preds["sam"].summary is None and preds["sam"].spatial.shape == (2, 40, 4, 6)
    with pytest.raises(ValueError, match="unknown teacher 'eva'"):
        heads(out, ["eva"])


def test_unused_heads_run_at_zero_weight_so_every_rank_touches_every_head():
    model = tiny_student()
    torch.manual_seed(0)
    heads = AdaptorHeads(32, HEAD_TEACHERS)
    with torch.no_grad():
        out = model(images())
    preds = heads(out, ["sam"])
    assert list(preds) == ["sam"]
    plain = heads(out, ["sam"], run_unused=False)
    torch.testing.assert_close(preds["sam"].spatial, plain["sam"].spatial, rtol=0, atol=0)
    preds["sam"].spatial.square().mean().backward()
    for name in ("clip", "dino"):
        for p in list(heads.summary[name].parameters()) + list(heads.spatial[name].parameters()):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.spatial["sam"].parameters())
    heads.zero_grad(set_to_none=True)
    heads(out, ["sam"], run_unused=False)["sam"].spatial.sum().backward()
    assert heads.spatial["clip"][0].weight.grad is None
