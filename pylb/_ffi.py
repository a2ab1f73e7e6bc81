"""Private access to the cffi module. Nothing outside pylb imports this.

`check` turns a pylb_status into a typed exception carrying the shim's message.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import pathlib
import sys

from pylb.errors import PylbError, error_for
from pylb.flow_id import packed16

def _load_native():
    """pylb/_native.so, or the one in $PYLB_BUILD_DIR (a private build, see
    scripts/build-native.sh)."""
    private = os.environ.get("PYLB_BUILD_DIR")
    if not private:
        from pylb import _native
        return _native
    path = pathlib.Path(private) / "_native.so"
    spec = importlib.util.spec_from_file_location("pylb._native", path)
    if spec is None or not path.exists():
        raise ImportError(f"no {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["pylb._native"] = module
    return module


try:
    _native = _load_native()
    ffi, lib = _native.ffi, _native.lib
    if ffi.string(lib.pylb_header_sha256()) != ffi.string(lib.pylb_module_header_sha256()):
        # Structs would be laid out differently on the two sides of every call.
        raise ImportError("the cffi module and libpylb_native.so were built from different "
                          "versions of native/pylb.h")
except ImportError as exc:  # pragma: no cover - explained to the user instead
    raise PylbError(
        "pylb's native module is not built: run ./scripts/setup.sh "
        f"({exc})"
    ) from exc


def check(status: int, what: str) -> int:
    """Returns status when it is not an error, else raises the matching NativeError."""
    if status < 0:
        message = ffi.string(lib.pylb_last_error()).decode(errors="replace")
        raise error_for(status, f"{what}: {message}" if message else what)
    return status


_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def _address(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # ip_address() of an address object formats and parses it again.
    return address if isinstance(address, _ADDRESS_TYPES) else ipaddress.ip_address(address)


def ip_to_c(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address, out) -> None:
    """Writes an address into a struct pylb_ip (IPv4 as ::ffff:a.b.c.d)."""
    ffi.memmove(out.b, packed16(_address(address)), 16)


KEY_LEN = ffi.sizeof("struct pylb_flow_key")


def key_bytes(parent) -> bytes:
    """The 40 bytes of a struct's `key` field (a struct pylb_flow_key): the
    form FlowKey.to_bytes() gives."""
    return bytes(ffi.buffer(ffi.addressof(parent, "key"), KEY_LEN))
