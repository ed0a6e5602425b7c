"""Text tokenisers with the official SSP-SAM preprocessing.

Two implementations share one interface (``tok(sentences) -> LongTensor (B, 77)``, 0 = padding, the end-of-text
token has the largest id so ``argmax`` finds it, as CLIP's pooling expects):

* ``ClipBpeTokenizer``: OpenAI CLIP's byte-level BPE through ``transformers.CLIPTokenizer`` (official variants);
* ``WordTokenizer``: a word-level vocabulary through ``tokenizers.models.WordLevel`` (the small demo model, trained
  from scratch, for which a 49k-entry embedding table would be most of its size).

Official text preprocessing (``datasets/dataset.py`` + ``clip/simple_tokenizer.py``): ``lower()``, ``strip()``, keep the
part before ``" ||| "``, append ``"."`` (always, even after punctuation), then ftfy, HTML-unescape twice, collapse
whitespace, lower-case. The official code crashes on more than 77 tokens; here the sentence is truncated with a
warning.
"""

from __future__ import annotations

import gzip
import html
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import torch

from ssp_sam.vocab import DEMO_WORDS

log = logging.getLogger(__name__)

CLIP_VOCAB_GZ = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SEPARATOR = re.compile(r"^(.*) \|\|\| (.*)$")


def prompt_text(sentence: str) -> str:
    """The dataset-side preprocessing: lower, strip, drop a ``||| second part``, append the template period."""
    text = sentence.lower().strip()
    m = _SEPARATOR.match(text)
    if m:
        text = m.group(1)
    return f"{text}."


def clean_text(text: str) -> str:
    """The tokenizer-side cleaning of OpenAI's ``simple_tokenizer``: ftfy, HTML unescape x2, whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class TextTokenizer:
    """Common behaviour: preprocessing, fixed context length, zero padding, truncation with a warning."""

    context_length: int = 77
    kind: str = ""

    def _encode_one(self, text: str) -> list[int]:  # SOT ... EOT ids of cleaned text
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        raise NotImplementedError

    def encode(self, sentence: str) -> list[int]:
        ids = self._encode_one(clean_text(prompt_text(sentence)))
        if len(ids) > self.context_length:
            log.warning("sentence of %d tokens truncated to %d: %.60r...", len(ids), self.context_length, sentence)
            ids = ids[: self.context_length - 1] + [self.eot_id]
        return ids

    def __call__(self, sentences: str | Sequence[str]) -> torch.Tensor:
        if isinstance(sentences, str):
            sentences = [sentences]
        out = torch.zeros(len(sentences), self.context_length, dtype=torch.long)
        for i, s in enumerate(sentences):
            ids = self.encode(s)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def to_json(self) -> str | None:
        """Serialised form stored in checkpoint bundles (None: rebuilt from CLIP's vocabulary)."""
        return None


class ClipBpeTokenizer(TextTokenizer):
    kind = "clip-bpe"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def from_openai_vocab(cls, path: str | Path = CLIP_VOCAB_GZ) -> "ClipBpeTokenizer":
        """Build from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` the way ``simple_tokenizer.py`` builds its vocabulary."""
        from transformers import CLIPTokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(m.split()) for m in lines[1: 49152 - 256 - 2 + 1]]
        units = list(bytes_to_unicode().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        return cls(CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "ClipBpeTokenizer":
        from transformers import CLIPTokenizer

        return cls(CLIPTokenizer.from_pretrained(str(path)))

    @property
    def eot_id(self) -> int:
        return int(self.hf.eos_token_id)

    def _encode_one(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])


class WordTokenizer(TextTokenizer):
    """Word-level vocabulary: 0 [PAD], 1 [UNK], 2 [SOT], the words, then [EOT] (the largest id)."""

    kind = "word"
    SPECIALS = ("[PAD]", "[UNK]", "[SOT]")

    def __init__(self, tokenizer) -> None:
        self.tk = tokenizer
        self._eot = tokenizer.token_to_id("[EOT]")
        self._sot = tokenizer.token_to_id("[SOT]")

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "WordTokenizer":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        seen: dict[str, None] = {}
        for w in words:
            for piece in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", clean_text(w)):
                seen.setdefault(piece, None)
        for punct in (".", "..", ",", "!.", "?.", "'s"):
            seen.setdefault(punct, None)
        vocab = list(cls.SPECIALS) + [w for w in seen if w not in cls.SPECIALS] + ["[EOT]"]
        tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
        return cls(tk)

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tk.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._eot

    def _encode_one(self, text: str) -> list[int]:
        return [self._sot] + self.tk.encode(text, add_special_tokens=False).ids + [self._eot]


def load_tokenizer(spec, tokenizer_json: str | None = None, clip_checkpoint: str | None = None) -> TextTokenizer:
    """The tokenizer a variant needs: the bundle's own, the CLIP directory's, or the packaged CLIP vocabulary."""
    if spec.tokenizer == "word":
        tok = WordTokenizer.from_json(tokenizer_json) if tokenizer_json else WordTokenizer.from_words(DEMO_WORDS)
        if tok.vocab_size > spec.clip_vocab_size:
            raise ValueError(f"word vocabulary ({tok.vocab_size}) exceeds the model's table ({spec.clip_vocab_size})")
    elif clip_checkpoint and Path(clip_checkpoint).is_dir() and (Path(clip_checkpoint) / "vocab.json").exists():
        tok = ClipBpeTokenizer.from_pretrained_dir(clip_checkpoint)
    else:
        tok = ClipBpeTokenizer.from_openai_vocab()
    tok.context_length = spec.context_length
    return tok


__all__ = ["TextTokenizer", "ClipBpeTokenizer", "WordTokenizer", "load_tokenizer", "prompt_text", "clean_text"]
