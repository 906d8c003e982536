"""The toy model's word-level tokenizer (punctuation split off, one token per word)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

from ingest import ioi

BOS = "<|endoftext|>"
UNK = "<unk>"


def _words(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_tokenizer() -> Tokenizer:
    """Every word the IOI, ABC and filler templates can produce, plus BOS and UNK."""
    words: set[str] = set(ioi.NAMES) | set(ioi.PLACES) | set(ioi.OBJECTS) | {"a", "an"}  # both articles
    for template in ioi.TEMPLATES + ioi.FILLER_TEMPLATES:
        words.update(_words(template.format(A="", B="", C="", PLACE="", OBJECT="", AN="")))
    vocab = {BOS: 0, UNK: 1}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
