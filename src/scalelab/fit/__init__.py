"""Scaling-law fitting: law forms as estimators, robust estimation, bootstrap, validation, optima."""
