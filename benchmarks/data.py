"""Byte-level training data for the training comparison: a vocabulary of 256, so no tokenizer to download.

The default corpus is the source code of the running Python's standard library: present on every machine,
deterministic (files in sorted order), and real text with long-range structure. ``--data`` takes text files
or globs instead, or the name of a Hugging Face dataset when the ``datasets`` package is installed and the
network is reachable.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
#: Default cap on the corpus size: enough text for a few minutes of training, quick to read.
DEFAULT_MAX_BYTES = 8 * 2**20


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files in sorted order, third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.rglob("*.py"))
    return [f for f in files if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)]


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand paths and globs into files, in the order given (each glob sorted). Empty if nothing matches."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        files.extend(Path(m) for m in matches if os.path.isfile(m))
    return files


def read_files(files: list[Path], max_bytes: int) -> bytes:
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(chunks)


def read_hf_dataset(name: str, max_bytes: int) -> bytes:
    """The ``text`` column (or first string column) of a Hugging Face dataset's train split, streamed."""
    try:
        import datasets
    except ImportError:
        raise SystemExit(
            f"--data {name!r} matches no file, and the `datasets` package needed to load it as a Hugging Face "
            "dataset is not installed (pip install datasets)"
        ) from None
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        chunks, total = [], 0
        for row in stream:
            column = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise ValueError(f"no string column in the rows (columns: {sorted(row)})")
            data = row[column].encode()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
    except Exception as e:
        raise SystemExit(
            f"--data {name!r} matches no file and could not be loaded as a Hugging Face dataset: {e}"
        ) from e
    return b"\n".join(chunks)[:max_bytes]


def load_corpus(data: list[str] | None, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """The corpus bytes and a description of where they came from."""
    if not data:
        files = stdlib_files()
        return read_files(files, max_bytes), f"Python {sysconfig.get_python_version()} standard library source"
    files = resolve_files(data)
    if files:
        return read_files(files, max_bytes), f"{len(files)} file(s) from {' '.join(data)}"
    if len(data) > 1:
        raise SystemExit(f"--data: none of {data} matches a file")
    return read_hf_dataset(data[0], max_bytes), f"Hugging Face dataset {data[0]}"


class ByteDataset:
    """Random training windows and a fixed set of validation windows over a byte corpus.

    The last ``val_fraction`` of the corpus is held out. With the default corpus (files in sorted order)
    that is whole modules the model never trains on.
    """

    def __init__(self, corpus: bytes, seq_len: int, val_fraction: float = 0.05) -> None:
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        split = int(len(tokens) * (1 - val_fraction))
        self.train, self.val = tokens[:split], tokens[split:]
        self.seq_len = seq_len
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) <= seq_len + 1:
                raise ValueError(
                    f"ByteDataset: the {name} split has {len(part)} bytes, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1}; give more data or a shorter --seq-len"
                )

    def _windows(self, part: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = part[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.train) - self.seq_len - 1, (batch_size,), generator=generator)
        return self._windows(self.train, starts)

    def train_batches(self, batch_size: int, segments: list[tuple[int, int]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches: ``steps`` batches from a generator seeded with ``seed``, for each ``(steps, seed)``.

        One segment ``[(steps, seed)]`` gives every run of the same seed the same batches; several chain them
        (finetune.py's BitNet from scratch sees exactly the pretraining batches, then the conversion batches)."""
        for steps, seed in segments:
            generator = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                yield self.train_batch(batch_size, generator)

    def val_batches(self, batch_size: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        """``n_batches`` batches of windows spread evenly over the validation split, the same every call."""
        count = batch_size * n_batches
        starts = torch.linspace(0, len(self.val) - self.seq_len - 1, count).long()
        return [self._windows(self.val, s) for s in starts.split(batch_size)]
