import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _native_built() -> bool:
    try:
        import proxy._native.relay  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["cython", "python"])
def twin(request):
    """Run a test against the compiled twins and against MESHPROXY_NO_EXTENSIONS=1."""
    if request.param == "cython" and not _native_built():
        pytest.fail("the Cython extensions are not built (pip install -e . builds them); refusing to test the twin twice")
    return request.param == "python"  # True = pure
