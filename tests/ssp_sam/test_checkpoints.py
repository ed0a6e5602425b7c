"""Every loader, on small files the tests write in each supported format with the official key names."""

import pytest
import torch

from ssp_sam import checkpoints
from ssp_sam.build import ModelConfig, build_model, load_model
from ssp_sam.checkpoints import CheckpointError, convert_openai_clip, map_official_key
from ssp_sam.tokenizer import load_tokenizer
from ssp_sam.versioning import weights_version
from tests.ssp_sam.helpers_clip import hf_to_openai, save_torchscript
from tests.ssp_sam.weights_files import official_state as _official_state


def _same(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix) and not k.endswith("position_ids"))


def test_official_key_map_covers_every_official_name():
    names = ["text_proj.weight_ih_l0", "clip_proj.weight", "phrase_attn.fc.bias", "mlp.weight",
             "vl_transformer.encoder.layers.0.linear1.weight", "vl_pos_embed.weight", "prompt_token.weight",
             "reg_token.weight", "norm.weight", "norm_img.bias", "bbox_embed.layers.2.bias",
             "img2text_attn.in_proj_weight", "imgtext_proj.layers.0.weight", "img_proj.layers.0.bias",
             "tf_scale", "tf_sigma", "img2img_attn.pos_x", "norm_text_cond_img.weight",
             "clip_img_proj.layers.1.weight", "sam.mask_decoder.iou_token.weight"]
    model = build_model("tiny")
    own = set(model.state_dict())
    for n in names:
        assert map_official_key(n) in own, n
    assert map_official_key("encoder.visual.conv1.weight") is None


def test_official_checkpoint_roundtrip_and_strictness(tmp_path):
    src = build_model("tiny", seed=3)
    path = tmp_path / "checkpoint_best_miou.pth"
    torch.save({"model": _official_state(src), "epoch": 80, "optimizer": {}, "args": None}, path)
    dst = build_model("tiny", seed=4)
    report = checkpoints.load_official_checkpoint(dst, path, strict=True)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert _same(src, dst, "vad.") and _same(src, dst, "prompt_generator.") and _same(src, dst, "sam.")

    state = _official_state(src)
    del state["prompt_token.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="prompt_generator.prompt_token.weight"):
        checkpoints.load_official_checkpoint(build_model("tiny"), path, strict=True)
    rep = checkpoints.load_official_checkpoint(build_model("tiny"), path, strict=False)
    assert rep.missing == ["prompt_generator.prompt_token.weight"]

    state = _official_state(src)
    state["bogus.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="bogus"):
        checkpoints.load_official_checkpoint(build_model("tiny"), path, strict=True)


def test_openai_clip_state_dict_and_torchscript(tmp_path):
    src = build_model("tiny", seed=5)
    openai = hf_to_openai(src.clip.model.state_dict())
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in openai and "text_projection" in openai
    back = convert_openai_clip(openai)
    for k, v in back.items():
        assert torch.equal(v, src.clip.model.state_dict()[k]), k

    plain = tmp_path / "CS-ViT-tiny.pt"
    torch.save(openai, plain)
    m1 = build_model("tiny", seed=6)
    rep = checkpoints.load_clip_checkpoint(m1, plain)
    assert not rep.missing and not rep.unexpected
    assert _same(src, m1, "clip.")

    jit = tmp_path / "ViT-tiny-jit.pt"
    save_torchscript({**openai, "input_resolution": torch.tensor(32)}, jit)
    m2 = build_model("tiny", seed=7)
    checkpoints.load_clip_checkpoint(m2, jit)
    assert _same(src, m2, "clip.")


def test_transformers_clip_directory(tmp_path):
    src = build_model("tiny", seed=8)
    src.clip.model.save_pretrained(tmp_path / "clip")
    dst = build_model("tiny", seed=9)
    checkpoints.load_clip_checkpoint(dst, tmp_path / "clip")
    assert _same(src, dst, "clip.")


def test_clip_of_the_wrong_size_is_a_clear_error(tmp_path):
    other = build_model("demo")
    torch.save(hf_to_openai(other.clip.model.state_dict()), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match="does not fit variant tiny"):
        checkpoints.load_clip_checkpoint(build_model("tiny"), tmp_path / "big.pt")


def test_official_checkpoint_with_mutated_surgery_keys_supplies_clip(tmp_path):
    src = build_model("tiny", seed=10)
    state = _official_state(src)
    openai = hf_to_openai(src.clip.model.state_dict())
    last = "visual.transformer.resblocks.1.attn."
    openai[last + "qkv.weight"] = openai.pop(last + "in_proj_weight")
    openai[last + "qkv.bias"] = openai.pop(last + "in_proj_bias")
    openai[last + "proj.weight"] = openai.pop(last + "out_proj.weight")
    openai[last + "proj.bias"] = openai.pop(last + "out_proj.bias")
    openai["visual.attn.qkv.weight"] = openai[last + "qkv.weight"]
    state.update({"encoder." + k: v for k, v in openai.items()})
    torch.save({"model": state}, tmp_path / "ck.pth")
    dst = build_model("tiny", seed=11)
    checkpoints.load_official_checkpoint(dst, tmp_path / "ck.pth", strict=True)
    assert _same(src, dst, "clip.")


def test_sam_checkpoint(tmp_path):
    src = build_model("tiny", seed=12)
    torch.save(src.sam.state_dict(), tmp_path / "sam_tiny.pth")
    dst = build_model("tiny", seed=13)
    rep = checkpoints.load_sam_checkpoint(dst, tmp_path / "sam_tiny.pth")
    assert not rep.missing and not rep.unexpected
    assert _same(src, dst, "sam.")
    no_enc = build_model("tiny", with_image_encoder=False)
    rep = checkpoints.load_sam_checkpoint(no_enc, tmp_path / "sam_tiny.pth")
    assert rep.ignored and not rep.missing


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a loadable weights file"):
        checkpoints.read_checkpoint(tmp_path / "evil.pth")


def test_bundle_roundtrip_through_load_model(tmp_path):
    src = build_model("tiny", seed=14)
    tok = load_tokenizer(src.spec)
    path = checkpoints.save_bundle(src, tok, tmp_path / "m.pt", meta={"note": "x"})
    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(path), device="cpu"))
    # the version names the file's content, computable without loading it (what the backend reports in /setup)
    assert loaded.version == weights_version("tiny", str(path)) and loaded.version.startswith("tiny-")
    assert loaded.spec == src.spec and loaded.meta["note"] == "x"
    assert load_model(ModelConfig(variant="tiny", checkpoint=str(path), version="v7")).version == "v7"
    assert _same(src, loaded.model)
    assert loaded.tokenizer(["the red circle"]).tolist() == tok(["the red circle"]).tolist()
    half = checkpoints.save_bundle(src, tok, tmp_path / "h.pt", half=True)
    assert half.stat().st_size < path.stat().st_size


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(ModelConfig(variant="tiny", checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(ValueError, match="unknown SSP-SAM variant"):
        load_model(ModelConfig(variant="ssp-sam-999"))
