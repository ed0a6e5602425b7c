"""The model's components with tiny random weights: shapes, frames, freezing, CLIP Surgery semantics."""

import torch

from ssp_sam.build import VARIANTS, build_model, clip_config, get_spec
from ssp_sam.modeling.adapters import similarity_map
from ssp_sam.modeling.clip_surgery import CLIPSurgery
from ssp_sam.tokenizer import load_tokenizer


def _inputs(spec, b=2):
    return (torch.randn(b, 3, spec.clip_image_size, spec.clip_image_size),
            torch.randn(b, 3, spec.sam_image_size, spec.sam_image_size))


def test_forward_shapes_tiny():
    model = build_model("tiny", seed=0).eval()
    spec = model.spec
    ids = load_tokenizer(spec)(["the red circle", "a large blue square on the left"])
    clip_img, sam_img = _inputs(spec)
    out = model(None, clip_img, ids, sam_images=sam_img)
    emb = spec.embedding_size
    assert out.logits.shape == (2, 1, spec.frame_size, spec.frame_size)
    assert out.low_res_logits.shape == (2, 1, 4 * emb, 4 * emb)
    assert out.box.shape == (2, 4) and bool(((out.box > 0) & (out.box < 1)).all())
    assert out.prompts.shape == (2, spec.num_prompts, spec.prompt_dim)


def test_cached_features_give_identical_output():
    model = build_model("tiny", seed=1).eval()
    ids = load_tokenizer(model.spec)(["a red star", "the second square"])
    clip_img, sam_img = _inputs(model.spec)
    with torch.no_grad():
        full = model(None, clip_img, ids, sam_images=sam_img)
        emb = model.encode_image(sam_img)
        cached = model(emb, None, ids, image_tokens=model.encode_clip_image(clip_img),
                       text_features=model.encode_text(ids))
    assert torch.equal(full.logits, cached.logits)


def test_box_only_mode_skips_sam():
    model = build_model("tiny", seed=0).eval()
    ids = load_tokenizer(model.spec)(["x"])
    out = model(None, torch.randn(1, 3, 32, 32), ids, box_only=True)
    assert out.logits is None and out.box.shape == (1, 4)


def test_text_changes_the_mask():
    model = build_model("tiny", seed=2).eval()
    tok = load_tokenizer(model.spec)
    clip_img, sam_img = _inputs(model.spec, 1)
    with torch.no_grad():
        a = model(None, clip_img, tok(["the red circle"]), sam_images=sam_img).logits
        b = model(None, clip_img, tok(["the blue square on the right"]), sam_images=sam_img).logits
    assert (a - b).abs().max() > 1e-4


def test_trainable_parts_follow_the_recipe():
    model = build_model("ssp-sam-224", with_image_encoder=False)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "clip" not in trainable and "unused" not in trainable
    assert not any(p.requires_grad for p in model.sam.prompt_encoder.parameters())
    assert all(p.requires_grad for p in model.sam.mask_decoder.transformer.parameters())
    dec = model.sam.mask_decoder
    assert not any(p.requires_grad for p in dec.iou_prediction_head.parameters())  # never gets a gradient
    # the paper's 18.37 M trainable parameters: the SSP modules incl. the two unused ones + the whole mask decoder
    assert _paper_count(model) == 18_373_611


def _paper_count(model) -> int:
    frozen = ("clip.", "sam.image_encoder.", "sam.prompt_encoder.")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(frozen))


def test_336_variant_trainable_count():
    assert _paper_count(build_model("ssp-sam-336", with_image_encoder=False)) == 18_733_035


def test_similarity_map_normalises_along_tokens_and_minmax():
    tokens = torch.randn(2, 1 + 16, 8)
    sentence = torch.randn(2, 8)
    patches, sim = similarity_map(tokens, sentence)
    ref = tokens / tokens.norm(dim=1, keepdim=True)
    assert torch.allclose(patches, ref[:, 1:])
    assert sim.shape == (2, 16, 1)
    assert torch.allclose(sim.amin(dim=1), torch.zeros(2, 1)) and torch.allclose(sim.amax(dim=1), torch.ones(2, 1))


def test_surgery_keeps_cls_of_original_path():
    spec = get_spec("tiny")
    clip = CLIPSurgery(clip_config(spec), surgery_layers=1).eval()
    clip_plain = CLIPSurgery(clip_config(spec), surgery_layers=0).eval()
    clip_plain.load_state_dict(clip.state_dict())
    x = torch.randn(1, 3, spec.clip_image_size, spec.clip_image_size)
    with torch.no_grad():
        s, p = clip.encode_image(x), clip_plain.encode_image(x)
    assert torch.allclose(s[:, 0], p[:, 0], atol=1e-6)      # CLS from the original path
    assert not torch.allclose(s[:, 1:], p[:, 1:], atol=1e-4)  # patches from the v-v path
    # the plain path equals transformers' own vision forward
    with torch.no_grad():
        hf = clip_plain.model.vision_model(pixel_values=x).last_hidden_state
        ref = clip_plain.model.visual_projection(clip_plain.model.vision_model.post_layernorm(hf))
    assert torch.allclose(p, ref, atol=1e-5)


def test_variant_registry_has_documented_names():
    for name in ("ssp-sam-224", "ssp-sam-336", "demo", "tiny", "ssp-sam-224-vit-b"):
        assert name in VARIANTS
    assert VARIANTS["ssp-sam-224"].frame_size == 512
    assert VARIANTS["ssp-sam-224"].no_target_min_pixels == 50


def test_batched_decoder_equals_segment_anything_per_sample():
    model = build_model("tiny", seed=3).eval()
    emb, prompts = torch.randn(3, 32, 8, 8), torch.randn(3, 8, 32)
    pe = model.sam.prompt_encoder
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 8, 8)
    with torch.no_grad():
        batched = model.decode_masks(emb, prompts)
        ref = torch.cat([model.sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                                                sparse_prompt_embeddings=prompts[i:i + 1],
                                                dense_prompt_embeddings=dense, multimask_output=False)[0]
                         for i in range(3)])
    assert torch.allclose(batched, ref, atol=1e-5)
