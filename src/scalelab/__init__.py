"""scalelab: carry an ML team from small pilot experiments to production-scale training without surprises."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scalelab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
