"""Every weight format the model loads, and the project's own bundle format.

* SAM: segment-anything's ``.pth`` (``image_encoder.* / prompt_encoder.* / mask_decoder.*``).
* CLIP: an OpenAI CLIP ``.pt`` (TorchScript archive or plain state dict), converted in memory to ``transformers``
  names, or a ``transformers`` CLIP model directory.
* SSP-SAM: the official checkpoint (``{"model": state_dict, "epoch", "args", ...}``, official module names), mapped
  onto this implementation by prefix; every key is accounted for in a ``LoadReport``.
* Bundles: ``{"format": "ssp-sam-bundle/1", "variant", "model", "tokenizer", "meta"}`` (demo and fine-tuned models).

Safe loading (``weights_only=True``) is used everywhere; TorchScript archives are read with ``torch.jit.load``
(the format OpenAI ships) and only their tensors are kept.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "ssp-sam-bundle/1"

# official SSP_SAM module prefix -> this implementation's prefix (checked in order; first match wins)
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("clip_img_proj.", "vad.clip_img_proj."),
    ("img2text_attn.", "vad.img2text_attn."),
    ("imgtext_proj.", "vad.imgtext_proj."),
    ("img_proj.", "vad.img_proj."),
    ("norm_img.", "vad.norm_img."),
    ("tf_scale", "vad.tf_scale"),
    ("tf_sigma", "vad.tf_sigma"),
    ("text_proj.", "lad.text_proj."),
    ("phrase_attn.", "lad.phrase_attn."),
    ("clip_proj.", "clip_proj."),
    ("mlp.", "fusion."),
    ("vl_transformer.", "prompt_generator.vl_transformer."),
    ("vl_pos_embed.", "prompt_generator.vl_pos_embed."),
    ("prompt_token.", "prompt_generator.prompt_token."),
    ("reg_token.", "prompt_generator.reg_token."),
    ("bbox_embed.", "prompt_generator.bbox_embed."),
    ("norm.", "prompt_generator.norm."),
    ("img2img_attn.", "unused.img2img_attn."),
    ("norm_text_cond_img.", "unused.norm_text_cond_img."),
    ("sam.", "sam."),
)
# parts that are not trained by SSP-SAM: loaded from their own base checkpoints
FROZEN_PREFIXES = ("clip.", "sam.image_encoder.", "sam.prompt_encoder.", "unused.")


@dataclass
class LoadReport:
    """What a load did with every key."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # model keys the file did not provide
    unexpected: list[str] = field(default_factory=list)     # file keys the model has no place for
    ignored: dict[str, str] = field(default_factory=dict)   # file key -> why it was deliberately skipped
    mismatched: list[str] = field(default_factory=list)     # shape mismatches (not loaded)

    def merge(self, other: "LoadReport") -> "LoadReport":
        self.loaded += other.loaded
        self.unexpected += other.unexpected
        self.ignored.update(other.ignored)
        self.mismatched += other.mismatched
        # a key missing from one file but provided by another is not missing
        got = set(self.loaded)
        self.missing = [k for k in dict.fromkeys(self.missing + other.missing) if k not in got]
        return self

    def summary(self) -> str:
        def few(keys):
            keys = list(keys)
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing {len(self.missing)}: {few(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)}: {few(self.unexpected)}")
        if self.mismatched:
            lines.append(f"shape mismatch {len(self.mismatched)}: {few(self.mismatched)}")
        if self.ignored:
            reasons: dict[str, int] = {}
            for why in self.ignored.values():
                reasons[why] = reasons.get(why, 0) + 1
            lines.append("ignored: " + "; ".join(f"{n} ({why})" for why, n in reasons.items()))
        return "\n".join(lines)


class CheckpointError(RuntimeError):
    """A weight file is unreadable or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path: str | Path) -> Any:
    """Load a weight file safely (``weights_only=True``); TorchScript archives give their state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_torchscript(path):
        return {k: v.detach().clone() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turn any unpickling error into a clear message
        raise CheckpointError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from exc


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with a 'model' state dict)")
    return obj


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], report: LoadReport, prefix: str = "") -> None:
    """Copy matching tensors into ``module``; record everything in ``report`` (keys reported with ``prefix``)."""
    own = module.state_dict()
    fitting = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(prefix + k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{prefix}{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            fitting[k] = v
    module.load_state_dict(fitting, strict=False)
    report.loaded += [prefix + k for k in fitting]
    report.missing += [prefix + k for k in own if k not in fitting]


# ----------------------------------------------------------------------------------------------------------------
# SAM


def load_sam_checkpoint(model, path: str | Path) -> LoadReport:
    """Load a segment-anything checkpoint into ``model.sam``."""
    state = _state_dict_of(read_checkpoint(path), Path(path))
    report = LoadReport()
    if model.sam.image_encoder is None:
        for k in [k for k in state if k.startswith("image_encoder.")]:
            report.ignored["sam." + k] = "model built without the SAM image encoder"
            state.pop(k)
    _assign(model.sam, state, report, prefix="sam.")
    if model.sam.image_encoder is None:
        report.missing = [k for k in report.missing if not k.startswith("sam.image_encoder.")]
    if report.mismatched:
        raise CheckpointError(f"{path}: SAM checkpoint does not fit variant {model.spec.name} "
                              f"(SAM encoder {model.spec.sam_encoder}): {report.mismatched[:3]}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLIP


def convert_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP state dict -> ``transformers.CLIPModel`` names (fused in_proj split into q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for key, v in state.items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        tower, rest = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else ("text_model", key)
        if rest.startswith("transformer.resblocks."):
            i, sub = rest[len("transformer.resblocks."):].split(".", 1)
            base = f"{tower}.encoder.layers.{i}."
            if sub.startswith("attn.in_proj_"):
                kind = sub[len("attn.in_proj_"):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.clone()
                continue
            for old, new in block.items():
                if sub.startswith(old + "."):
                    out[base + new + sub[len(old):]] = v
                    break
            else:
                raise CheckpointError(f"unknown CLIP key {key}")
            continue
        simple = {
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight",
            "ln_final.bias": "text_model.final_layer_norm.bias",
            "logit_scale": "logit_scale",
            "visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
            "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
            "visual.ln_post.weight": "vision_model.post_layernorm.weight",
            "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        }
        if key in simple:
            out[simple[key]] = v
        elif key == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        else:
            raise CheckpointError(f"unknown CLIP key {key} (only ViT CLIP models are supported)")
    return out


def _normalise_surgery_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the official model's self-mutation (pitfall 12): ``attn.qkv/proj`` back to ``in_proj/out_proj``."""
    out = {}
    for k, v in state.items():
        if k.startswith("visual.attn."):  # an alias of the last converted block
            continue
        k = k.replace(".attn.qkv.weight", ".attn.in_proj_weight").replace(".attn.qkv.bias", ".attn.in_proj_bias")
        k = k.replace(".attn.proj.", ".attn.out_proj.")
        out[k] = v
    return out


def load_clip_checkpoint(model, path: str | Path) -> LoadReport:
    """Load CLIP weights: an OpenAI ``.pt`` file (TorchScript or state dict) or a ``transformers`` directory."""
    path = Path(path)
    if path.is_dir():
        from transformers import CLIPModel
        state = CLIPModel.from_pretrained(str(path)).state_dict()
    else:
        state = convert_openai_clip(_state_dict_of(read_checkpoint(path), path))
    return _load_clip_state(model, state, str(path))


def _load_clip_state(model, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    report = LoadReport()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    _assign(model.clip.model, state, report, prefix="clip.model.")
    report.missing = [k for k in report.missing if not k.endswith("position_ids")]
    if report.mismatched:
        raise CheckpointError(f"{source}: this CLIP does not fit variant {model.spec.name} (CLIP ViT with "
                              f"{model.spec.clip_vision_width}-wide vision tower, {model.spec.clip_image_size} px "
                              f"input): {report.mismatched[:3]}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# official SSP-SAM checkpoints


def map_official_key(key: str) -> str | None:
    """Official ``SSP_SAM`` key -> this implementation's key (None for ``encoder.*``, i.e. CLIP)."""
    if key.startswith("encoder."):
        return None
    for old, new in OFFICIAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_official_checkpoint(model, path: str | Path, strict: bool = True, clip_loaded: bool = False,
                             preloaded: Any = None) -> LoadReport:
    """Load an official SSP-SAM checkpoint; fail (``strict``) when a trained part is missing or mis-shaped.

    CLIP weights saved under ``encoder.*`` are used only when no CLIP file was loaded (the official ``test.py``
    drops them and reloads CLIP from the CS-*.pt file; mutated Surgery keys are normalised first).
    """
    path = Path(path)
    state = _state_dict_of(read_checkpoint(path) if preloaded is None else preloaded, path)
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    clip_state: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        new = map_official_key(k)
        if new is None:
            clip_state[k[len("encoder."):]] = v
        elif new.startswith("sam.image_encoder.") and model.sam.image_encoder is None:
            report.ignored[k] = "model built without the SAM image encoder"
        else:
            mapped[new] = v
    if clip_state:
        if clip_loaded:
            for k in clip_state:
                report.ignored["encoder." + k] = "CLIP comes from its own file (official test.py does the same)"
        else:
            report.merge(_load_clip_state(model, convert_openai_clip(_normalise_surgery_keys(clip_state)),
                                          f"{path} (encoder.*)"))
    _assign(model, mapped, report)
    report.missing = [k for k in report.missing if not k.startswith("clip.")
                      and not k.endswith("position_ids")
                      and not (k.startswith("sam.image_encoder.") and model.sam.image_encoder is None)]
    trained_missing = [k for k in report.missing if not k.startswith(FROZEN_PREFIXES)]
    if strict and (trained_missing or report.mismatched or report.unexpected):
        raise CheckpointError(f"{path}: does not match SSP-SAM variant {model.spec.name}:\n{report.summary()}")
    if trained_missing:
        log.warning("%s: trained SSP-SAM parts missing (strict=False):\n%s", path, report.summary())
    return report


# ----------------------------------------------------------------------------------------------------------------
# bundles


def is_bundle(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT


def load_bundle_weights(model, bundle: dict, strict: bool = True) -> LoadReport:
    report = LoadReport()
    _assign(model, bundle["model"], report)
    report.missing = [k for k in report.missing if not k.endswith("position_ids")]
    if bundle.get("meta", {}).get("include_frozen") is False:
        report.missing = [k for k in report.missing if not k.startswith(FROZEN_PREFIXES)]
    if strict and (report.missing or report.mismatched or report.unexpected):
        raise CheckpointError(f"bundle does not match variant {model.spec.name}:\n{report.summary()}")
    return report


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` all or nothing (:func:`ssp_sam.io.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_bundle(model, tokenizer, path: str | Path, meta: dict | None = None, include_frozen: bool = True,
                half: bool = False, spec=None) -> Path:
    """Write a bundle atomically. ``include_frozen=False`` leaves out CLIP and the SAM image/prompt encoders (they
    then come from the base files named in the ModelConfig); ``half`` stores float tensors as float16; ``spec``: the
    VariantSpec to record (default: the model's)."""
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids") or (not include_frozen and k.startswith(FROZEN_PREFIXES)):
            continue
        v = v.detach().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v.clone()
    meta = dict(meta or {})
    meta["include_frozen"] = include_frozen
    bundle = {"format": BUNDLE_FORMAT, "variant": (spec or model.spec).to_dict(), "model": state,
              "tokenizer": tokenizer.to_json() if tokenizer is not None else None, "meta": meta}
    atomic_torch_save(bundle, path)
    return Path(path)
