"""Build the Cython twins in native/ as extensions inside the proxy package.

Each native/<name>.pyx becomes proxy._native.<name>, and each module of
COMPILED_TWINS is compiled from its own Python source (so the twin cannot drift).
The extensions are optional:
when Cython or a C compiler is missing the wheel still installs and the pure
Python twins run (the same thing MESHPROXY_NO_EXTENSIONS=1 selects at runtime).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_MODULES = ["relay", "h1scan", "records"]
# Native modules that call a C library: records.pyx seals TLS records with libcrypto's EVP
# (without the library or its headers that one module is skipped and its twin runs).
NATIVE_LIBRARIES = {"records": ["crypto"]}
# Pure modules compiled as they are (Cython's pure-Python mode): the twin is the same source.
COMPILED_TWINS = {"h1parse": "proxy/core/h1.py", "http1": "proxy/http/h1.py", "hpack": "proxy/core/hpack.py",
                  "h2core": "proxy/http/h2core.py", "exchange": "proxy/http/exchange.py", "pool": "proxy/http/pool.py"}


class OptionalBuildExt(build_ext):
    """Do not fail the install if a compiled twin cannot be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the twins"
            print(f"warning: native extensions not built ({exc}); pure-Python twins will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({exc}); its pure-Python twin will be used")


def native_extensions():
    if os.environ.get("MESHPROXY_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    pyx = [
        Extension(f"proxy._native.{name}", [f"native/{name}.pyx"], extra_compile_args=["-O2"],
                  libraries=NATIVE_LIBRARIES.get(name, []))
        for name in NATIVE_MODULES
    ]
    twins = [
        Extension(f"proxy._native.{name}", [source], extra_compile_args=["-O2"])
        for name, source in COMPILED_TWINS.items()
    ]
    # Hand-written .pyx: no negative indexes, so bounds and wraparound checks can go.
    # Compiled twins are plain Python and keep Python's semantics (x[-1] and all); their annotations
    # document, they do not declare C types. The one exception is opt-in: an augmenting
    # proxy/_native/<name>.pxd may declare how hot classes store their attributes (C ints, flags,
    # typed fields), which makes a wrong-kind assignment a TypeError there where the pure twin
    # would accept it; both twins run the same tests, so such a difference fails them.
    return cythonize(pyx, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}) + cythonize(
        twins, language_level=3, compiler_directives={"annotation_typing": False})


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
