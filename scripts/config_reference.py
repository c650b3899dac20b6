"""Print the configuration reference (every variable the proxy reads, with its default) as Markdown.

The README's table is this script's output; tests/unit/test_readme.py checks they agree.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.config import VARIABLES, Addr  # noqa: E402


def show(value: object) -> str:
    if value is None or value == "" or value == () or value == frozenset():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if value >= size and value % size == 0:
                return f"{int(value // size)}{unit}"
        return f"{int(round(value * 1000))}ms"
    if isinstance(value, frozenset):
        return ",".join(str(p) for p in sorted(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, Addr):
        return str(value)
    return str(value)


def table() -> str:
    rows = ["| variable | default |", "|---|---|"]
    for var in VARIABLES:
        rows.append(f"| `{var.env}` | `{show(var.default)}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
