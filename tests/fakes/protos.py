"""Our .proto files (proxy/control/proto) compiled by grpcio-tools at test time, for the fakes.

The runtime has its own wire codec; the fakes use protoc's code so that they check it against
the real protobuf library. Each set of files is compiled and imported once per process:
protobuf's descriptor pool accepts a file only once.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proxy", "control", "proto")

_compiled: dict[tuple[str, ...], SimpleNamespace] = {}
_lock = threading.Lock()


def compile_protos(names: tuple[str, ...], out_dir: str | None = None) -> SimpleNamespace:
    """Compile ``names`` (e.g. ("identity", "workload")) and import ``<name>_pb2`` and
    ``<name>_pb2_grpc`` (when protoc made one) as attributes of the result."""
    with _lock:
        found = _compiled.get(names)
        if found is not None:
            return found
        import grpc_tools

        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="meshproxy-protos-")
            atexit.register(shutil.rmtree, out_dir, True)
        os.makedirs(out_dir, exist_ok=True)
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
               f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        cmd += [os.path.join(PROTO_DIR, f"{name}.proto") for name in names]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed: {result.stderr}")
        modules: dict[str, object] = {"out_dir": out_dir}
        sys.path.insert(0, out_dir)
        try:
            for name in names:
                modules[f"{name}_pb2"] = importlib.import_module(f"{name}_pb2")
                if os.path.exists(os.path.join(out_dir, f"{name}_pb2_grpc.py")):
                    modules[f"{name}_pb2_grpc"] = importlib.import_module(f"{name}_pb2_grpc")
        finally:
            sys.path.remove(out_dir)
        found = _compiled[names] = SimpleNamespace(**modules)
        return found
