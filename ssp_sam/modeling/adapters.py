"""The Semantic-Spatial Prompt encoder's adapters: visual (VAD) and linguistic (LAD), as the official forward computes.

Official module names are kept inside each adapter so checkpoint keys map by prefix only (see ``checkpoints.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLP


def similarity_map(tokens: torch.Tensor, sentence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-Surgery text-guided similarity map.

    ``tokens`` (B, 1+N, C) are CLIP image tokens, ``sentence`` (B, C) the sentence embedding. The tokens are
    L2-normalised along the *token* axis (dim 1), an official quirk inherited from the CLIP Surgery demo; the
    sentence along channels. Returns (normalised patch tokens (B, N, C), min-max normalised map (B, N, 1)).
    """
    tokens = tokens / tokens.norm(dim=1, keepdim=True)
    sentence = sentence / sentence.norm(dim=-1, keepdim=True)
    sim = (tokens @ sentence.unsqueeze(-1))[:, 1:]  # drop CLS: (B, N, 1)
    lo = sim.min(dim=1, keepdim=True).values
    hi = sim.max(dim=1, keepdim=True).values
    return tokens[:, 1:], (sim - lo) / (hi - lo)


class VisualAttentionAdapter(nn.Module):
    """Similarity-map weighting, 3-layer projection and visual-linguistic verification (Gaussian score)."""

    def __init__(self, clip_dim: int, hidden_dim: int = 512, num_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.clip_img_proj = MLP(clip_dim, hidden_dim, hidden_dim, 3)
        self.img2text_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout)
        self.imgtext_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 1)
        self.img_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 1)
        self.norm_img = nn.LayerNorm(hidden_dim)
        self.tf_scale = nn.Parameter(torch.tensor([1.0]))
        self.tf_sigma = nn.Parameter(torch.tensor([0.5]))
        self.tf_pow = 2.0

    def forward(self, image_tokens: torch.Tensor, sentence: torch.Tensor, words: torch.Tensor,
                word_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens (B, 1+N, C), sentence (B, C), projected words (B, L, H), padding mask (B, L) ->
        (verified visual tokens (B, N, H), similarity map (B, N, 1))."""
        patches, sim = similarity_map(image_tokens, sentence)
        visual = self.clip_img_proj(patches * sim)                       # (B, N, H)
        visual_sf = visual.transpose(0, 1)                               # sequence-first (N, B, H)
        text_ctx = self.img2text_attn(visual_sf, words.transpose(0, 1), words.transpose(0, 1),
                                      key_padding_mask=word_padding)[0]  # (N, B, H)
        t = self.imgtext_proj(text_ctx)
        v = self.img_proj(visual_sf)
        cos = (F.normalize(v, p=2, dim=-1) * F.normalize(t, p=2, dim=-1)).sum(dim=-1, keepdim=True)
        score = self.tf_scale * torch.exp(-(1 - cos).pow(self.tf_pow) / (2 * self.tf_sigma ** 2))
        return (self.norm_img(visual_sf) * score).transpose(0, 1), sim  # (B, N, H), (B, N, 1)


class PhraseAttention(nn.Module):
    """Scores every word position; the official module ``phrase_attn`` holds one Linear named ``fc``."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(input_dim, 1)

    def forward(self, hidden: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D), word_mask (B, L) True on real tokens -> weights (B, L) summing to 1 over real tokens."""
        weights = F.softmax(self.fc(hidden).squeeze(-1), dim=-1)
        weights = weights * word_mask.to(weights.dtype)
        return weights / weights.sum(dim=-1, keepdim=True)


class LinguisticAttentionAdapter(nn.Module):
    """BiGRU over the projected words + phrase attention; returns the phrase embedding (B, 1, H)."""

    def __init__(self, hidden_dim: int = 512) -> None:
        super().__init__()
        self.text_proj = nn.GRU(hidden_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.phrase_attn = PhraseAttention(2 * hidden_dim)

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.text_proj(words)
        weights = self.phrase_attn(hidden, word_mask)
        return (weights.unsqueeze(-1) * words).sum(dim=1, keepdim=True), weights
