"""Variant registry and the single place that builds a ready model (used by the backend, the CLI and the trainer).

Variants are data (``VariantSpec``), not subclasses, as in segment-anything's ``build_sam.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from transformers import CLIPConfig

from .modeling.attention import use_sdpa
from .modeling.clip_surgery import CLIPSurgery
from .options import opt
from .modeling.ssp_sam import SSPSAM

log = logging.getLogger(__name__)

from .versioning import DEMO_CHECKPOINT, default_checkpoint, weights_version  # noqa: F401

# SAM image encoders of segment-anything's registry (build_sam.py).
SAM_ENCODERS: dict[str, dict[str, Any]] = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}


@dataclass(frozen=True)
class VariantSpec:
    """Every number needed to build an SSP-SAM variant."""

    name: str
    # SAM
    sam_encoder: str | dict = "vit_h"        # a key of SAM_ENCODERS or explicit ImageEncoderViT kwargs
    sam_image_size: int = 1024
    sam_patch_size: int = 16
    sam_window_size: int = 14
    prompt_dim: int = 256                      # SAM transformer width = prompt-token width
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    # CLIP (OpenAI naming: width/layers/heads per tower)
    clip_image_size: int = 224
    clip_patch_size: int = 16
    clip_vision_width: int = 768
    clip_vision_layers: int = 12
    clip_vision_heads: int = 12
    clip_text_width: int = 512
    clip_text_layers: int = 12
    clip_text_heads: int = 8
    clip_embed_dim: int = 512
    clip_vocab_size: int = 49408
    context_length: int = 77
    surgery_layers: int = 6
    tokenizer: str = "clip-bpe"                # "clip-bpe" or "word" (own word-level vocabulary, see tokenizer.py)
    # Semantic-Spatial Prompt encoder
    ssp_hidden_dim: int = 512
    ssp_heads: int = 8
    num_prompts: int = 128
    prompt_layers: int = 6
    prompt_heads: int = 8
    prompt_ffn_dim: int = 2048
    # which frozen parts are trained (the official recipe trains neither)
    train_clip: bool = False
    train_sam_encoder: bool = False
    official: bool = False                      # a combination the paper released
    scratch_init: bool = False                  # init for training CLIP from scratch (SSPSAM.init_for_scratch_training)

    @property
    def frame_size(self) -> int:
        """Side of the output logit frame: half the SAM input (512 for the official 1024)."""
        return self.sam_image_size // 2

    @property
    def embedding_size(self) -> int:
        return self.sam_image_size // self.sam_patch_size

    @property
    def no_target_min_pixels(self) -> float:
        """The GRES rule: fewer than 50 positive pixels at 512^2 means no target; scaled by area for other frames."""
        return 50.0 * (self.frame_size / 512.0) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VariantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_B16 = dict(clip_image_size=224, clip_patch_size=16, clip_vision_width=768, clip_vision_layers=12,
            clip_vision_heads=12, clip_text_width=512, clip_text_layers=12, clip_text_heads=8, clip_embed_dim=512)
_L14_336 = dict(clip_image_size=336, clip_patch_size=14, clip_vision_width=1024, clip_vision_layers=24,
                clip_vision_heads=16, clip_text_width=768, clip_text_layers=12, clip_text_heads=12, clip_embed_dim=768)

VARIANTS: dict[str, VariantSpec] = {
    # The two released variants (SAM ViT-H as in the paper).
    "ssp-sam-224": VariantSpec(name="ssp-sam-224", official=True, **_B16),
    "ssp-sam-336": VariantSpec(name="ssp-sam-336", official=True, **_L14_336),
    # Faster, NON-official combinations: same SSP weights shapes, smaller SAM image encoder (its own SAM checkpoint).
    "ssp-sam-224-vit-l": VariantSpec(name="ssp-sam-224-vit-l", sam_encoder="vit_l", **_B16),
    "ssp-sam-224-vit-b": VariantSpec(name="ssp-sam-224-vit-b", sam_encoder="vit_b", **_B16),
    "ssp-sam-336-vit-l": VariantSpec(name="ssp-sam-336-vit-l", sam_encoder="vit_l", **_L14_336),
    "ssp-sam-336-vit-b": VariantSpec(name="ssp-sam-336-vit-b", sam_encoder="vit_b", **_L14_336),
    # The embedded demo model: small widths, small images, its own word vocabulary, trained end to end on the
    # project's synthetic referring benchmark (docs/training.md).
    "demo": VariantSpec(
        name="demo", sam_encoder=dict(embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3)),
        sam_image_size=128, sam_patch_size=8, sam_window_size=4, prompt_dim=96, decoder_depth=2, decoder_heads=4,
        decoder_mlp_dim=256, iou_head_hidden_dim=64,
        clip_image_size=64, clip_patch_size=8, clip_vision_width=96, clip_vision_layers=4, clip_vision_heads=4,
        clip_text_width=96, clip_text_layers=2, clip_text_heads=4, clip_embed_dim=96, clip_vocab_size=256,
        surgery_layers=2, tokenizer="word", ssp_hidden_dim=96, ssp_heads=4, num_prompts=16, prompt_layers=2,
        prompt_heads=4, prompt_ffn_dim=256, train_clip=True, train_sam_encoder=True),
    # Tiny random model for unit tests.
    "tiny": VariantSpec(
        name="tiny", sam_encoder=dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
        sam_image_size=64, sam_patch_size=8, sam_window_size=4, prompt_dim=32, decoder_depth=1, decoder_heads=2,
        decoder_mlp_dim=64, iou_head_hidden_dim=32,
        clip_image_size=32, clip_patch_size=8, clip_vision_width=32, clip_vision_layers=2, clip_vision_heads=2,
        clip_text_width=32, clip_text_layers=1, clip_text_heads=2, clip_embed_dim=32, clip_vocab_size=256,
        surgery_layers=1, tokenizer="word", ssp_hidden_dim=32, ssp_heads=2, num_prompts=8, prompt_layers=1,
        prompt_heads=2, prompt_ffn_dim=64, train_clip=True, train_sam_encoder=True, scratch_init=True),
}


def get_spec(variant: str | VariantSpec | dict) -> VariantSpec:
    if isinstance(variant, VariantSpec):
        return variant
    if isinstance(variant, dict):
        return VariantSpec.from_dict(variant)
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown SSP-SAM variant {variant!r}; known: {', '.join(VARIANTS)}") from None


def clip_config(spec: VariantSpec) -> CLIPConfig:
    """A ``transformers`` CLIPConfig for the variant's CLIP (OpenAI: heads = width / 64, QuickGELU, eps 1e-5)."""
    return CLIPConfig(
        text_config=dict(vocab_size=spec.clip_vocab_size, hidden_size=spec.clip_text_width,
                         intermediate_size=4 * spec.clip_text_width, num_hidden_layers=spec.clip_text_layers,
                         num_attention_heads=spec.clip_text_heads, max_position_embeddings=spec.context_length,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=spec.clip_embed_dim,
                         pad_token_id=0, bos_token_id=min(49406, spec.clip_vocab_size - 2),
                         eos_token_id=min(49407, spec.clip_vocab_size - 1)),
        vision_config=dict(hidden_size=spec.clip_vision_width, intermediate_size=4 * spec.clip_vision_width,
                           num_hidden_layers=spec.clip_vision_layers, num_attention_heads=spec.clip_vision_heads,
                           image_size=spec.clip_image_size, patch_size=spec.clip_patch_size,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=spec.clip_embed_dim),
        projection_dim=spec.clip_embed_dim,
    )


def _build_sam(spec: VariantSpec, with_image_encoder: bool) -> Sam:
    enc = SAM_ENCODERS[spec.sam_encoder] if isinstance(spec.sam_encoder, str) else dict(spec.sam_encoder)
    size, emb = spec.sam_image_size, spec.embedding_size
    image_encoder = None
    if with_image_encoder:
        image_encoder = ImageEncoderViT(
            depth=enc["depth"], embed_dim=enc["embed_dim"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc["num_heads"],
            patch_size=spec.sam_patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(enc["global_attn_indexes"]), window_size=spec.sam_window_size,
            out_chans=spec.prompt_dim)
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(emb, emb),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_dim,
                                          mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
            transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_model(variant: str | VariantSpec | dict = "tiny", *, with_image_encoder: bool = True,
                seed: int | None = None) -> SSPSAM:
    """Build a variant with random weights (CPU, float32, frozen parts marked ``requires_grad=False``)."""
    spec = get_spec(variant)
    if seed is not None:
        torch.manual_seed(seed)
    clip = CLIPSurgery(clip_config(spec), surgery_layers=spec.surgery_layers)
    model = SSPSAM(spec, _build_sam(spec, with_image_encoder), clip)
    set_trainable(model)
    return model


def set_trainable(model: SSPSAM, *, train_mask_decoder: bool = True, train_prompt_encoder: bool = False) -> None:
    """Mark what the recipe trains: SSP modules and the mask decoder; CLIP / SAM encoder only when the spec says;
    SAM's prompt encoder (clicks, boxes, previous mask) only in click training."""
    spec = model.spec
    for p in model.parameters():
        p.requires_grad_(True)
    for p in model.clip.parameters():
        p.requires_grad_(spec.train_clip)
    if model.sam.image_encoder is not None:
        for p in model.sam.image_encoder.parameters():
            p.requires_grad_(spec.train_sam_encoder)
    for p in model.sam.prompt_encoder.parameters():
        p.requires_grad_(train_prompt_encoder)
    for p in model.sam.mask_decoder.parameters():
        p.requires_grad_(train_mask_decoder)
    # single-mask output: the IoU head and the hypernetworks of mask tokens 1-3 never receive a gradient
    dec = model.sam.mask_decoder
    for p in list(dec.iou_prediction_head.parameters()) + list(dec.output_hypernetworks_mlps[1:].parameters()):
        p.requires_grad_(False)
    for p in model.unused.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Ready models


@dataclass
class ModelConfig:
    """Where a ready model comes from. ``load_model(cfg)`` is the one path the backend, CLI and trainer use."""

    variant: str = opt("demo", "model variant: demo (the packaged model), ssp-sam-224, ssp-sam-336 "
                               "(official) or ssp-sam-224-vit-b and the other faster combinations")
    checkpoint: str | None = opt(None, "SSP-SAM weights: an official .pth or a bundle (default: the packaged demo "
                                       "bundle for the demo variant)")
    sam_checkpoint: str | None = opt(None, "segment-anything checkpoint (.pth) for the SAM parts")
    clip_checkpoint: str | None = opt(None, "OpenAI CLIP .pt (TorchScript or state dict) or a transformers CLIP folder")
    weights_dir: str | None = opt(None, "a folder written by `ssp-sam download-weights` (weights.json): its files "
                                        "stand in for the checkpoints not given, and its variant for the default")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = opt("auto", "auto, fp32, bf16 or fp16 (autocast on CUDA; the CPU runs fp32)")
    sdpa: bool = opt(True, "fused attention (scaled_dot_product_attention) in the SAM and CLIP encoders; false: "
                           "the eager reference attention")
    compile: bool = opt(False, "torch.compile the image encoders when loading (falls back to eager with a warning "
                               "when compiling fails)")
    strict: bool = True                 # fail when a trained SSP-SAM part is missing from the checkpoint
    with_image_encoder: bool = True
    version: str | None = None          # the model_version to report; default <variant>-<sha8 of checkpoint>


@dataclass
class LoadedModel:
    model: SSPSAM
    tokenizer: Any
    spec: VariantSpec
    version: str
    device: torch.device
    dtype: torch.dtype                  # autocast dtype (float32 = no autocast)
    report: Any = None
    meta: dict = field(default_factory=dict)


class _CompiledOrEager:
    """A compiled function that falls back to its eager original, for good, the first time it raises (compiling
    happens on a call: at load for the example input, again for a new input shape)."""

    def __init__(self, name: str, eager, compiled) -> None:
        self.name, self.eager, self.compiled = name, eager, compiled

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                log.warning("torch.compile of the %s failed (%s: %s); running it eagerly", self.name,
                            type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                self.compiled = None
        return self.eager(*args, **kwargs)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The autocast context a model runs under: ``dtype`` on CUDA, none for float32 or on the CPU."""
    from contextlib import nullcontext

    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def compile_encoders(model: SSPSAM, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                     backend: Any = "inductor", warm_up: bool = True) -> dict[str, bool]:
    """``torch.compile`` the SAM image encoder and the CLIP-Surgery image tower (the cold path's time), in place.

    With ``warm_up`` each is compiled now on a one-image example under the autocast it will run with, so that the
    first request does not pay for it and a failure shows at load: the encoder then stays eager and a warning says
    why. Returns {encoder: compiled}."""
    device = device or next(model.parameters()).device
    spec = model.spec
    targets = [("CLIP image tower", model.clip, "encode_image",
                lambda: torch.zeros(1, 3, spec.clip_image_size, spec.clip_image_size, device=device))]
    if model.sam.image_encoder is not None:
        targets.insert(0, ("SAM image encoder", model.sam.image_encoder, "forward",
                           lambda: torch.zeros(1, 3, spec.sam_image_size, spec.sam_image_size, device=device)))
    done = {}
    for name, owner, attr, example in targets:
        eager = getattr(owner, attr)
        try:
            wrapped = _CompiledOrEager(name, eager, torch.compile(eager, backend=backend, dynamic=False))
        except Exception as exc:                     # e.g. torch.compile unsupported on this platform
            log.warning("torch.compile of the %s failed (%s: %s); running it eagerly", name, type(exc).__name__, exc)
            done[name] = False
            continue
        setattr(owner, attr, wrapped)                # an instance attribute: the module's weights are untouched
        if warm_up:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast_for(device, dtype):
                wrapped(example())
            log.info("%s %s in %.1f s", name, "compiled" if wrapped.compiled is not None else "left eager",
                     time.perf_counter() - t0)
        done[name] = wrapped.compiled is not None
    return done


def resolve_device(device: str = "auto") -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={device} asked for CUDA, but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in ("auto", "", None):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    if device.type == "cpu" and table[dtype] != torch.float32:
        log.warning("dtype %s ignored on CPU; running in float32", dtype)
        return torch.float32
    return table[dtype]


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the configured variant and load every weight file it names; returns a model in eval mode on device."""
    from . import checkpoints
    from .hub import apply_weights_dir
    from .tokenizer import load_tokenizer

    cfg = apply_weights_dir(cfg)
    checkpoint = default_checkpoint(cfg.variant, cfg.checkpoint)
    if checkpoint == str(DEMO_CHECKPOINT) and not DEMO_CHECKPOINT.exists():
        raise FileNotFoundError(f"the packaged demo model is missing: {DEMO_CHECKPOINT}")
    raw = checkpoints.read_checkpoint(checkpoint) if checkpoint else None
    bundle = raw if checkpoints.is_bundle(raw) else None
    spec = get_spec(bundle["variant"] if bundle else cfg.variant)
    model = build_model(spec, with_image_encoder=cfg.with_image_encoder)
    report = checkpoints.LoadReport()
    if cfg.sam_checkpoint:
        report.merge(checkpoints.load_sam_checkpoint(model, cfg.sam_checkpoint))
    if cfg.clip_checkpoint:
        report.merge(checkpoints.load_clip_checkpoint(model, cfg.clip_checkpoint))
    tokenizer_json = None
    meta: dict = {}
    if bundle is not None:
        report.merge(checkpoints.load_bundle_weights(model, bundle, strict=cfg.strict))
        tokenizer_json = bundle.get("tokenizer")
        meta = dict(bundle.get("meta") or {})
    elif checkpoint:
        report.merge(checkpoints.load_official_checkpoint(model, checkpoint, strict=cfg.strict, preloaded=raw,
                                                          clip_loaded=bool(cfg.clip_checkpoint)))
    elif spec.official:
        log.warning("no SSP-SAM checkpoint configured for %s: the prompt encoder is randomly initialised", spec.name)
    del raw
    tokenizer = load_tokenizer(spec, tokenizer_json=tokenizer_json, clip_checkpoint=cfg.clip_checkpoint)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model.to(device).eval()
    use_sdpa(model, cfg.sdpa)
    if cfg.compile:
        compile_encoders(model, device=device, dtype=dtype)
    version = cfg.version or weights_version(cfg.variant, checkpoint)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, version=version, device=device, dtype=dtype,
                       report=report, meta=meta)
