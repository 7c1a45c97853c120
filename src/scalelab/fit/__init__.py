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

from scalelab.fit.api import FitReport, fit_source, fit_study, fit_table, recommend
from scalelab.fit.laws import ChinchillaLaw, KaplanLaw, PowerLaw, law_from_dict, make_law
from scalelab.fit.table import RunTable, load_table, make_table

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
