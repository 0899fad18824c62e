"""gdmix: GLMix / GDMix personalised ranking models trained by blockwise coordinate descent.

``from gdmix import GLMix`` is the Python API (``gdmix.api``); ``gdmix.__version__`` the
installed version. The API is imported on first use (a module ``__getattr__``), so that
importing any ``gdmix.<module>`` loads only what that module needs: the package itself
sits in the lowest layer (docs/design.md §5.1) and imports nothing at import time.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("gdmix")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["GLMix", "__version__"]


def __getattr__(name: str):
    if name == "GLMix":
        from gdmix.api import GLMix  # the one lazy import: see tests/test_layers.py

        return GLMix
    raise AttributeError(f"module 'gdmix' has no attribute {name!r}")
