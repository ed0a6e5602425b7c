"""Parity with the official implementation (the golden folder of SSP_SAM_GOLDEN_DIR) and the predict CLI's output
files."""

import numpy as np
import pytest
import torch
from PIL import Image

from ssp_sam import checkpoints
from ssp_sam.build import build_model
from backend.cli import main
from ssp_sam.golden import rule_tensor, run_check
from ssp_sam.tokenizer import load_tokenizer
from ssp_sam.versioning import weights_version


def test_weight_rule_matches_reference_digest():
    # one tensor of the reference implementation in rule.md, checked by value properties
    a = rule_tensor("tf_sigma", (1,), "")
    assert a.tolist() == [0.5]
    b = rule_tensor("clip_proj.weight", (4, 8), "")
    assert b.dtype == np.dtype("<f4") and abs(float(b.std()) * np.sqrt(8) - 1) < 0.6
    assert not np.array_equal(b, rule_tensor("clip_proj.weight", (4, 8), "salt"))


@pytest.mark.slow
def test_golden_parity(golden_dir):
    ok, rows = run_check(golden_dir, verbose=True)
    worst = {r["tensor"]: max(x["max_abs"] for x in rows if x["tensor"] == r["tensor"]) for r in rows}
    assert ok, worst
    assert worst["token_ids"] == 0 and worst["logits"] < 1e-4


def test_check_golden_command_fails_on_a_wrong_folder(tmp_path, golden_dir):
    # same cases with a different salt: the regenerated weights no longer produce the references
    import json
    import shutil
    for name in ("keys.json", "case0.npz"):
        shutil.copy(f"{golden_dir}/{name}", tmp_path / name)
    manifest = json.load(open(f"{golden_dir}/manifest.json"))
    manifest.update(salt="other-salt", cases=["case0"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check-golden", str(tmp_path)]) == 1


def test_predict_cli_writes_mask_and_overlay(tmp_path, capsys):
    model = build_model("tiny", seed=0)
    bundle = checkpoints.save_bundle(model, load_tokenizer(model.spec), tmp_path / "tiny.pt")
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:40] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "out" / "overlay.png"
    rc = main(["predict", str(tmp_path / "in.png"), "the red square", "--out", str(out),
               "--variant", "tiny", "--checkpoint", str(bundle), "--device", "cpu"])
    assert rc == 0
    assert Image.open(out).size == (60, 40)
    mask = np.asarray(Image.open(tmp_path / "out" / "overlay_mask.png"))
    assert mask.shape == (40, 60) and set(np.unique(mask)) <= {0, 255}
    assert weights_version("tiny", str(bundle)) in capsys.readouterr().out
    torch.set_grad_enabled(True)
