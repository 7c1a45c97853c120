"""scalelab.transfer — do tuned hyperparameters transfer across width and depth, and at what batch size?

* `sweep`: LR-transfer sweeps are grid studies (`lr_sweep_study`, `lr_grid`); `run_sweep_in_process` trains
  one in this process.
* `optimum`: per-shape LR optimum (quadratic in ln LR, bootstrap over seeds) and its slope across sizes.
* `analyze`: sweep rows from a study registry → optima, slopes, verdicts (`analyze_study`); `plot`: figure.
* `check`: train the target at the transferred LR and a bracket around it; pass/fail (`run_check`).
* `noise`: gradient noise scale — two-batch estimator, `GradientNoiseCallback`, `measure_noise_scale`.
* `batch`: critical batch size, LR rules for a batch change (`scale_lr`), `recommend_batch`.
* `coord`: coordinate-check summary; `commands`: the `scalelab transfer` CLI.

Modules are imported on use: `from scalelab.transfer.analyze import analyze_study`.
"""
