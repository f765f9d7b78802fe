"""Training data for the examples: Python source as bytes, in batches that are a function of their index.

The corpus is every ``*.py`` file under the running interpreter's standard library and site-packages, exact
duplicates removed, every 20th file held out. Bytes are tokens (no tokenizer): 256 byte values plus a few
specials.

``Batches`` makes batch i from (seed, i) alone, so a run resumed at step i reads exactly the batches a run
straight through would, and batches can be built ahead by DataLoader workers in any order.

``copies`` finds what in-context retrieval means in source code: bytes that continue a span seen earlier in
the same sequence (a 32-byte window that occurred before, followed there by the same byte), with the distance to
the earlier copy. A model that has learned to copy from context predicts those bytes well, and how well
depends on the distance it can reach back: the loss on them, by distance, is the retrieval measure.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPECIALS = 3  # byte-level vocabulary: 256 bytes + <bos>, <eos>, <pad>
VOCAB = 256 + SPECIALS


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    """uint8 bytes of the training files, concatenated."""
    heldout: torch.Tensor
    """uint8 bytes of every 20th file."""
    files: int
    duplicates: int
    roots: tuple[str, ...]
    documents: torch.Tensor
    """int64 offsets in ``train`` where a document begins: one directory's training files, concatenated in path
    order (a package's modules, a test folder): lengths from a few bytes to megabytes, as packed pre-training
    sees them."""

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
    documents, folder = [], None
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
            if files % holdout_every:
                if path.parent != folder:
                    folder = path.parent
                    documents.append(len(train))
                train.extend(text)
            else:
                held.extend(text)
            files += 1
    return Corpus(torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(held, dtype=torch.uint8), files,
                  duplicates, tuple(map(str, roots)), torch.tensor(documents, dtype=torch.long))


class Batches(torch.utils.data.Dataset):
    """Batch i: ``batch`` random crops of ``length`` bytes of ``data`` (int64, (batch, length)), drawn from a
    generator seeded with (seed, i) alone."""

    def __init__(self, data: torch.Tensor, batch: int, length: int, seed: int) -> None:
        if data.numel() <= length:
            raise ValueError(f"Batches: {data.numel()} bytes of data cannot give crops of {length}")
        self.data, self.batch, self.length, self.seed = data, batch, length, seed

    def __len__(self) -> int:
        return 2**62

    def crops(self, i: int) -> list[int]:
        """Where batch i's crops start in ``data``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.randint(0, self.data.numel() - self.length, (self.batch,), generator=generator).tolist()

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.data[s : s + self.length] for s in self.crops(i)]).long()


class PackedBatches(Batches):
    """Batch i as ``Batches`` makes it, with the position ids of packed documents: they restart at 0 where a document
    of ``documents`` (offsets in ``data``) begins inside a crop, as DataCollatorWithFlattening makes them."""

    def __init__(self, data: torch.Tensor, documents: torch.Tensor, batch: int, length: int, seed: int) -> None:
        super().__init__(data, batch, length, seed)
        self.begins = torch.zeros(data.numel(), dtype=torch.bool)
        self.begins[documents] = True

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        begins = torch.stack([self.begins[s : s + self.length] for s in self.crops(i)])
        begins[:, 0] = True
        t = torch.arange(self.length).expand_as(begins)
        first = torch.cummax(torch.where(begins, t, 0), dim=1).values  # each token's document's first token
        return super().__getitem__(i), t - first


WINDOW = 32
"""Bytes of context that must have occurred before for the next byte to count as a copy."""
DISTINCT = 8
"""Distinct byte values a window needs (runs of indentation repeat everywhere and say nothing about retrieval)."""


@dataclass(frozen=True)
class Copies:
    """Where a sequence continues a span seen earlier: target positions (the byte at t + 1 follows the window
    ending at t, as seen earlier) and the distance back to the earlier occurrence."""

    positions: torch.Tensor
    distances: torch.Tensor


def copies(seq: torch.Tensor, window: int = WINDOW, distinct: int = DISTINCT) -> Copies:
    """The copy positions of one sequence, in order (1-D int64 of byte values): prediction positions t (the model at t
    predicts seq[t + 1]) where seq[t + 1 - window : t + 1] occurred before, ending at s < t, and seq[s + 1] equals
    seq[t + 1]; the most recent such s counts, at distance t - s. Windows are compared by a 64-bit polynomial hash."""
    x = seq.numpy().astype(np.uint64)
    n = x.size
    if n <= window + 1:
        return Copies(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    # h[e] = hash of x[e - window + 1 : e + 1], from prefix sums of x[k] * P^-k (P is odd, so invertible mod 2^64)
    with np.errstate(over="ignore"):
        p = np.uint64(0x100000001B3)
        p_inv = np.uint64(pow(int(p), -1, 2**64))
        powers = np.cumprod(np.full(n, p, dtype=np.uint64))  # P^1 .. P^n
        inverse = np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, p_inv, dtype=np.uint64))])  # P^-k
        prefix = np.cumsum(x * inverse, dtype=np.uint64)  # sum_{k <= e} x[k] P^-k
        ends = np.arange(window - 1, n - 1)  # windows that have a next byte
        before = np.concatenate([[np.uint64(0)], prefix])[ends - window + 1]
        hashes = (prefix[ends] - before) * powers[ends]
    windows = np.lib.stride_tricks.sliding_window_view(x, window)[ends - window + 1]
    varied = (np.diff(np.sort(windows, axis=1), axis=1) != 0).sum(axis=1) + 1 >= distinct
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in position order: the previous one is the latest
    same = hashes[order[1:]] == hashes[order[:-1]]
    later, earlier = ends[order[1:][same]], ends[order[:-1][same]]
    keep = varied[later - window + 1] & (x[later + 1] == x[earlier + 1])
    order = np.argsort(later[keep])
    later, earlier = later[keep][order], earlier[keep][order]
    return Copies(torch.from_numpy(later).long(), torch.from_numpy(later - earlier).long())
