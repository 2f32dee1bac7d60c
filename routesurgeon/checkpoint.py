"""Atomic, verified checkpoints of a training run (model, importance, method, optimizers, RNG).

File layout: a magic line, an 8-byte little-endian header length, a JSON header (routesurgeon
version, model fingerprint, tasks, method, step/epoch, payload size and SHA-256), then the payload
written by ``torch.save``. A checkpoint is written to a temporary file in the same directory,
fsync'ed and moved over the target with ``os.replace``, so a process killed mid-write leaves the
previous checkpoint intact. Loading refuses (``CheckpointError``) a truncated or corrupt file, and a
checkpoint of another model, tasks, method or routesurgeon version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routesurgeon._version import __version__
from routesurgeon.errors import CheckpointError

__all__ = [
    "FORMAT",
    "Header",
    "atomic_write",
    "fingerprint",
    "read_header",
    "read_payload",
    "rng_state",
    "set_rng_state",
    "write",
]

MAGIC = b"ROUTESURGEON-CHECKPOINT\n"
FORMAT = 1
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class Header:
    """What a checkpoint is of; checked before any state is restored."""

    version: str
    format: int
    fingerprint: list[list[Any]]  # [name, shape] of every parameter, buffer and importance var
    tasks: list[str]
    method: str
    epoch: int
    step: int
    world_size: int
    payload_bytes: int
    sha256: str


def fingerprint(*modules: nn.Module) -> list[list[Any]]:
    """``[name, shape]`` of every parameter and buffer of ``modules`` (prefixed by position)."""
    out: list[list[Any]] = []
    for i, m in enumerate(modules):
        for name, t in m.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                out.append([f"{i}:{name}", list(t.shape)])
    return out


# -- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The torch (CPU, and every GPU once CUDA is initialised), numpy and Python RNG states, in a
    form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                 and torch.cuda.is_initialized() else []),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []  # absent in older checkpoints
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# -- writing -------------------------------------------------------------------------------------
def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, ``os.replace``.

    Temporary files left by a writer killed earlier are removed first (one writer per path).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(_temp_prefix(target) + "*"):
        stale.unlink(missing_ok=True)
    tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def write(path: str | os.PathLike[str], payload: Mapping[str, Any], *, fingerprint: list[Any],
          tasks: list[str], method: str, epoch: int, step: int, world_size: int = 1) -> Header:
    """Serialise ``payload`` with a verified header and write it atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    body = buf.getvalue()
    header = Header(version=__version__, format=FORMAT, fingerprint=fingerprint, tasks=list(tasks),
                    method=method, epoch=epoch, step=step, world_size=world_size,
                    payload_bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    head = json.dumps(asdict(header)).encode()
    atomic_write(path, MAGIC + _LEN.pack(len(head)) + head + body)
    return header


# -- reading -------------------------------------------------------------------------------------
def _read(path: str | os.PathLike[str]) -> tuple[Header, bytes]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    raw = p.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{str(p)!r} is not a routesurgeon checkpoint (bad magic bytes); "
                              f"write checkpoints with trainer.save_checkpoint")
    start = len(MAGIC) + _LEN.size
    if len(raw) < start:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated ({len(raw)} bytes)")
    (n,) = _LEN.unpack(raw[len(MAGIC):start])
    try:
        fields = json.loads(raw[start:start + n].decode())
        header = Header(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r} has a corrupt header ({e}); the file is "
                              f"damaged: resume from an older checkpoint") from e
    body = raw[start + n:]
    if len(body) != header.payload_bytes:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated: payload has {len(body)} of "
                              f"{header.payload_bytes} bytes; resume from an older checkpoint")
    if hashlib.sha256(body).hexdigest() != header.sha256:
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt: payload SHA-256 does not match "
                              f"its header; resume from an older checkpoint")
    return header, body


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of a checkpoint, after checking the whole file's integrity."""
    return _read(path)[0]


def read_payload(path: str | os.PathLike[str], *, fingerprint: list[Any], tasks: list[str],
                 method: str) -> tuple[Header, dict[str, Any]]:
    """Header and payload of ``path``, refused unless it is of this model, tasks and method."""
    header, body = _read(path)
    name = repr(str(path))
    if header.format != FORMAT:
        raise CheckpointError(f"checkpoint {name} has format {header.format}; this routesurgeon "
                              f"reads format {FORMAT}")
    if header.version != __version__:
        raise CheckpointError(f"checkpoint {name} was written by routesurgeon {header.version}, "
                              f"this is {__version__}; resume it with that version")
    if header.tasks != list(tasks):
        raise CheckpointError(f"checkpoint {name} is of tasks {header.tasks}, this run has "
                              f"{list(tasks)}")
    if header.method != method:
        raise CheckpointError(f"checkpoint {name} was written by method {header.method!r}, this "
                              f"trainer runs {method!r}; build the Trainer with "
                              f"method={header.method!r}")
    if header.fingerprint != fingerprint:
        theirs = {k: tuple(v) for k, v in header.fingerprint}
        ours = {k: tuple(v) for k, v in fingerprint}
        diff = [f"{k}: {theirs.get(k, 'absent')} in the file, {ours.get(k, 'absent')} here"
                for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        raise CheckpointError(f"checkpoint {name} is of another model: {len(diff)} parameters/"
                              f"buffers differ ({'; '.join(diff[:3])}); instrument the model it "
                              f"was written for")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:  # the hash matched: the payload holds something we cannot read
        raise CheckpointError(f"checkpoint {name}: payload unreadable ({e})") from e
    return header, payload
