"""Where dataset files are looked for, cached and checked (sha256)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from routesurgeon.errors import RouteSurgeonError

__all__ = ["DatasetError", "FileSet", "cache_dir", "locate", "sha256"]


class DatasetError(RouteSurgeonError):
    """A dataset's files are missing, corrupt, or could not be fetched."""


def cache_dir() -> Path:
    """``$ROUTESURGEON_DATA`` if set, else ``~/.cache/routesurgeon``."""
    env = os.environ.get("ROUTESURGEON_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "routesurgeon"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileSet:
    """A dataset's source files: relative names with their sha256, and how to get them.

    ``system_dirs`` are where a system package installs them; ``fetch(dest)`` puts them under
    ``dest`` (from the package registry or canonical source), or raises ``OSError``.
    ``install_hint`` says what a user should install when nothing works.
    """

    name: str
    files: Mapping[str, str]
    system_dirs: Sequence[Path]
    install_hint: str
    fetch: Callable[[Path], None] | None = None

    def complete_in(self, root: Path) -> bool:
        return all((root / f).is_file() for f in self.files)

    def verify(self, root: Path) -> Path:
        for f, digest in self.files.items():
            got = sha256(root / f)
            if got != digest:
                raise DatasetError(
                    f"{self.name}: {root / f} has sha256 {got}, expected {digest}; the file is "
                    f"corrupt or a different version: delete it and {self.install_hint}")
        return root


def locate(files: FileSet, root: str | Path | None = None, download: bool = True) -> Path:
    """The directory holding ``files``: ``root``, then system dirs, then the cache (fetched)."""
    tried: list[str] = []
    candidates = [Path(root).expanduser()] if root is not None else []
    candidates += [*files.system_dirs, cache_dir() / files.name]
    for c in candidates:
        if files.complete_in(c):
            return files.verify(c)
        tried.append(str(c))
    if root is not None:
        raise DatasetError(f"{files.name}: {root} does not hold {sorted(files.files)}")
    fetch_error = "downloading disabled (download=False)"
    if download and files.fetch is not None:
        dest = cache_dir() / files.name
        try:
            with tempfile.TemporaryDirectory(prefix=f"rs-{files.name}-") as tmp:
                files.fetch(Path(tmp))
                if not files.complete_in(Path(tmp)):
                    raise OSError(f"fetch did not produce {sorted(files.files)}")
                files.verify(Path(tmp))
                dest.mkdir(parents=True, exist_ok=True)
                for f in files.files:
                    (dest / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(Path(tmp) / f, dest / f)
            return dest
        except (OSError, subprocess.SubprocessError) as e:
            fetch_error = f"fetching failed: {e}"
    raise DatasetError(f"{files.name} not found (looked in {tried}; {fetch_error}). "
                       f"To fix: {files.install_hint}")


def run(cmd: Sequence[str], cwd: Path) -> None:
    """Run a fetch command; ``OSError`` (tool missing) or ``CalledProcessError`` on failure."""
    subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, timeout=600)
