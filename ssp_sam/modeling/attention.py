"""Fused attention in the frozen encoders: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

* SAM's image encoder: segment_anything's ``Attention`` computes ``softmax(q k^T * scale + rel-pos bias) v`` by hand,
  materialising the attention matrix and then a second one for the softmax. :class:`SDPAAttention` is the same module
  (same parameters, same state-dict keys) whose forward passes the decomposed relative-position bias to SDPA as its
  additive ``attn_mask``, the way pytorch-labs' segment-anything-fast does; SDPA then picks a fused kernel (the
  memory-efficient one on CUDA, the flash-attention one on CPU). The bias is built with segment_anything's own
  ``get_rel_pos``, from the unscaled queries as in ``add_decomposed_rel_pos``.
* CLIP: the ``transformers`` towers dispatch on ``config._attn_implementation``; ``set_attn_implementation`` switches
  them between ``"sdpa"`` (transformers' default when it builds CLIP) and ``"eager"``. The Surgery blocks are hand
  written (``clip_surgery.py``) and follow ``CLIPSurgery.sdpa``.

``use_sdpa(model, True/False)`` switches all three in place; the outputs agree with the eager path to float32
rounding (``tests/ssp_sam/test_fast_paths.py``; the golden parity check runs with SDPA on).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn
from torch.nn import functional as F


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            size: tuple[int, int]) -> torch.Tensor:
    """The additive attention bias of ``add_decomposed_rel_pos`` for queries ``q`` (B, nH, h*w, C) attending over the
    same h x w grid: (B, nH, h*w, h*w), in ``q``'s dtype."""
    h, w = size
    b, n_heads, _, dim = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(b * n_heads, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(b, n_heads, h * w, h * w)


class SDPAAttention(Attention):
    """segment_anything's ``Attention`` with the same parameters, computed by ``scaled_dot_product_attention``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                     # (B, nH, h*w, C)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def use_sdpa(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch an SSP-SAM model's encoders to fused attention (or back to the eager reference), in place."""
    for module in model.modules():
        if isinstance(module, Attention):                          # SAM image encoder blocks
            module.__class__ = SDPAAttention if enabled else Attention
    clip = getattr(model, "clip", None)
    if clip is not None:
        clip.sdpa = bool(enabled)
        clip.model.set_attn_implementation("sdpa" if enabled else "eager")
    return model


__all__ = ["SDPAAttention", "decomposed_rel_pos_bias", "use_sdpa"]
