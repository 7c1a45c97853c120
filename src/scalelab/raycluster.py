"""Connecting to Ray (the `ray` extra): an existing cluster by address, or a local instance.

Shared by the study's Ray executor and the data layer's `--executor ray` passes, so both join the same
cluster the same way (an already initialised Ray is used as it is).
"""

from __future__ import annotations

import os
from typing import Any

from scalelab.errors import ScalelabError


def ray_connect(address: str | None = None, local_cpus: int | None = None, what: str = "this") -> Any:
    """The `ray` module, initialised: at `address` (or $RAY_ADDRESS), else a local Ray with `local_cpus`."""
    try:
        import ray
    except ImportError as err:
        raise ScalelabError(f"{what} needs Ray: pip install 'scalelab[ray]'") from err
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def ray_cpus(ray: Any) -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
