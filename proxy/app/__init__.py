"""Composition only: each direction's stack is assembled in one place (nothing imports app)."""
