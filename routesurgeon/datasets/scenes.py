"""A procedural dense-prediction set (the NYUv2 stand-in): segmentation, depth and normals.

Each scene is a tilted background plane with 2-4 objects in front of it at random depths: spheres
(class 1), tilted squares (class 2) and tilted triangles (class 3). A z-buffer decides visibility;
the image is Lambert-shaded with a class-dependent albedo, a background checker texture and noise.
Depth is the camera-space z of the visible surface; normals are unit vectors of that surface,
pointing toward the camera (negative z).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor  # noqa: F401

from routesurgeon.datasets.base import TaskTensors

__all__ = ["SCENE_CLASSES", "DenseScenes", "render_scene"]

SCENE_CLASSES = ("background", "sphere", "square", "triangle")
_ALBEDO = np.array([[0.55, 0.55, 0.5], [0.9, 0.35, 0.3], [0.3, 0.75, 0.35], [0.35, 0.45, 0.95]])
_LIGHT = np.array([-0.4, -0.5, -0.77]) / np.linalg.norm([-0.4, -0.5, -0.77])


def _plane(u: np.ndarray, v: np.ndarray, base: float, a: float, b: float
           ) -> tuple[np.ndarray, np.ndarray]:
    z = base + a * u + b * v
    n = np.array([a, b, -1.0]) / np.sqrt(a * a + b * b + 1)
    return z, np.broadcast_to(n, (*u.shape, 3))


def render_scene(rng: np.random.Generator, size: int = 64
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image ``[3,S,S]`` float32 in [0,1], seg ``[S,S]`` int64, depth ``[1,S,S]``,
    normals ``[3,S,S]``."""
    g = np.linspace(-1, 1, size)
    v, u = np.meshgrid(g, g, indexing="ij")
    depth, normal = _plane(u, v, rng.uniform(4.5, 6.0), *rng.uniform(-0.8, 0.8, 2))
    depth, normal = depth.copy(), normal.copy()
    seg = np.zeros((size, size), np.int64)
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(1, 4))
        cu, cv = rng.uniform(-0.7, 0.7, 2)
        r = rng.uniform(0.18, 0.4)
        zc = rng.uniform(1.0, 4.0)
        du, dv = u - cu, v - cv
        if cls == 1:
            inside = du**2 + dv**2 < r**2
            h = np.sqrt(np.clip(r**2 - du**2 - dv**2, 0, None))
            z = zc - h
            n = np.stack([du, dv, -h], -1) / r
        else:
            if cls == 2:
                inside = (np.abs(du) < r) & (np.abs(dv) < r)
            else:
                inside = (dv > -r) & (dv < r) & (np.abs(du) < (dv + r) / 2)
            z, n = _plane(du, dv, zc, *rng.uniform(-1.0, 1.0, 2))
        win = inside & (z < depth)
        depth[win], normal[win], seg[win] = z[win], n[win], cls
    shade = np.clip(normal @ _LIGHT, 0.05, None)[..., None]
    albedo = _ALBEDO[seg] * rng.uniform(0.85, 1.15, 3)
    checker = ((np.floor((u + 1) * 4) + np.floor((v + 1) * 4)) % 2)[..., None]
    albedo = np.where((seg == 0)[..., None], albedo * (0.75 + 0.25 * checker), albedo)
    img = albedo * (0.25 + 0.75 * shade) * (1.3 - depth[..., None] / 8)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return (img.transpose(2, 0, 1).astype(np.float32), seg, depth[None].astype(np.float32),
            normal.transpose(2, 0, 1).astype(np.float32))


class DenseScenes(TaskTensors):
    """``n`` procedural scenes with targets ``seg`` (4 classes), ``depth`` and ``normals``.

    Train and test sets use different seeds (``train`` picks the seed stream), so no scene is in
    both.
    """

    def __init__(self, n: int = 1000, size: int = 64, seed: int = 0, train: bool = True) -> None:
        rng = np.random.default_rng([seed, 0 if train else 1])
        scenes = [render_scene(rng, size) for _ in range(n)]
        super().__init__(torch.from_numpy(np.stack([s[0] for s in scenes])), {
            "seg": torch.from_numpy(np.stack([s[1] for s in scenes])),
            "depth": torch.from_numpy(np.stack([s[2] for s in scenes])),
            "normals": torch.from_numpy(np.stack([s[3] for s in scenes])),
        }, channels=3)
