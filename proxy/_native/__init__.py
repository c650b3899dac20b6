"""Compiled twins built from native/*.pyx (see setup.py)."""
