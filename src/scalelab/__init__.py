"""scalelab: carry an ML team from small pilot experiments to production-scale training without surprises."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed metadata on first use: `importlib.metadata` costs ~60 ms
    at import, which every CLI call and every data-worker process would pay otherwise."""
    if name != "__version__":
        raise AttributeError(f"module 'scalelab' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("scalelab")
    except PackageNotFoundError:  # running from a source tree that was never installed
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
