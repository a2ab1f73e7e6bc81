"""The exceptions pylb raises. PylbError is the root and is never raised itself."""
from __future__ import annotations


class PylbError(Exception):
    """Root of every pylb error."""


class ConfigError(PylbError):
    """A configuration file or value is wrong; nothing was started."""


class NativeError(PylbError):
    """A call into the C shim failed; `status` is its pylb_status."""

    status = 0

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgument(NativeError):
    status = -1


class OutOfMemory(NativeError):
    status = -2


class DpdkError(NativeError):
    status = -3


class StateError(NativeError):
    status = -4


class NotFound(NativeError):
    status = -5


class Full(NativeError):
    status = -6


class TooBig(NativeError):
    status = -7


_BY_STATUS = {cls.status: cls for cls in (InvalidArgument, OutOfMemory, DpdkError, StateError,
                                          NotFound, Full, TooBig)}


def error_for(status: int, message: str) -> NativeError:
    cls = _BY_STATUS.get(status, NativeError)
    return cls(message, status)
