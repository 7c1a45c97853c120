"""The training engine: loop, schedules, checkpoints, precision, batching, observability, distribution."""
