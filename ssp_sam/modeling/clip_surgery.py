"""CLIP (from ``transformers``) with CLIP Surgery attention in the last vision blocks.

CLIP Surgery (Li et al., used by SSP-SAM in ``clip/clip_surgery_model.py``) turns the last ``surgery_layers`` residual
blocks of the vision transformer into a dual path:

* the original path keeps ordinary q.k attention plus the MLP;
* a second path uses v.v self-attention (queries and keys replaced by the values), accumulates its outputs in a
  separate stream that starts from the input of the first surgery block, and gets no MLP;
* both attention branches of a block read the original path's tokens after ``ln_1`` and share its projections;
* the output takes the CLS token from the original path and the patch tokens from the v.v stream, then applies
  ``ln_post`` and the visual projection to *all* tokens.

``transformers`` has no Surgery mode, so the vision forward below is written by hand on top of the standard
``CLIPModel`` modules (their weights are the ordinary OpenAI CLIP weights; no new parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPConfig, CLIPModel


def _surgery_attention(attn: nn.Module, x: torch.Tensor, sdpa: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (v.v attention output, ordinary attention output) of one CLIP attention module on ``x`` (B, L, C).
    ``sdpa``: both attentions through ``scaled_dot_product_attention`` (v.v is SDPA with the values as queries and
    keys); else the explicit softmax of the reference code."""
    b, n, c = x.shape
    h = attn.num_heads
    q = attn.q_proj(x).view(b, n, h, c // h).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, h, c // h).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, h, c // h).transpose(1, 2)
    if sdpa:
        x_ori = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        x_vv = F.scaled_dot_product_attention(v, v, v, scale=attn.scale)
    else:
        x_ori = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1) @ v
        x_vv = ((v @ v.transpose(-2, -1)) * attn.scale).softmax(dim=-1) @ v
    x_ori = x_ori.transpose(1, 2).reshape(b, n, c)
    x_vv = x_vv.transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(x_vv), attn.out_proj(x_ori)


class CLIPSurgery(nn.Module):
    """A ``transformers`` CLIP model whose vision forward runs in Surgery mode.

    ``encode_image`` returns the projected tokens F (B, 1+N, C); ``encode_text`` returns the word tokens W
    (B, 77, Ct, after the final layer norm, unprojected) and the sentence embedding (B, C, EOT token times the text
    projection, not normalised).
    """

    def __init__(self, config: CLIPConfig, surgery_layers: int = 6) -> None:
        super().__init__()
        self.model = CLIPModel(config)
        self.surgery_layers = min(surgery_layers, config.vision_config.num_hidden_layers)
        self.sdpa = False         # the Surgery blocks' attention: the reference softmax unless modeling.attention.use_sdpa

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))
        layers = vm.encoder.layers
        first = len(layers) - self.surgery_layers
        for layer in layers[:first]:
            x = layer(x, None)
        x_ori, x_vv = x, None
        for layer in layers[first:]:
            vv, ori = _surgery_attention(layer.self_attn, layer.layer_norm1(x_ori), self.sdpa)
            x_vv = (x_ori if x_vv is None else x_vv) + vv
            x_ori = x_ori + ori
            x_ori = x_ori + layer.mlp(layer.layer_norm2(x_ori))
        if x_vv is not None:
            x = torch.cat([x_ori[:, :1], x_vv[:, 1:]], dim=1)
        else:
            x = x_ori
        return self.model.visual_projection(vm.post_layernorm(x))

    def encode_text(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.model.text_model(input_ids=token_ids).last_hidden_state
        eot = words[torch.arange(words.shape[0], device=words.device), token_ids.argmax(dim=-1)]
        return words, self.model.text_projection(eot)
