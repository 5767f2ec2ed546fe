"""Strings in, padded token tensors out: loading, tokenizers, vocabulary, batching.

A string is split into tokens by a tokenizer ('char': one token per character;
'smiles': atom-level SMILES tokens), mapped to ids by a :class:`Vocabulary`
with four special tokens (pad, bos, eos, unk), and stored as an
:class:`EncodedStrings` table: each row is the string's tokens followed by
eos, padded with pad. The decoder reads ``bos + tokens`` and predicts
``tokens + eos``.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Atom-level SMILES tokens: bracket atoms ([nH], [C@@H], [O-], [13CH3]) are
# one token, as are the two-letter organic-subset atoms Cl and Br and the
# two-digit ring closures %10..%99. The final alternative makes every other
# character its own token, so unknown characters reach the vocabulary (which
# names them) instead of being dropped here.
_SMILES_TOKEN = re.compile(
    r"(\[[^\[\]]+\]|Br|Cl|%\d{2}|[BCNOPSFI]|[bcnops]|[()=#\-+\\/:~@?>*$.]|\d|.)",
    re.DOTALL,
)


def tokenize_chars(string: str) -> list[str]:
    return list(string)


def tokenize_smiles(string: str) -> list[str]:
    """Split a SMILES string into atom-level tokens; ''.join(tokens) == string."""
    if "[" in string or "]" in string:
        # An unbalanced bracket would otherwise split into single characters
        # silently; say what is wrong instead.
        depth = 0
        for ch in string:
            depth += {"[": 1, "]": -1}.get(ch, 0)
            if depth not in (0, 1):
                raise ValueError(f"unbalanced or nested brackets in SMILES {string!r}")
        if depth != 0:
            raise ValueError(f"unbalanced brackets in SMILES {string!r}")
    return _SMILES_TOKEN.findall(string)


TOKENIZERS = {"char": tokenize_chars, "smiles": tokenize_smiles}


def check_tokenizer(name: str) -> str:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {tuple(TOKENIZERS)}")
    return name


# ---------------------------------------------------------------------------
# Loading


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            return handle.read()
    except (EOFError, UnicodeDecodeError, gzip.BadGzipFile, zlib.error) as exc:
        # A truncated or corrupt .gz, or bytes that are not UTF-8 text.
        raise ValueError(f"data file {str(path)!r} cannot be read: {exc}") from None


def load_strings(source, column: str | None = None, header: bool = True) -> list[str]:
    """Strings from a list, a text file (one per line) or a CSV file.

    - a list/tuple of str: returned as a list (checked to be all str);
    - ``*.csv`` / ``*.csv.gz``: the strings are the column named ``column``, or
      the first column if ``column`` is None; the first row is a header unless
      ``header`` is False (then ``column`` must be None);
    - any other file (``.txt``, ``.smi``, optionally ``.gz``): one string per
      non-blank line; for ``.smi``/``.smi.gz`` only the first whitespace-separated
      field (SMILES files often carry a name after the SMILES).

    Raises ValueError for an empty source or a missing column and
    FileNotFoundError for a missing file.
    """
    if isinstance(source, (list, tuple)):
        bad = [type(s).__name__ for s in source if not isinstance(s, str)]
        if bad:
            raise TypeError(f"every string must be a str, got {bad[0]}")
        strings = list(source)
        if not strings:
            raise ValueError("no strings given: the list is empty")
        return strings
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a list of str, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    name = path.name.lower()
    text = _read_text(path)
    if name.endswith((".csv", ".csv.gz")):
        rows = list(csv.reader(io.StringIO(text)))
        rows = [r for r in rows if any(cell.strip() for cell in r)]
        if not rows:
            raise ValueError(f"data file {str(path)!r} is empty")
        names = [h.strip() for h in rows[0]] if header else []
        if column is None:
            index = 0
        elif not header:
            raise ValueError("a column name needs a CSV header row (header=True)")
        elif column in names:
            index = names.index(column)
        else:
            raise ValueError(f"column {column!r} not in {str(path)!r}; its columns are {names}")
        body = rows[1:] if header else rows
        strings = []
        for lineno, row in enumerate(body, start=2 if header else 1):
            if index >= len(row):
                raise ValueError(f"{str(path)!r} row {lineno} has no column {index}")
            strings.append(row[index].strip())
    else:
        if column is not None:
            raise ValueError("column applies to CSV files only")
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if name.endswith((".smi", ".smi.gz")):
            lines = [line.split()[0] for line in lines]
        strings = lines
    if not strings:
        raise ValueError(f"data file {str(path)!r} contains no strings")
    return strings


# ---------------------------------------------------------------------------
# Vocabulary


class Vocabulary:
    """Token <-> id map with special tokens pad=0, bos=1, eos=2, unk=3.

    ``encode`` raises on a token outside the vocabulary unless
    ``unknown='unk'`` asks to map it to <unk>; ``max_length`` (tokens, not
    counting eos) bounds the strings it accepts.
    """

    def __init__(self, tokens: Iterable[str], tokenizer: str = "char"):
        self.tokenizer = check_tokenizer(tokenizer)
        regular = []
        seen = set(SPECIAL_TOKENS)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"vocabulary tokens must be non-empty str, got {token!r}")
            if token in seen:
                if token in SPECIAL_TOKENS:
                    raise ValueError(f"token {token!r} collides with a special token")
                continue
            seen.add(token)
            regular.append(token)
        self.itos: list[str] = [*SPECIAL_TOKENS, *regular]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.unk = (self.stoi[t] for t in SPECIAL_TOKENS)
        self._tokenize = TOKENIZERS[tokenizer]

    @classmethod
    def build(cls, strings: Sequence[str], tokenizer: str = "char") -> Vocabulary:
        """The vocabulary of every token in ``strings``, in sorted order."""
        check_tokenizer(tokenizer)
        tokenize = TOKENIZERS[tokenizer]
        tokens = set()
        for s in strings:
            tokens.update(tokenize(s))
        if not tokens and not strings:
            raise ValueError("cannot build a vocabulary from no strings")
        return cls(sorted(tokens), tokenizer)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and (self.itos, self.tokenizer) == (
            other.itos,
            other.tokenizer,
        )

    @property
    def regular_tokens(self) -> list[str]:
        return self.itos[len(SPECIAL_TOKENS) :]

    def tokenize(self, string: str) -> list[str]:
        if not isinstance(string, str):
            raise TypeError(f"expected a str, got {type(string).__name__}")
        return self._tokenize(string)

    def encode(
        self, string: str, max_length: int | None = None, unknown: str = "error"
    ) -> list[int]:
        """Token ids of ``string`` (no bos/eos)."""
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        tokens = self.tokenize(string)
        if max_length is not None and len(tokens) > max_length:
            raise ValueError(
                f"string {string[:60]!r} has {len(tokens)} tokens, more than max_length={max_length}"
            )
        ids = []
        for token in tokens:
            index = self.stoi.get(token)
            if index is None or index < len(SPECIAL_TOKENS):
                if unknown == "unk":
                    index = self.unk
                else:
                    raise ValueError(
                        f"token {token!r} in {string[:60]!r} is not in the vocabulary "
                        f"(tokenizer {self.tokenizer!r})"
                    )
            ids.append(index)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The string of regular-token ids (no special tokens allowed)."""
        out = []
        for i in ids:
            i = int(i)
            if not len(SPECIAL_TOKENS) <= i < len(self.itos):
                raise ValueError(f"id {i} is not a regular token of this vocabulary")
            out.append(self.itos[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"tokens": self.regular_tokens, "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, state: dict) -> Vocabulary:
        return cls(state["tokens"], state["tokenizer"])


# ---------------------------------------------------------------------------
# Encoded tables and batches


@dataclass(frozen=True)
class SequenceBatch:
    """A batch for the model: ``tokens`` is (B, T) int64, each row the string's
    ids then eos then pad; ``lengths`` (B,) int64 counts the ids plus eos."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(self.tokens.to(device), self.lengths.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class EncodedStrings:
    """All strings of a data set as one padded id table (see SequenceBatch)."""

    def __init__(
        self, strings: Sequence[str], vocabulary: Vocabulary, max_length: int | None = None
    ):
        strings = load_strings(list(strings))
        encoded = [vocabulary.encode(s, max_length=max_length) for s in strings]
        lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
        width = int(lengths.max())
        table = np.full((len(encoded), width), vocabulary.pad, dtype=np.int64)
        for row, ids in enumerate(encoded):
            table[row, : len(ids)] = ids
            table[row, len(ids)] = vocabulary.eos
        self.strings = list(strings)
        self.vocabulary = vocabulary
        self.tokens = torch.from_numpy(table)
        self.lengths = torch.from_numpy(lengths)
        self._lengths_np = lengths

    def __len__(self) -> int:
        return len(self.strings)

    def to(self, device) -> EncodedStrings:
        self.tokens = self.tokens.to(device)
        self.lengths = self.lengths.to(device)
        return self

    def batch(self, index: np.ndarray) -> SequenceBatch:
        """Rows ``index`` trimmed to their longest row (so no all-pad columns)."""
        index = np.asarray(index, dtype=np.int64)
        width = int(self._lengths_np[index].max())
        rows = torch.from_numpy(index).to(self.tokens.device)
        return SequenceBatch(self.tokens[rows, :width], self.lengths[rows])

    def batches(
        self, batch_size: int, seed: int, epoch: int, shuffle: bool = True, bucket: bool = False
    ) -> Iterator[SequenceBatch]:
        lengths = self._lengths_np if bucket else None
        for index in batch_order(len(self), batch_size, seed, epoch, shuffle, lengths):
            yield self.batch(index)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch).

    Deriving the order from the pair (not from a running RNG) is what lets a
    resumed run see exactly the batches an uninterrupted run would.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n)


BUCKET_POOL = 64  # batches per length-sorted pool when bucketing


def batch_order(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The batches of one epoch, a function of (seed, epoch) only (exact resume).

    With ``lengths``, batches are length-bucketed to cut padding: the epoch's
    permutation is cut into pools of ``BUCKET_POOL`` batches, each pool is
    sorted by length (stably, so equal lengths keep the permuted order) and
    cut into batches, and the epoch's batches are then shuffled by a generator
    of the same (seed, epoch). Every index still appears exactly once.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    lengths = np.asarray(lengths)
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
    pool = BUCKET_POOL * batch_size
    batches = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        seq = np.random.SeedSequence([int(seed), int(epoch), 1])  # 1: the bucket shuffle
        np.random.Generator(np.random.PCG64(seq)).shuffle(batches)
    return batches


def encode_strings(
    strings: Sequence[str], vocabulary: Vocabulary, max_length: int | None = None
) -> SequenceBatch:
    """One SequenceBatch holding ``strings`` in order."""
    table = EncodedStrings(strings, vocabulary, max_length)
    return SequenceBatch(table.tokens, table.lengths)
