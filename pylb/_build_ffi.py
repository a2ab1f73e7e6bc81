"""Builds pylb._native, the cffi module over native/pylb.h.

The cdef is the part of the public header between the cffi markers, so the
header stays the one description of the C interface.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sys

import cffi

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = ROOT / "native" / "pylb.h"


def cdef_source() -> str:
    text = HEADER.read_text()
    match = re.search(r"/\* cffi:begin \*/(.*)/\* cffi:end \*/", text, re.S)
    if not match:
        raise SystemExit(f"{HEADER}: cffi markers not found")
    return match.group(1)


def make_ffi(build_dir: pathlib.Path) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(cdef_source() + "\nstatic const char *pylb_module_header_sha256(void);\n")
    digest = hashlib.sha256(HEADER.read_bytes()).hexdigest()
    ffi.set_source(
        "pylb._native",
        '#include "pylb.h"\n'
        f'static const char *pylb_module_header_sha256(void) {{ return "{digest}"; }}\n',
        include_dirs=[str(ROOT / "native")],
        libraries=["pylb_native"],
        library_dirs=[str(build_dir)],
        runtime_library_dirs=[str(build_dir)],
    )
    return ffi


def main() -> None:
    """Usage: _build_ffi.py BUILD_DIR [MODULE_DIR]. The module goes into pylb/ unless
    MODULE_DIR is given (a private build that PYLB_BUILD_DIR points the loader at)."""
    build_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build").resolve()
    module_dir = pathlib.Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else ROOT / "pylb"
    ffi = make_ffi(build_dir)
    # Built beside and renamed into place: a process that has the module
    # loaded keeps its copy, and none ever sees a half-written file.
    partial = module_dir / f"_native.{os.getpid()}.partial.so"
    ffi.compile(tmpdir=str(build_dir / "cffi"), target=str(partial), verbose=False)
    os.replace(partial, module_dir / "_native.so")


if __name__ == "__main__":
    main()
