"""The RADIO-format export, checked against the contract (../shared/radio_checkpoint_contract.md) without RADIO's code:
keys, shapes and `args` fields as RADIO's hubconf reads them, and a re-implementation of RADIO's forward from the
contract that must give the same summary, features and adaptor outputs as radio_scale's own loader."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from radio_scale.config import load_config
from radio_scale.eval.loading import load_student
from radio_scale.train.export import export_student
from radio_scale.train.radio_export import RadioExportError, export_radio
from radio_scale.train.trainer import build_model

# every attribute RADIO's create_model_from_args / hubconf reads from args without a default
REQUIRED_ARGS = ("model", "model_kwargs", "pretrained", "in_chans", "num_classes", "drop", "drop_path", "drop_block",
                 "gp", "bn_momentum", "bn_eps", "torchscript", "initial_checkpoint", "cpe_max_size",
                 "cls_token_per_teacher", "teachers", "spectral_reparam", "mlp_version", "input_size")


def _export(tmp_path, overrides):
    cfg = load_config("smoke", overrides)
    model, specs = build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # nothing at its initial value (prefix tokens start near 0)
        model.student.train()
        for _ in range(3):  # σReparam's power iteration moves on, as in training
            model.student(torch.randn(2, 3, 64, 64))
    out = tmp_path / "export"
    export_student(model, cfg, specs, out, is_main=True)
    return out


class ContractRADIO(nn.Module):
    """RADIO's inference forward, written from the contract: conditioner, CPE patch generator, timm blocks, adaptors."""

    def __init__(self, chk: dict):
        super().__init__()
        args, sd = chk["args"], chk["state_dict"]
        kw = {k: v for k, v in args.model_kwargs.items() if k != "weight_init"}
        vit = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kw)
        blocks = {k[len("base_model.blocks."):]: v for k, v in sd.items() if k.startswith("base_model.blocks.")}
        vit.blocks.load_state_dict(blocks, strict=True)
        vit.norm.load_state_dict({"weight": sd["base_model.norm.weight"], "bias": sd["base_model.norm.bias"]}, strict=True)
        self.blocks, self.norm = vit.blocks, (vit.norm if args.model_norm else nn.Identity())
        self.p = kw["patch_size"]
        self.grid = args.cpe_max_size // self.p
        self.embed = sd["base_model.patch_generator.embedder.weight"]
        self.pos = sd["base_model.patch_generator.pos_embed"]
        self.token = sd["base_model.patch_generator.cls_token.token"]
        self.mean, self.std = sd["input_conditioner.norm_mean"], sd["input_conditioner.norm_std"]
        names = {}
        for i, t in enumerate(args.teachers):
            if t.get("use_summary", True):
                names.setdefault(t["name"], i)
        self.summary_idxs = sorted(names.values())
        self.num_cls = len({t["name"] for t in args.teachers})
        self.num_skip = self.num_cls + (args.cpe_num_registers or 0)
        self.teachers = args.teachers
        self.sd = sd

    def mlp(self, prefix, x):
        sd = self.sd
        x = F.linear(x, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"])
        x = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.final.0.weight"], sd[f"{prefix}.final.0.bias"])
        return F.linear(F.gelu(x), sd[f"{prefix}.final.2.weight"], sd[f"{prefix}.final.2.bias"])

    def forward(self, x):
        x = (x - self.mean) / self.std
        b, _, h, w = x.shape
        gh, gw = h // self.p, w // self.p
        patches = x.reshape(b, 3, gh, self.p, gw, self.p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        tokens = patches @ self.embed.t()
        pos = self.pos
        if (gh, gw) != (self.grid, self.grid):
            g = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            side = max(gh, gw)
            g = F.interpolate(g, size=(side, side), mode="bilinear", align_corners=False)[:, :, :gh, :gw]
            pos = g.flatten(2).transpose(1, 2)
        y = torch.cat([self.token.unsqueeze(0).expand(b, -1, -1), tokens + pos], dim=1)
        y = self.norm(self.blocks(y))
        summary = y[:, self.summary_idxs].flatten(1)
        feats = y[:, self.num_skip:]
        out = {"backbone": (summary, feats)}
        for t in self.teachers:
            slot = t.get("token_slot")
            out[t["name"]] = (self.mlp(f"_heads.{t['name']}", y[:, slot]), self.mlp(f"_feature_projections.{t['name']}", feats))
        return out


def test_radio_export_matches_the_contract_and_our_loader(tmp_path):
    export = _export(tmp_path, ["student.num_registers=2", "student.spectral_reparam=true", "student.cpe_grid=12"])
    path = export_radio(export)
    chk = torch.load(path, weights_only=False)
    args, sd = chk["args"], chk["state_dict"]
    for a in REQUIRED_ARGS:
        assert hasattr(args, a), a
    assert args.cls_token_per_teacher and args.model_norm and not args.spectral_reparam and args.mlp_version == "v2"
    student, heads, cfg = load_student(export)
    # teachers: summary teachers first in token order, then the spatial-only SAM in the first register's slot
    assert [t["name"] for t in args.teachers] == ["clip", "dino", "effnet", "sam"]
    assert [t["use_summary"] for t in args.teachers] == [True, True, True, False]
    assert all(not t["type"].startswith(("open_clip", "siglip")) for t in args.teachers)  # no text-tower download
    assert args.cpe_num_registers == 1 and sd["base_model.patch_generator.cls_token.token"].shape == (3 + 2, 96)
    assert args.cpe_max_size == 12 * 16 and sd["base_model.patch_generator.pos_embed"].shape == (1, 144, 96)
    assert sd["base_model.patch_generator.embedder.weight"].shape == (96, 3 * 16 * 16)
    assert not any(k.endswith((".u", ".v", ".gamma")) for k in sd)  # σReparam baked into plain weights
    assert set(sd["input_conditioner.norm_mean"].shape) == {3, 1}
    for t in args.teachers:
        assert f"_heads.{t['name']}.fc1.weight" in sd and f"_feature_projections.{t['name']}.final.2.weight" in sd
    radio = ContractRADIO(chk).eval()
    from radio_scale.data.views import STUDENT_MEAN, STUDENT_STD

    mean, std = torch.tensor(STUDENT_MEAN).view(1, 3, 1, 1), torch.tensor(STUDENT_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    for h, w in [(64, 64), (96, 96), (192, 192), (64, 128), (128, 96)]:  # grid resized, the grid itself, non-square
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            got = radio(x)
            ours = student((x - mean) / std)
            preds = heads(ours, run_unused=False)
        summary = torch.cat([ours.summary[n] for n in student.summary_teachers], dim=1)
        torch.testing.assert_close(got["backbone"][0], summary, atol=1e-4, rtol=0)
        torch.testing.assert_close(got["backbone"][1], ours.patches.flatten(2).transpose(1, 2), atol=1e-4, rtol=0)
        for name, pred in preds.items():
            spatial = got[name][1].transpose(1, 2).reshape(pred.spatial.shape)
            torch.testing.assert_close(spatial, pred.spatial, atol=1e-4, rtol=0, msg=lambda m: f"{name} {h}x{w}: {m}")
            if pred.summary is not None:
                torch.testing.assert_close(got[name][0], pred.summary, atol=1e-4, rtol=0)
            else:
                assert torch.count_nonzero(got[name][0]) == 0  # the dummy summary head of a spatial-only teacher


def test_radio_export_refuses_what_it_cannot_express_in_one_line(tmp_path):
    export = _export(tmp_path, [])  # no registers: no slot for SAM's token
    with pytest.raises(RadioExportError, match=r"spatial-only teacher\(s\) \['sam'\].*--adaptors clip,dino,effnet") as e:
        export_radio(export)
    assert "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "radio_scale.train.radio_export", str(export)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "radio-export:" in r.stderr
    # leaving SAM out is expressible: three teachers, three CLS tokens, no registers
    out = export_radio(export, tmp_path / "radio.pth", adaptors=["clip", "dino", "effnet"])
    chk = torch.load(out, weights_only=False)
    assert [t["name"] for t in chk["args"].teachers] == ["clip", "dino", "effnet"] and chk["args"].cpe_num_registers == 0


@pytest.mark.parametrize("arch", ["eradio_pico", "timm:convnext_atto"])
def test_radio_export_refuses_a_non_vit_student_naming_student_arch(tmp_path, arch):
    kw = ["student.timm_kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 64, 128]}"] if arch.startswith("timm:") else []
    cfg = load_config("smoke", [f"student.arch={arch}", *kw])
    model, specs = build_model(cfg)
    export = export_student(model, cfg, specs, tmp_path / "export", is_main=True)
    with pytest.raises(RadioExportError, match=rf"student.arch '{arch}' is not a ViT") as e:
        export_radio(export)
    assert "\n" not in str(e.value)
    assert not (export / "radio_model.pth").exists()
    r = subprocess.run([sys.executable, "-m", "radio_scale.train.radio_export", str(export)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"student.arch '{arch}'" in r.stderr
