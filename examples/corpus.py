"""Training data for the examples: Python source as bytes, with a key-value retrieval probe mixed in.

The corpus is every ``*.py`` file under the running interpreter's standard library and site-packages, exact
duplicates removed, every 20th file held out. Bytes are tokens (no tokenizer): 256 byte values plus a few
specials.

The probe gives a small model something long-range to learn and us something to measure: a few lines
``abcde = 12345`` are inserted at random line boundaries before the last ``tail`` bytes of a sequence, and a
few of them are asked for in those last bytes as ``assert abcde == 12345``. Training sees probes in every
sequence (under 1% of its bytes at 32K); the held-out probe uses fresh keys and scores the five digits of each
answer under teacher forcing.
"""

from __future__ import annotations

import functools
import hashlib
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

SPECIALS = 3  # byte-level vocabulary: 256 bytes + <bos>, <eos>, <pad>
VOCAB = 256 + SPECIALS
NAME_LEN, DIGITS = 5, 5
KEY_LINE = NAME_LEN + len(" = ") + DIGITS + 1  # "abcde = 12345\n"
QUERY_PREFIX = len("assert ") + NAME_LEN + len(" == ")
QUERY_LINE = QUERY_PREFIX + DIGITS + 1  # "assert abcde == 12345\n"
DIGIT_IDS = torch.arange(ord("0"), ord("9") + 1)


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    """uint8 bytes of the training files, concatenated."""
    heldout: torch.Tensor
    """uint8 bytes of every 20th file."""
    files: int
    duplicates: int
    roots: tuple[str, ...]

    def describe(self) -> str:
        return (f"corpus: {self.train.numel() / 1e6:.1f} MB train, {self.heldout.numel() / 1e6:.1f} MB held out, "
                f"{self.files} unique .py files ({self.duplicates} exact duplicates dropped) under "
                f"{', '.join(self.roots)}")


@functools.lru_cache(maxsize=1)
def python_corpus(holdout_every: int = 20) -> Corpus:
    """Every unique .py file of this interpreter's stdlib and site-packages; every ``holdout_every``-th held out."""
    paths = sysconfig.get_paths()
    roots = sorted({Path(paths[k]) for k in ("stdlib", "purelib", "platlib")})
    seen: set[bytes] = set()
    train, held = bytearray(), bytearray()
    files = duplicates = 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_bytes()
            except OSError:  # broken links, unreadable files: not data
                continue
            digest = hashlib.blake2b(text, digest_size=16).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            (held if files % holdout_every == 0 else train).extend(text)
            files += 1
    return Corpus(torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(held, dtype=torch.uint8), files,
                  duplicates, tuple(map(str, roots)))


@dataclass(frozen=True)
class Probe:
    """How many key lines and queries go into each sequence, and the tail of bytes the queries sit in."""

    keys: int
    queries: int
    tail: int

    def __post_init__(self) -> None:
        if not 0 < self.queries <= self.keys:
            raise ValueError(f"Probe: queries={self.queries} must be between 1 and keys={self.keys}")
        if self.tail < self.queries * QUERY_LINE:
            raise ValueError(f"Probe: tail={self.tail} bytes cannot hold {self.queries} query lines of {QUERY_LINE}")

    @property
    def bytes(self) -> int:
        return self.keys * KEY_LINE + self.queries * QUERY_LINE


@dataclass(frozen=True)
class Answers:
    """Where the answers of a probed sequence are: the first digit's position and the key line's distance."""

    digit_at: torch.Tensor  # (queries,) position of the first answer digit
    distance: torch.Tensor  # (queries,) bytes from the key line to the query line


def _line_starts(text: torch.Tensor) -> torch.Tensor:
    starts = (text[:-1] == ord("\n")).nonzero().flatten() + 1
    return torch.cat([torch.zeros(1, dtype=starts.dtype), starts])


def _choose(candidates: torch.Tensor, count: int, lo: int, hi: int, generator: torch.Generator) -> list[int]:
    """``count`` insertion points among the line starts in [lo, hi) (any position there when too few)."""
    inside = candidates[(candidates >= lo) & (candidates < hi)]
    if inside.numel() < count:
        inside = torch.arange(lo, hi)
    return sorted(inside[torch.randperm(inside.numel(), generator=generator)[:count]].tolist())


def probed(text: torch.Tensor, probe: Probe, generator: torch.Generator) -> tuple[torch.Tensor, Answers]:
    """``text`` with ``probe.bytes`` bytes of key lines and queries inserted, and where the answers are."""
    letters = torch.randint(0, 26, (probe.keys, NAME_LEN), generator=generator)
    names = ["".join(string.ascii_lowercase[i] for i in row) for row in letters.tolist()]
    values = torch.randint(0, 10**DIGITS, (probe.keys,), generator=generator).tolist()
    asked = sorted(torch.randperm(probe.keys, generator=generator)[: probe.queries].tolist())
    starts = _line_starts(text)
    tail_start = text.numel() - (probe.tail - probe.queries * QUERY_LINE)
    key_at = _choose(starts, probe.keys, 0, tail_start, generator)
    query_at = _choose(starts, probe.queries, tail_start, text.numel(), generator)
    inserts = [(at, f"{names[i]} = {values[i]:0{DIGITS}d}\n", i) for i, at in enumerate(key_at)]
    order = torch.randperm(probe.queries, generator=generator).tolist()  # which key each query asks, in order
    inserts += [(at, f"assert {names[asked[j]]} == {values[asked[j]]:0{DIGITS}d}\n", -1 - asked[j])
                for at, j in zip(query_at, order)]
    inserts.sort(key=lambda ins: ins[0])
    pieces, placed, digit_at, distance, last = [], {}, [], [], 0
    length = 0
    for at, line, tag in inserts:
        pieces.append(text[last:at])
        length += at - last
        if tag >= 0:
            placed[tag] = length
        else:
            digit_at.append(length + QUERY_PREFIX)
            distance.append(length - placed[-1 - tag])
        pieces.append(torch.tensor(list(line.encode()), dtype=torch.uint8))
        length += len(line)
        last = at
    pieces.append(text[last:])
    return torch.cat(pieces), Answers(torch.tensor(digit_at), torch.tensor(distance))


def sequences(data: torch.Tensor, batch: int, length: int, generator: torch.Generator, probe: Probe | None = None
              ) -> Iterator[tuple[torch.Tensor, list[Answers]]]:
    """Endless batches (batch, length) int64 of random crops of ``data``, each probed when ``probe`` is given."""
    crop = length - (probe.bytes if probe else 0)
    while True:
        starts = torch.randint(0, data.numel() - crop, (batch,), generator=generator).tolist()
        rows, answers = [], []
        for s in starts:
            text = data[s : s + crop]
            if probe is not None:
                text, where = probed(text, probe, generator)
                answers.append(where)
            rows.append(text)
        yield torch.stack(rows).long(), answers
