"""Pick the compiled twins from native/ or their pure-Python modules.

``MESHPROXY_NO_EXTENSIONS=1`` selects the pure modules everywhere (read once,
at import, so a process never mixes the two); so does a missing extension.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("MESHPROXY_NO_EXTENSIONS", "").lower() in ("1", "true", "yes")


def load(native_name: str, pure_module: str) -> tuple[ModuleType, str]:
    """(module, "cython" | "python") for one twin pair."""
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"proxy._native.{native_name}"), "cython"
        except ImportError:
            pass
    return importlib.import_module(pure_module), "python"
