"""Scaling studies: planning, the SQLite run registry, provenance and executors."""
