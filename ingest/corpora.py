"""Corpora: IOI / ABC generators, .jsonl and .txt files, Hugging Face datasets.

A corpus yields :class:`CorpusItem` records in a stable order (so shards and resumes agree on
what prompt N is) and records every bad line (its number and why) instead of stopping.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ingest import ioi
from ingest.errors import UserFacingError


@dataclass
class CorpusItem:
    prompt_id: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class BadLine:
    line: int
    reason: str


@dataclass
class Corpus:
    """A parsed corpus spec; iterate ``items()``; ``bad_lines`` fills as it is read."""

    spec: str
    kind: str
    bad_lines: list[BadLine] = field(default_factory=list)
    _items: list[CorpusItem] | None = None

    def items(self) -> list[CorpusItem]:
        if self._items is None:
            self._items = list(self._read())
        return self._items

    def _read(self) -> Iterator[CorpusItem]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of the spec and every prompt's id and text: what a run manifest records."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.spec.encode())
        for item in self.items():
            h.update(item.prompt_id.encode() + b"\0" + item.text.encode() + b"\0")
        return h.hexdigest()


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class IoiCorpus(Corpus):
    def __init__(self, spec: str, kind: str, n: int, seed: int, vocab: dict):
        super().__init__(spec, kind)
        self.n, self.seed, self.vocab = n, seed, vocab

    def _read(self):
        rng = random.Random(self.seed)
        make = ioi.ioi_prompt if self.kind == "ioi" else ioi.abc_prompt
        for i in range(self.n):
            p = make(rng, **self.vocab)
            yield CorpusItem(f"{self.kind}-{self.seed}-{i:06d}", p.text, {**p.meta, "answer": p.answer})


class FileCorpus(Corpus):
    def __init__(self, spec: str, path: Path):
        super().__init__(spec, "jsonl" if path.suffix == ".jsonl" else "txt")
        self.path = path

    def _read(self):
        """Lines that do not decode as UTF-8 and ids seen before are bad lines (never silently
        replaced characters, never a second prompt under one id); a byte-order mark is dropped."""
        first_line: dict[str, int] = {}
        with self.path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.bad_lines.append(BadLine(number, f"not UTF-8 (byte {exc.start} of the line)"))
                    continue
                if number == 1:
                    line = line.removeprefix("\ufeff")
                item = self._parse(number, line.rstrip("\n"))
                if item is None:
                    continue
                if item.prompt_id in first_line:
                    self.bad_lines.append(BadLine(number, f"duplicate id {item.prompt_id!r} "
                                                          f"(first on line {first_line[item.prompt_id]})"))
                    continue
                first_line[item.prompt_id] = number
                yield item

    def _parse(self, number: int, line: str) -> CorpusItem | None:
        if self.kind == "txt":
            if not line.strip():
                self.bad_lines.append(BadLine(number, "empty line"))
                return None
            return CorpusItem(f"line-{number:06d}", line)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            self.bad_lines.append(BadLine(number, f"not JSON ({exc.msg})"))
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            self.bad_lines.append(BadLine(number, 'no "text" string'))
            return None
        if not obj["text"].strip():
            self.bad_lines.append(BadLine(number, "empty text"))
            return None
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        return CorpusItem(str(obj.get("id", f"line-{number:06d}")), obj["text"], meta)


class HfCorpus(Corpus):
    def __init__(self, spec: str, dataset: str, split: str, column: str):
        super().__init__(spec, "hf")
        self.dataset, self.split, self.column = dataset, split, column

    def _read(self):
        try:
            import datasets
        except ImportError:
            raise UserFacingError(f"corpus {self.spec}: the `datasets` library is not installed "
                                  "(pip install datasets)") from None
        try:
            ds = datasets.load_dataset(self.dataset, split=self.split)
        except Exception as exc:  # hub/network errors of many types
            raise UserFacingError(f"corpus {self.spec}: could not load dataset {self.dataset!r} split "
                                  f"{self.split!r} ({type(exc).__name__}); it is neither cached nor reachable") from None
        if self.column not in ds.column_names:
            raise UserFacingError(f"corpus {self.spec}: no column {self.column!r} (has {ds.column_names})")
        for i, row in enumerate(ds):
            text = row[self.column]
            if not isinstance(text, str) or not text.strip():
                self.bad_lines.append(BadLine(i + 1, "empty or non-text value"))
                continue
            yield CorpusItem(f"{self.split}-{i:08d}", text)


def gpt2_vocab(tokenizer) -> dict:
    """IOI word lists filtered to words that are one token with a leading space."""
    def single(words):
        keep = []
        for w in words:
            try:
                tokenizer.token_id(" " + w)
                keep.append(w)
            except KeyError:
                pass
        return keep
    return {"names": single(ioi.NAMES), "places": single(ioi.PLACES), "objects": single(ioi.OBJECTS)}


def open_corpus(spec: str, tokenizer=None, toy: bool = True) -> Corpus:
    """Parse a corpus spec: ioi:N[:seed], abc:N[:seed], PATH.jsonl, PATH.txt, hf:DATASET[:SPLIT[:COLUMN]]."""
    head, _, rest = spec.partition(":")
    if head in ("ioi", "abc"):
        parts = rest.split(":") if rest else []
        try:
            n = int(parts[0])
            seed = int(parts[1]) if len(parts) > 1 else 0
        except (IndexError, ValueError):
            raise UserFacingError(f"corpus {spec!r}: expected {head}:N[:seed] with integers") from None
        if n <= 0:
            raise UserFacingError(f"corpus {spec!r}: N must be positive")
        vocab = {} if toy or tokenizer is None else gpt2_vocab(tokenizer)
        return IoiCorpus(spec, head, n, seed, vocab)
    if head == "hf":
        parts = rest.split(":")
        if not parts[0]:
            raise UserFacingError(f"corpus {spec!r}: expected hf:DATASET[:SPLIT[:COLUMN]]")
        return HfCorpus(spec, parts[0], parts[1] if len(parts) > 1 else "train", parts[2] if len(parts) > 2 else "text")
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserFacingError(f"corpus {spec} is a directory; give a .jsonl or .txt file")
    if path.suffix in (".jsonl", ".txt"):
        if not path.is_file():
            raise UserFacingError(f"corpus file {spec} does not exist")
        return FileCorpus(spec, path)
    raise UserFacingError(f"corpus {spec!r} not understood: use ioi:N[:seed], abc:N[:seed], a .jsonl or .txt "
                          "file, or hf:DATASET[:SPLIT[:COLUMN]]")
