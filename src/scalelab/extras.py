"""Optional extras: is the package a feature needs installed? Checked before anything runs, so a missing
one is a `SpecError` naming the field and the extra to install, not an ImportError in the middle of a run."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from scalelab.errors import SpecError

#: train.sinks name → (the module it imports, the scalelab extra that installs it)
SINK_EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_sinks(names: Iterable[str], where: str = "train.sinks") -> None:
    """Raise SpecError when a sink in `names` lacks its package; `where` names the field in the message."""
    missing = [name for name in dict.fromkeys(names) if not installed(SINK_EXTRAS[name][0])]
    if missing:
        extras = ",".join(SINK_EXTRAS[name][1] for name in missing)
        raise SpecError(
            f"{where}: {', '.join(repr(m) for m in missing)} "
            f"{'needs a package that is' if len(missing) == 1 else 'need packages that are'} not installed; "
            f"install with `pip install 'scalelab[{extras}]'` (with `-c constraints.txt` in a checkout), "
            f"or remove {'it' if len(missing) == 1 else 'them'} from {where}"
        )
