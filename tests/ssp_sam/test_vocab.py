"""The word-level vocabulary is data of its own: it covers the synthetic benchmark, and the tokenizer does not need
the data generator to build it."""

import subprocess
import sys

from ssp_sam.data.synthetic import SYNTHETIC_VOCABULARY
from ssp_sam.tokenizer import WordTokenizer
from ssp_sam.vocab import DEMO_WORDS


def test_every_synthetic_word_is_in_the_vocabulary():
    assert set(SYNTHETIC_VOCABULARY) <= set(DEMO_WORDS), sorted(set(SYNTHETIC_VOCABULARY) - set(DEMO_WORDS))
    assert len(set(DEMO_WORDS)) == len(DEMO_WORDS)


def test_the_word_tokenizer_knows_every_word():
    tok = WordTokenizer.from_words(DEMO_WORDS)
    unk = tok.tk.token_to_id("[UNK]")
    ids = tok(" ".join(DEMO_WORDS))[0]
    assert unk not in ids.tolist() and int((ids != 0).sum()) == len(DEMO_WORDS) + 3  # SOT, words, ".", EOT


def test_the_tokenizer_does_not_import_the_data_generator():
    code = ("import sys, types, ssp_sam.tokenizer as t; "
            "assert 'ssp_sam.data.synthetic' not in sys.modules, 'imported'; "
            "spec = types.SimpleNamespace(tokenizer='word', clip_vocab_size=1000, context_length=77); "
            "assert t.load_tokenizer(spec).vocab_size > 60; "
            "assert 'ssp_sam.data.synthetic' not in sys.modules, 'imported by load_tokenizer'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
