"""Every error scalelab raises on purpose derives from `ScalelabError`.

Messages name the file, field, run or shard at fault and say what to do; the CLI prints them as one
paragraph with exit code 2 (tracebacks only with `--debug`).
"""

from __future__ import annotations


class ScalelabError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class LockedError(ScalelabError):
    """Another process holds the lock on a directory this command would write (names its PID)."""


class SpecError(ScalelabError):
    """A study or run spec is invalid (names the file and the dotted field path)."""


class DataError(ScalelabError):
    """A data source, tokenizer or token store cannot be read or is inconsistent."""


class ShardChecksumError(DataError):
    """A token shard's bytes do not match the SHA-256 recorded in the store's index."""


class CheckpointError(ScalelabError):
    """A checkpoint is missing, corrupt, or belongs to a different config."""


class RegistryError(ScalelabError):
    """The SQLite run registry cannot be opened or has an incompatible schema."""


class TrainingError(ScalelabError):
    """A training run failed in a way the trainer detected (not a crash of the library)."""


class DivergenceError(TrainingError):
    """The loss became NaN/inf or exploded; the run ends with status `diverged`."""


class FitError(ScalelabError):
    """A scaling-law fit cannot be done on the given table (bad rows, too few runs, ...)."""


class DistributedError(ScalelabError):
    """The torchrun / process-group environment is inconsistent with the run spec."""
