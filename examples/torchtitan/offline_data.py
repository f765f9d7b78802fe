"""Training data for torchtitan without a hub: a byte-level tokenizer and a dataset of local text files, each
through torchtitan's own extension point.

- ``byte_tokenizer(folder)`` writes ``tokenizer.json`` and ``tokenizer_config.json`` (the files torchtitan's
  ``HuggingFaceTokenizer`` reads from ``--hf_assets_path``): token id = byte value for the UTF-8 bytes of the
  text, 256 = ``<|begin_of_text|>``, 257 = ``<|end_of_text|>``. It fits any model whose vocabulary holds 258 ids.
- ``register_local_files()`` adds ``"local_files"`` to torchtitan's ``DATASETS`` registry (what its
  ``docs/datasets.md`` asks a user to do): every ``*.py`` file under ``--dataloader.dataset_path``, in sorted
  order, one document each (datasets' own ``text`` builder: memory-mapped, cached, offline); by default the
  running interpreter's standard library.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from pathlib import Path

LOCAL_FILES = "local_files"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _byte_chars() -> list[str]:
    """The character byte-level BPE writes for each byte value (printable Latin-1 as itself, others moved up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


def _write_atomically(path: Path, text: str) -> None:
    # every rank builds the config: a reader must never see a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def byte_tokenizer(folder: str | Path) -> str:
    """Write the byte-level tokenizer into ``folder`` (created if needed); returns it for ``hf_assets_path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "tokenizer.json", tokenizer.to_str())
    _write_atomically(folder / "tokenizer_config.json", json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return str(folder)


def _read_files(path: str):
    from datasets import load_dataset

    files = sorted(str(f) for f in Path(path).rglob("*.py"))
    if not files:
        raise FileNotFoundError(f"dataset {LOCAL_FILES!r}: no *.py file under {path!r} (--dataloader.dataset_path)")
    # datasets' own local text builder: one sample per file, memory-mapped and cached, so a corpus larger than
    # memory works too; undecodable bytes become U+FFFD rather than dropping the file (a source file with a
    # stray Latin-1 byte is still training data)
    return load_dataset("text", data_files=files, sample_by="document", encoding_errors="replace", split="train")


def register_local_files() -> None:
    """Make ``--dataloader.dataset local_files`` available to torchtitan's text dataloader."""
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS[LOCAL_FILES] = DatasetConfig(path=sysconfig.get_paths()["stdlib"], loader=_read_files,
                                          sample_processor=lambda sample: sample["text"])
