"""PHI-S teacher standardisation: Hadamard matrices, the transform, held-out statistics, training, export, resume."""
from __future__ import annotations

import shutil

import pytest
import torch

from radio_scale.config import ConfigError, load_config
from radio_scale.losses.phis import feature_rows, hadamard, hadamard_order_supported, stats_of, transform_from_stats


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 32, 96, 256, 768, 1280, 1536])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


def test_widths_without_a_hadamard_matrix_are_refused_by_name(monkeypatch):
    assert not hadamard_order_supported(100) and hadamard_order_supported(1280)
    with pytest.raises(ValueError, match="order 100"):
        hadamard(100)
    import radio_scale.losses.phis as phis

    monkeypatch.setattr(phis, "hadamard_order_supported", lambda n: n != 1280)
    with pytest.raises(ConfigError, match="teacher 'effnet' has summary width 1280") as e:
        load_config("smoke", ["loss.standardize=phi_s"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loss.standardize_batches"):
        load_config("smoke", ["loss.standardize=phi_s", "loss.standardize_batches=0"])


def test_standardised_teacher_features_have_zero_mean_and_unit_variance_on_held_out_images():
    """Real images (lfw), the smoke recipe's DINOv2 and the real EfficientNet-Lite0: estimate on lfw/train,
    check on lfw/val, images the estimate never saw."""
    from radio_scale.data import ViewSpec, build_loader, bundled_shards
    from radio_scale.teachers import build_teacher

    cfg = load_config("smoke")
    for name in ("dino", "effnet"):
        teacher = build_teacher(cfg.teacher(name))
        view = ViewSpec(name, teacher.input_size, tuple(teacher.mean), tuple(teacher.std))
        feats = {}
        for split in ("train", "val"):
            shards = bundled_shards(f"lfw/{split}")
            loader = build_loader(shards, 32, [view], 32, seed=0, num_workers=0, resampled=False, crop_scale=None)
            rows = []
            for i, batch in enumerate(loader):
                if i == 12:
                    break
                with torch.no_grad():
                    rows.append(feature_rows(teacher(batch.normalized("cpu").teachers[name]).spatial.float()))
            feats[split] = torch.cat(rows)
        c = feats["train"].shape[1]
        mean, tx, inv = transform_from_stats(stats_of(feats["train"], c), c)
        held = (feats["val"] - mean) @ tx.T
        train = (feats["train"] - mean) @ tx.T
        # on the estimation data: exactly zero mean and unit variance in every dimension
        assert train.mean(0).abs().max() < 1e-3 and (train.var(0) - 1).abs().max() < 1e-2, name
        # orthogonal up to one scale, and invertible
        gram = tx.double() @ tx.double().T
        s2 = float(gram.diagonal().mean())
        assert (gram / s2 - torch.eye(c, dtype=gram.dtype)).abs().max() < 1e-4
        torch.testing.assert_close((held @ inv.T + mean), feats["val"], atol=1e-3, rtol=1e-4)
        # held-out images: near zero mean, unit variance on average over dimensions
        assert held.mean(0).abs().mean() < 0.35, (name, float(held.mean(0).abs().mean()))
        assert 0.5 < float(held.var(0).mean()) < 2.0, (name, float(held.var(0).mean()))


def test_training_with_phi_s_and_the_export_bakes_the_inverse(tmp_path):
    from test_precision import _run

    rep = _run("phi_s", tmp_path)
    # stage 0's teachers are estimated when the stage starts; SAM (stage 1 only) is not
    assert rep["ready"] == {"clip/summary": True, "clip/spatial": True, "dino/summary": True, "dino/spatial": True,
                            "sam/spatial": False, "effnet/summary": True, "effnet/spatial": True}
    assert rep["orthogonality"] < 1e-5 and rep["inverse"] < 1e-4
    assert rep["finite"]
    # standardised targets: every teacher's terms start on one scale
    assert all(0.5 < v < 2.0 for v in rep["terms"].values()), rep["terms"]
    assert max(rep["export_vs_live"].values()) < 1e-4, rep["export_vs_live"]


def test_phi_s_estimate_survives_a_resume_bit_for_bit(tmp_path):
    from launch_helpers import FAST, events, run_launch
    from radio_scale.train.checkpoint import list_complete, load_model_weights
    from safetensors.torch import load_file

    overrides = [*FAST, "loss.standardize=phi_s", "loss.standardize_batches=3"]
    a = tmp_path / "a"
    r = run_launch(a, overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    est = [e for e in events(a) if e["kind"] == "phi_s"]
    assert len(est) == 2 and "sam/spatial" in est[1]["message"] and "sam" not in est[0]["message"]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "export")
    for p in list_complete(b / "checkpoints"):
        if int(p.name.split("_")[1]) > 6:
            shutil.rmtree(p)
    r = run_launch(b, overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert [e for e in events(b) if e["kind"] == "phi_s"] == est  # resumed from step 6: nothing re-estimated
    wa = load_model_weights(a / "checkpoints" / "step_000000008")
    wb = load_model_weights(b / "checkpoints" / "step_000000008")
    std_keys = [k for k in wa if k.startswith("standardizer.")]
    assert len(std_keys) >= 3 * 7
    for k in std_keys:
        assert torch.equal(wa[k], wb[k]), k
    ea, eb = load_file(str(a / "export" / "model.safetensors")), load_file(str(b / "export" / "model.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
