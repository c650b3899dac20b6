"""Metrics: every family in families.py, one Registry per process, merged for /metrics."""
