"""Synthetic studies drawn from a known law (for tests, coverage simulations and benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scalelab.fit.table import RunTable, make_table

#: Hoffmann et al. (2022) approach-3 estimates, a realistic truth for simulations.
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(params: Mapping[str, float], N: np.ndarray, D: np.ndarray) -> np.ndarray:
    p = params
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def grid_design(
    sizes: Sequence[float] = tuple(np.geomspace(1e7, 1e9, 6)),
    tokens_per_param: Sequence[float] = (5, 10, 20, 40, 80),
) -> tuple[np.ndarray, np.ndarray]:
    """Every size trained at several tokens-per-parameter ratios."""
    N, D = np.meshgrid(np.asarray(sizes, float), np.asarray(tokens_per_param, float), indexing="ij")
    return N.ravel(), (N * D).ravel()


def isoflop_design(
    budgets: Sequence[float] = tuple(np.geomspace(1e17, 1e20, 5)),
    sizes_per_budget: int = 9,
    span: float = 8.0,
    center_tokens_per_param: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per compute budget C, sizes spread log-uniformly (factor `span` each side) around the size with
    `center_tokens_per_param` tokens/param, D = C/(6N)."""
    N_all, D_all = [], []
    for C in budgets:
        n_mid = np.sqrt(C / (6 * center_tokens_per_param))
        Ns = n_mid * np.geomspace(1 / span, span, sizes_per_budget)
        N_all.append(Ns)
        D_all.append(C / (6 * Ns))
    return np.concatenate(N_all), np.concatenate(D_all)


def simulate(
    params: Mapping[str, float] = HOFFMANN,
    N: np.ndarray | None = None,
    D: np.ndarray | None = None,
    noise: float = 0.01,
    seed: int = 0,
    seeds_per_config: int = 0,
) -> RunTable:
    """Losses from the Chinchilla law times log-normal noise (sd `noise` in log space).

    With ``seeds_per_config > 0`` every config is repeated with a `seed` column and a shared
    per-config offset plus per-seed noise."""
    if N is None or D is None:
        N, D = grid_design()
    rng = np.random.default_rng(seed)
    base = chinchilla_loss(params, N, D)
    if seeds_per_config:
        reps = seeds_per_config
        N = np.repeat(N, reps)
        D = np.repeat(D, reps)
        base = np.repeat(base, reps)
        seeds = np.tile(np.arange(reps), len(base) // reps)
        loss = base * np.exp(noise * rng.standard_normal(base.size))
        return make_table(N, D, loss, seed=seeds, source="<synthetic>")
    loss = base * np.exp(noise * rng.standard_normal(base.size))
    return make_table(N, D, loss, source="<synthetic>")
