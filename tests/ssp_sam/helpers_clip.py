"""Test helpers: write tiny CLIP weights in OpenAI's formats (state dict and TorchScript archive)."""

from __future__ import annotations

import torch
from torch import nn


def hf_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``ssp_sam.checkpoints.convert_openai_clip`` (written independently, for round-trip tests)."""
    out: dict[str, torch.Tensor] = {}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if ".encoder.layers." in k:
            tower, rest = k.split(".encoder.layers.")
            i, sub = rest.split(".", 1)
            base = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if sub.startswith("self_attn.") and sub.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((base, sub.split(".")[2]), {})[sub.split(".")[1]] = v
                continue
            for new, old in names.items():
                if sub.startswith(new + "."):
                    out[base + old + sub[len(new):]] = v
            continue
        table = {
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "logit_scale": "logit_scale",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        }
        if k in table:
            out[table[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        else:
            raise KeyError(k)
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state: dict[str, torch.Tensor], path) -> None:
    """Save ``state`` as a TorchScript archive whose ``state_dict()`` has exactly these keys (like OpenAI's .pt)."""
    root = _Holder()
    for k, v in state.items():
        parts = k.split(".")
        m = root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, _Holder())
            m = getattr(m, p)
        m.register_parameter(parts[-1], nn.Parameter(v.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))
