"""SSP-SAM: wires SAM, CLIP (Surgery) and the Semantic-Spatial Prompt encoder. Tensors in, logits out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.nn import functional as F

from .adapters import LinguisticAttentionAdapter, VisualAttentionAdapter
from .clip_surgery import CLIPSurgery
from .prompt_generator import PromptGenerator


@dataclass
class SSPSAMOutput:
    logits: torch.Tensor | None          # (B, 1, F, F) in the padded SAM frame at half resolution
    low_res_logits: torch.Tensor | None  # (B, 1, 4h, 4w) mask-decoder output
    box: torch.Tensor                    # (B, 4) sigmoid (cx, cy, w, h) in the padded CLIP square
    prompts: torch.Tensor | None         # (B, P, D) sparse prompts fed to SAM's mask decoder
    visual_out: torch.Tensor | None = None  # (B, N, D) prompt-generator outputs at the fused-token positions
    image_embeddings: torch.Tensor | None = None  # (B, C, h, w) the SAM embeddings the decoder used


class _UnusedOfficialModules(nn.Module):
    """``img2img_attn`` and ``norm_text_cond_img``: built but never called by the official forward.

    They exist so that an official checkpoint loads with every key accounted for and round-trips. Their tensors
    take whatever shape the checkpoint has (the relative-position tables depend on the variant).
    """

    def __init__(self, dim: int, rpe_len: int = 29) -> None:
        super().__init__()
        self.img2img_attn = nn.Module()
        self.img2img_attn.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.img2img_attn.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.img2img_attn.out_proj = nn.Linear(dim, dim)
        self.img2img_attn.register_buffer("pos_x", torch.zeros(rpe_len, dim // 2))
        self.img2img_attn.register_buffer("pos_y", torch.zeros(rpe_len, dim // 2))
        self.norm_text_cond_img = nn.LayerNorm(dim)
        for p in self.parameters():
            p.requires_grad_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        for name in ("pos_x", "pos_y"):
            key = f"{prefix}img2img_attn.{name}"
            if key in state_dict:
                setattr(self.img2img_attn, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SSPSAM(nn.Module):
    """Semantic-Spatial Prompt SAM (official ``SSP_SAM`` in ``models/ssp_sam_{224,336}.py``)."""

    def __init__(self, spec, sam: Sam, clip: CLIPSurgery) -> None:
        super().__init__()
        self.spec = spec
        self.sam = sam
        self.clip = clip
        hidden = spec.ssp_hidden_dim
        num_tokens = (clip.image_size // clip.model.config.vision_config.patch_size) ** 2
        self.clip_proj = nn.Linear(clip.text_width, hidden)
        self.vad = VisualAttentionAdapter(clip.embed_dim, hidden, num_heads=spec.ssp_heads)
        self.lad = LinguisticAttentionAdapter(hidden)
        self.fusion = nn.Linear(hidden, spec.prompt_dim)
        self.prompt_generator = PromptGenerator(spec.prompt_dim, spec.num_prompts, num_tokens, spec.prompt_layers,
                                                spec.prompt_heads, spec.prompt_ffn_dim)
        self.unused = _UnusedOfficialModules(spec.prompt_dim)
        if spec.scratch_init:
            self.init_for_scratch_training()

    def init_for_scratch_training(self) -> None:
        """Initialisation for models trained with CLIP from scratch (the demo), where the official one stalls.

        With untrained CLIP features, the token-axis-normalised patches are ~1/sqrt(N) in size, so the biases of
        ``clip_img_proj`` and ``fusion`` dominate their outputs and LayerNorm makes every visual token nearly the
        same vector (measured: 7% relative spatial variation instead of 65%); the N(0, 1) positional and token
        tables then drown the fused tokens. Zero biases and 0.02-std tables keep "where" in the prompts from step 0.
        Official weights overwrite all of this; the official variants keep the official initialisation.
        """
        for layer in self.vad.clip_img_proj.layers:
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.fusion.bias)
        self.prompt_generator.init_token_tables(0.02)

    @property
    def frame_size(self) -> int:
        return self.spec.frame_size

    @torch.no_grad()
    def encode_image(self, sam_images: torch.Tensor) -> torch.Tensor:
        """Run the (frozen) SAM image encoder: (B, 3, S, S) SAM-normalised padded images -> embeddings."""
        if self.sam.image_encoder is None:
            raise RuntimeError("this model was built without the SAM image encoder; pass cached image embeddings")
        return self.sam.image_encoder(sam_images)

    def encode_clip_image(self, clip_images: torch.Tensor) -> torch.Tensor:
        """CLIP-Surgery image tokens F (B, 1+N, C); no gradient unless the spec trains CLIP."""
        with torch.set_grad_enabled(self.spec.train_clip and self.training and torch.is_grad_enabled()):
            return self.clip.encode_image(clip_images)

    def encode_text(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text tower: word tokens W (B, L, Ct) and sentence embedding (B, C)."""
        with torch.set_grad_enabled(self.spec.train_clip and self.training and torch.is_grad_enabled()):
            return self.clip.encode_text(token_ids)

    def forward(self, image_embeddings: torch.Tensor | None, clip_images: torch.Tensor | None,
                token_ids: torch.Tensor, sam_images: torch.Tensor | None = None, box_only: bool = False,
                image_tokens: torch.Tensor | None = None,
                text_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                mask_input: torch.Tensor | None = None) -> SSPSAMOutput:
        """Full forward. Cached CLIP image tokens / text features may replace ``clip_images`` / the text tower.
        ``points`` / ``boxes`` / ``mask_input``: SAM prompts added to the sentence's (``decode_masks``)."""
        box, prompts, visual_out = self.encode_prompts(token_ids, clip_images, image_tokens, text_features,
                                                       box_only=box_only)
        if box_only:
            return SSPSAMOutput(None, None, box, None, visual_out)
        image_embeddings = self.image_embeddings(image_embeddings, sam_images)
        low_res = self.decode_masks(image_embeddings, prompts, points=points, boxes=boxes, mask_input=mask_input)
        return SSPSAMOutput(self.postprocess_logits(low_res), low_res, box, prompts, visual_out, image_embeddings)

    def encode_prompts(self, token_ids: torch.Tensor, clip_images: torch.Tensor | None = None,
                       image_tokens: torch.Tensor | None = None,
                       text_features: tuple[torch.Tensor, torch.Tensor] | None = None, box_only: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The Semantic-Spatial Prompt path: (REG box (B, 4), prompt tokens (B, P, D) or None when ``box_only``,
        prompt-generator outputs at the fused-token positions)."""
        if image_tokens is None:
            image_tokens = self.encode_clip_image(clip_images)
        words, sentence = text_features if text_features is not None else self.encode_text(token_ids)
        word_mask = token_ids != 0
        words = self.clip_proj(words)
        visual, _ = self.vad(image_tokens, sentence, words, ~word_mask)
        phrase, _ = self.lad(words, word_mask)
        fused = self.fusion(torch.tanh(visual) * torch.tanh(phrase))
        return self.prompt_generator(fused, box_only=box_only)

    def image_embeddings(self, image_embeddings: torch.Tensor | None, sam_images: torch.Tensor | None
                         ) -> torch.Tensor:
        """The given SAM image embeddings, or those of ``sam_images`` (with a gradient when the encoder trains)."""
        if image_embeddings is not None:
            return image_embeddings
        if sam_images is None:
            raise ValueError("give image_embeddings or sam_images")
        with torch.set_grad_enabled(self.spec.train_sam_encoder and self.training and torch.is_grad_enabled()):
            return self.sam.image_encoder(sam_images)

    def decode_masks(self, image_embeddings: torch.Tensor, prompts: torch.Tensor | None,
                     points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                     mask_input: torch.Tensor | None = None) -> torch.Tensor:
        """SAM's mask decoder with the prompts as sparse embeddings and the no-mask dense embedding; mask token 0
        (``multimask_output=False``). Returns low-res logits (B, 1, 4h, 4w).

        segment_anything's ``MaskDecoder.predict_masks`` pairs *one* image with a batch of prompt sets (it repeats
        the image embedding per set), so the official code loops over samples. This is the same computation with a
        batch of (image, prompt set) pairs, using the decoder's own modules; only mask token 0 is decoded since the
        others and the IoU head are discarded (the golden check holds it to the official numbers).

        Interactive prompts go through SAM's own ``PromptEncoder`` (in every official checkpoint): ``points``
        ((B, N, 2) xy in the SAM input frame, (B, N) labels 1 positive / 0 negative / -1 padding), ``boxes`` ((B, 4)
        xyxy, same frame) and ``mask_input`` ((B, 1, 4h, 4w) logits of an earlier step, the dense prompt). Their
        sparse tokens follow the sentence's prompt tokens; ``prompts=None`` with clicks or a box is plain SAM.
        Without any of them the computation is exactly the sentence-only one above.
        """
        dec = self.sam.mask_decoder
        pe = self.sam.prompt_encoder
        b = image_embeddings.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = [output_tokens.unsqueeze(0).expand(b, -1, -1)]
        if prompts is not None:
            tokens.append(prompts)
        if points is None and boxes is None and mask_input is None:
            if prompts is None:
                raise ValueError("no prompt: give a sentence, clicks, a box or a previous mask")
            src = image_embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        else:
            sparse, dense = pe(points, boxes, mask_input)
            tokens.append(sparse.to(output_tokens.dtype))
            src = image_embeddings + dense.to(image_embeddings.dtype)
        tokens = torch.cat(tokens, dim=1)
        pos_src = pe.get_dense_pe().expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = dec.transformer(src, pos_src, tokens)
        upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)   # mask token 0
        _, c2, h2, w2 = upscaled.shape
        return (hyper @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, 1, h2, w2)

    def postprocess_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits -> bilinear to the SAM input size -> bilinear to half of it (official 256 -> 1024 -> 512)."""
        size = self.spec.sam_image_size
        x = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[..., :size, :size]
        return F.interpolate(x, (self.spec.frame_size, self.spec.frame_size), mode="bilinear", align_corners=False)
