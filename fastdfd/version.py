"""The package's version: read by the package, its run manifests and pyproject.toml (one place)."""

__version__ = "0.1.0"
