"""The study's records: ``runs.jsonl`` (one JSON line per (study, method, seed) run, a later line
superseding an earlier one, appended under a file lock) and the lock files by which worker
processes sharing one output folder claim a run."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["append_record", "claim", "load_records"]

Key = tuple[str, str, int]


def load_records(*paths: Path | str) -> dict[Key, dict[str, Any]]:
    """The last record of every (study, method, seed) over ``paths`` (a later line, or a later
    file, supersedes); a missing path holds none."""
    out: dict[Key, dict[str, Any]] = {}
    for path in map(Path, paths):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["study"], r["method"], int(r["seed"]))] = r
    return out


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(out: Path, key: str) -> Iterator[bool]:
    """A lock file for one run: True if this process holds it (a dead holder's is taken)."""
    lock = out / "locks" / f"{key.replace('/', '_').replace(':', '_')}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists():
        try:
            os.kill(int(lock.read_text() or 0), 0)
            yield False
            return
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
        except PermissionError:
            yield False
            return
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)
