"""The word list of the word-level tokenizer (variants ``demo`` and ``tiny``), as data.

A word-level model built from scratch gets its vocabulary from here (``ssp_sam.tokenizer.load_tokenizer``); a trained
bundle carries its own tokenizer. It holds every word the synthetic benchmark can produce in any domain, sorted
(``tests/ssp_sam/test_vocab.py`` checks it against ``ssp_sam.data.synthetic.SYNTHETIC_VOCABULARY``). Token ids follow
this order after the special tokens, so a new word goes at the end: the others keep their ids.
"""

DEMO_WORDS: tuple[str, ...] = (
    "above", "all", "at", "below", "blue", "both", "bottom", "bottommost", "checkered", "circle", "circles",
    "cross", "crosses", "cyan", "diamond", "diamonds", "dotted", "ellipse", "ellipses", "find", "first", "from",
    "green", "hexagon", "hexagons", "in", "large", "left", "leftmost", "of", "on", "orange", "pink", "purple",
    "red", "right", "rightmost", "ring", "rings", "second", "segment", "select", "shape", "shapes", "small",
    "solid", "square", "squares", "star", "stars", "striped", "the", "third", "top", "topmost", "triangle",
    "triangles", "yellow",
)

__all__ = ["DEMO_WORDS"]
