"""Scaling-law fitting: law forms as estimators, robust estimation, bootstrap, validation, optima.

Public API::

    from scalelab.fit import ChinchillaLaw, fit_source, recommend
    law = ChinchillaLaw(n_bootstrap=1000, seed=0).fit(table)      # table: RunTable (load_table / make_table)
    law.params_, law.intervals_, law.derived_, law.warnings_
    law.predict(N, D); law.predict_interval(N, D, kind="prediction"); law.optimal(compute=1e21)
    report = fit_source("runs/study", law="chinchilla", bootstrap=1000, holdout="largest:3", seed=0)
    report.save("fit.json"); recommend("fit.json", compute=1e21)

Modules: `table` (loading/validation), `estimate` (Huber objective, variable projection, bootstrap),
`laws` (Chinchilla, power, Kaplan), `isoflop`, `bayes` (MAP + Laplace), `groups`, `validate`,
`optimal`, `api` (fit_source / recommend / FitReport), `commands` (CLI).
"""

import importlib
from typing import Any

#: public name → submodule; imported on first use so that `scalelab --help` (which mounts fit.commands)
#: does not pay for scipy
_LAZY = {
    "FitReport": "api",
    "fit_source": "api",
    "fit_study": "api",
    "fit_table": "api",
    "recommend": "api",
    "ChinchillaLaw": "laws",
    "KaplanLaw": "laws",
    "PowerLaw": "laws",
    "law_from_dict": "laws",
    "make_law": "laws",
    "RunTable": "table",
    "load_table": "table",
    "make_table": "table",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"scalelab.fit.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'scalelab.fit' has no attribute {name!r}")


__all__ = [
    "ChinchillaLaw",
    "FitReport",
    "KaplanLaw",
    "PowerLaw",
    "RunTable",
    "fit_source",
    "fit_study",
    "fit_table",
    "law_from_dict",
    "load_table",
    "make_law",
    "make_table",
    "recommend",
]
