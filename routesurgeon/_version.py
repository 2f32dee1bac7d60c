"""The routesurgeon version (one place: the package root, checkpoints and manifests read it)."""

__version__ = "0.1.0"
