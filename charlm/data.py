"""Corpus resolution, the character vocabulary, contiguous splits and index-arithmetic batches."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm import paths
from charlm.config import DataConfig
from charlm.errors import CharlmError

DEFAULT_NAME = "tinyshakespeare.txt"
DEFAULT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class DataError(CharlmError):
    """A corpus or text that cannot be used."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_corpus(path: str = "") -> Path:
    """The file to train on.

    An explicit ``data.path`` must exist. Otherwise tiny shakespeare is found in this order:
    ``data/tinyshakespeare.txt`` in the checkout, then ``$CHARLM_DATA_MIRROR``, then a download
    (sha256-verified) into ``data/``.
    """
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            raise DataError(f"Data file {path} is a folder; set data.path to a UTF-8 text file in it")
        if not p.is_file():
            raise DataError(f"Data file not found: {path} (set data.path to an existing UTF-8 text file)")
        return p
    local = paths.REPO_ROOT / "data" / DEFAULT_NAME
    if local.is_file():
        return local
    tried = [f"data/{DEFAULT_NAME} in the checkout (absent)"]
    mirror = os.environ.get("CHARLM_DATA_MIRROR", "")
    if mirror:
        m = Path(mirror).expanduser() / DEFAULT_NAME
        if m.is_file():
            got = sha256_file(m)
            if got == DEFAULT_SHA256:
                return m
            tried.append(f"CHARLM_DATA_MIRROR={mirror} (checksum mismatch: {got[:12]}...)")
        else:
            tried.append(f"CHARLM_DATA_MIRROR={mirror} (no {DEFAULT_NAME} there)")
    else:
        tried.append("CHARLM_DATA_MIRROR (not set)")
    url = os.environ.get("CHARLM_DATA_URL", DEFAULT_URL)
    try:
        return download(url, local, DEFAULT_SHA256)
    except DataError as e:
        tried.append(f"download from {url} ({e})")
    raise DataError(
        "Cannot find the tiny shakespeare corpus; tried " + "; ".join(tried)
        + f". Fix: copy the text to data/{DEFAULT_NAME}, or set CHARLM_DATA_MIRROR to a folder"
        " holding it, or allow the download, or set data.path to another text file"
    )


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically, keeping it only if its checksum matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            h = hashlib.sha256()
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha256:
            raise DataError(f"checksum mismatch: got {h.hexdigest()[:12]}..., want {sha256[:12]}...")
        os.replace(tmp, dest)
        return dest
    except DataError:
        raise
    except Exception as e:  # network errors come in many types; the message is what matters
        raise DataError(f"{type(e).__name__}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def text_file(path: str | Path, flag: str, purpose: str) -> Path:
    """A text file a flag names (``--text``): a folder or a missing file is one line naming the flag."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"Text file {path} is a folder; give {flag} a UTF-8 text file")
    if not p.is_file():
        raise DataError(f"Text file not found: {path} ({flag} names the UTF-8 text {purpose})")
    return p


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; a folder, a binary file or bytes that are not UTF-8 are refused."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e.strerror}") from None
    nul = text.find("\x00")
    if nul >= 0:  # valid UTF-8, but no text has NUL characters: an archive, an image, a checkpoint
        raise DataError(f"{path} looks binary (a NUL character at offset {nul}); give a UTF-8 text file")
    return text


class CharVocab:
    """Characters <-> integer ids, sorted so the same text always gives the same ids."""

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise DataError("A vocabulary must be a list of distinct single characters")
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.index.keys())

    def encode(self, text: str, skip_unknown: bool = False) -> torch.Tensor:
        missing = self.unknown(text)
        if missing:
            if not skip_unknown:
                shown = ", ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise DataError(
                    f"{len(missing)} character(s) not in the model's vocabulary: {shown}"
                    " (use --skip-unknown to drop them, or train on a text that has them)"
                )
            text = "".join(c for c in text if c in self.index)
        ids = [self.index[c] for c in text]
        dtype = torch.uint8 if len(self.chars) <= 256 else torch.int32
        return torch.tensor(ids, dtype=dtype)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_list(self) -> list[str]:
        return list(self.chars)


@dataclass
class Corpus:
    """One encoded text and its contiguous train/val/test splits (views, no copies)."""

    path: Path
    sha256: str
    vocab: CharVocab
    data: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val", "test"):
            raise DataError(f"Unknown split '{name}'; expected train | val | test")
        return getattr(self, name)

    def split_bounds(self, name: str) -> tuple[int, int]:
        """Character offsets ``[start, end)`` of a split in the original text."""
        n = len(self.data)
        n_train, n_val = _split_sizes(n, self.val_fraction, self.test_fraction)
        return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}[name]


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_train = int(n * (1 - val_fraction - test_fraction))
    n_val = int(n * (1 - test_fraction)) - n_train
    return n_train, n_val


def load_corpus(cfg: DataConfig) -> Corpus:
    path = resolve_corpus(cfg.path)
    text = read_text(path)
    if not text:
        raise DataError(f"Data file {path} is empty; give a text with at least a few thousand characters")
    vocab = CharVocab.from_text(text)
    data = vocab.encode(text)
    n_train, n_val = _split_sizes(len(data), cfg.val_fraction, cfg.test_fraction)
    n_test = len(data) - n_train - n_val
    need = cfg.context + 2
    if n_train < need or n_val < 2 or n_test < 2:
        raise DataError(
            f"{path} has {len(text)} characters: too short for data.context={cfg.context} with "
            f"splits {n_train}/{n_val}/{n_test}; give a longer text or a smaller context"
        )
    return Corpus(
        path=path, sha256=sha256_file(path), vocab=vocab, data=data,
        train=data[:n_train], val=data[n_train:n_train + n_val], test=data[n_train + n_val:],
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
    )


class Batcher:
    """Random training windows by index arithmetic on one tensor (no per-item Dataset)."""

    def __init__(self, data: torch.Tensor, length: int, batch_size: int, seed: int, device: str = "cpu"):
        self.data = data.long()
        self.length = min(length, len(data) - 1)
        self.batch_size = batch_size
        self.offsets = torch.arange(self.length + 1)
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.length, (self.batch_size,), generator=self.gen)
        chunk = self.data[starts[:, None] + self.offsets]  # (B, T+1), one gather
        chunk = chunk.to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]
