"""Checkpoints as plain data: weights, resolved config, vocabulary and metadata in one file.

Written atomically (temp file + rename) so a kill mid-write never leaves a file that loads wrong;
read with ``torch.load(weights_only=True)``, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn as nn

from charlm import interrupts
from charlm.config import Config, from_dict, to_dict
from charlm.data import CharVocab
from charlm.errors import CharlmError, OutsideFault, first_line
from charlm.models import build_model

FORMAT = "charlm-checkpoint/1"
FILENAME = "model.pt"


class CheckpointError(CharlmError):
    """A checkpoint that is missing, corrupt or not ours."""


@dataclass
class Loaded:
    model: nn.Module
    vocab: CharVocab
    cfg: Config
    meta: dict[str, Any]
    path: Path


def write_atomic(path: Path, write: Callable[[BinaryIO], Any], durable: bool = True) -> Path:
    """Create ``path`` through ``write(file)`` on a temporary file beside it, then rename: a kill
    at any moment leaves either the old file or the complete new one, never a partial one. A
    Ctrl-C or SIGTERM waits for the file to be complete (raised inside ``torch.save``, it broke
    the zip writer, whose RuntimeError then hid the signal's exit code). ``durable`` also waits for
    the disk (fsync), so the file outlives a crash of the machine too; a file whose loss costs only
    a redone stretch of training (a resume state, checked when read) skips that wait."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        with interrupts.deferred():
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("write", "inline_container",
                                                                                  "unexpected pos")):
            raise
        raise _unwritable(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _unwritable(path: Path, e: Exception) -> OutsideFault:
    """A file that could not be written: one line naming it, with the room left on its disk (the
    old file, if any, is still whole: the write went to a temporary file)."""
    import shutil

    reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        reason += f", {free / 2**20:,.0f} MB free on its disk"
    return OutsideFault(f"Cannot write {path} ({reason}); free space on its disk or choose another place")


def save(path: Path, model: nn.Module, cfg: Config, vocab: CharVocab, meta: dict[str, Any]) -> Path:
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "model": state, "config": to_dict(cfg), "vocab": vocab.to_list(), "meta": meta}
    return write_atomic(path, lambda f: torch.save(blob, f))


def state_bytes(cfg: Config, vocab_size: int) -> int:
    """About the bytes a run writes at once: its training state holds the weights, the best weights
    and Adam's two moments, 4 bytes a number each (the model built on the meta device: no memory)."""
    import dataclasses

    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mix_order=0)), vocab_size)
    except Exception:  # a model whose constructor computes on its tensors: no estimate, the floor alone
        return 0
    return 16 * sum(p.numel() for p in model.parameters())


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a folder holding ``model.pt`` (directly, or the newest one level down,
    so ``mlruns/best`` means the most recent ``mlruns/best/<study>/model.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / FILENAME).is_file():
            return p / FILENAME
        below = sorted(p.glob(f"*/{FILENAME}"), key=lambda c: c.stat().st_mtime, reverse=True)
        if below:
            return below[0]
        raise CheckpointError(f"No {FILENAME} in folder {path}; give a checkpoint file or a folder holding one")
    if not p.is_file():
        raise CheckpointError(f"Checkpoint not found: {path} (give a {FILENAME} file or a folder holding one)")
    return p


def model_kind(path: str | Path) -> str:
    """A checkpoint's ``model.kind``, read from its plain-data config without building the model
    (memory-mapped: the weights are not read)."""
    p = resolve(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)["config"]["model"]["kind"]
    except Exception as e:  # cut short, overwritten, or not a checkpoint of ours
        raise CheckpointError(f"Checkpoint {p} is unreadable or corrupt ({type(e).__name__}); re-train or "
                              "re-download it") from None


def load(path: str | Path, device: str = "cpu") -> Loaded:
    p = resolve(path)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"Checkpoint {p} is unreadable or corrupt ({type(e).__name__}); re-train or re-download it") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a charlm checkpoint (expected format {FORMAT})")
    _check_entries(p, blob)
    cfg = from_dict(blob["config"], where=f"checkpoint {p}")
    vocab = CharVocab(list(blob["vocab"]))
    model = build_model(cfg, len(vocab))
    try:
        model.load_state_dict(blob["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        first = first_line(e, 300)
        raise CheckpointError(f"Checkpoint {p} does not match its own config: {first}") from None
    model.to(device).eval()
    return Loaded(model=model, vocab=vocab, cfg=cfg, meta=dict(blob.get("meta", {})), path=p)


_ENTRIES = {"config": (dict, "a mapping of config sections"), "vocab": (list, "a list of characters"),
            "model": (dict, "a mapping of weights"), "meta": (dict, "a mapping")}


def _check_entries(p: Path, blob: dict) -> None:
    """A file in the right format may still lack an entry (written by hand, or by a bug): say which."""
    for name, (typ, what) in _ENTRIES.items():
        if name == "meta" and name not in blob:
            continue
        if not isinstance(blob.get(name), typ):
            got = "missing" if name not in blob else f"a {type(blob[name]).__name__}"
            raise CheckpointError(f"Checkpoint {p} has no usable '{name}' entry ({what} expected, {got}); "
                                  "re-train or re-download it")
    if not all(isinstance(c, str) for c in blob["vocab"]):
        raise CheckpointError(f"Checkpoint {p} has a 'vocab' entry that is not a list of characters; re-train it")
