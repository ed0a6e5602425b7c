"""The prompt generator: [REG | prompt tokens | fused tokens] through a DETR-style post-norm encoder.

Outputs the REG-token box (auxiliary REC head) and the sparse prompts that drive SAM's mask decoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLP


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; the positional embedding is added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class _Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))


class VisionLanguageEncoder(nn.Module):
    """Holds ``encoder.layers`` like the official ``vl_transformer``; no final norm inside."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int) -> None:
        super().__init__()
        self.encoder = _Encoder(num_layers, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            src = layer(src, pos)
        return src


class PromptGenerator(nn.Module):
    """REG token + ``num_prompts`` learnable prompt tokens + N fused tokens -> (box, prompts)."""

    def __init__(self, dim: int = 256, num_prompts: int = 128, num_visual_tokens: int = 196, num_layers: int = 6,
                 num_heads: int = 8, dim_feedforward: int = 2048) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self.reg_token = nn.Embedding(1, dim)
        self.prompt_token = nn.Embedding(num_prompts, dim)
        self.vl_pos_embed = nn.Embedding(1 + num_prompts + num_visual_tokens, dim)
        self.vl_transformer = VisionLanguageEncoder(dim, num_heads, num_layers, dim_feedforward)
        self.norm = nn.LayerNorm(dim)
        self.bbox_embed = MLP(dim, dim, 4, 3)

    def init_token_tables(self, std: float) -> None:
        """Re-initialise the position, REG and prompt tables with N(0, std) (official init is N(0, 1))."""
        for table in (self.vl_pos_embed, self.reg_token, self.prompt_token):
            nn.init.normal_(table.weight, std=std)

    def forward(self, fused: torch.Tensor, box_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """fused (B, N, D) -> box (B, 4) sigmoid cxcywh, prompts (B, P, D) (None when ``box_only``), and the
        encoder's outputs at the N fused-token positions (B, N, D; unused by the official model, read by the
        demo's auxiliary referent-patch loss)."""
        b = fused.shape[0]
        src = torch.cat([
            self.reg_token.weight.unsqueeze(1).expand(-1, b, -1),
            self.prompt_token.weight.unsqueeze(1).expand(-1, b, -1),
            fused.transpose(0, 1),
        ], dim=0)
        pos = self.vl_pos_embed.weight.unsqueeze(1).expand(-1, b, -1)
        out = self.norm(self.vl_transformer(src, pos))
        box = self.bbox_embed(out[0]).sigmoid()
        visual_out = out[1 + self.num_prompts:].transpose(0, 1)
        if box_only:
            return box, None, visual_out
        return box, out[1:1 + self.num_prompts].transpose(0, 1), visual_out
