"""The errors FaaSTube raises, in one small hierarchy.

Every error travels over the controller socket as ``{"error": <class name>, "message": ...}``
and is rebuilt on the client side as the same class (see :func:`from_wire`), so a function
catches ``faastube.errors.ObjectNotFoundError`` whether the check failed in its own process
or in the controller.

    FaasTubeError
    ├── InvalidArgumentError (ValueError)
    │   ├── NotAnArrayError (TypeError)
    │   ├── UnsupportedDtypeError
    │   └── InvalidRefError
    ├── InvalidStateError            e.g. sealing twice
    ├── ObjectNotFoundError (KeyError-like: no such object for this caller)
    │   ├── UnknownObjectError       never existed, or forgotten
    │   ├── ObjectDeletedError       deleted, consumed by its consumers, or its scope closed
    │   ├── ObjectExpiredError       its TTL ran out
    │   └── ObjectLostError          its bytes died with a controller (restart, crash)
    ├── NamespaceError (PermissionError)   another namespace's object, or a bad secret
    ├── PoolExhaustedError (MemoryError)
    │   └── QuotaExceededError       the namespace holds its quota of the pool already
    ├── ControllerUnavailableError (ConnectionError)
    │   └── ControllerBusyError      a limit of the controller's (connections, waiting gets)
    ├── RedisUnavailableError (ConnectionError)
    ├── FaasTubeTimeoutError (TimeoutError)
    ├── ProtocolError                a malformed frame or request on the socket
    │   └── FrameTooLarge            a length prefix over the frame limit: the stream is closed
    ├── CudaError                    a CUDA driver call failed
    ├── PumpUnavailable              the controller's native pump cannot be built or loaded
    └── PumpError                    a pump refused a move, or was handed a bad token
"""

from __future__ import annotations


class FaasTubeError(Exception):
    """Base class of every error FaaSTube raises."""


class InvalidArgumentError(FaasTubeError, ValueError):
    """An argument has the wrong value or shape."""


class NotAnArrayError(InvalidArgumentError, TypeError):
    """``put`` was given something that is not an array."""


class UnsupportedDtypeError(InvalidArgumentError):
    """The array's dtype is not a numeric dtype FaaSTube can store."""


class InvalidRefError(InvalidArgumentError):
    """``get`` was given something that is not a FaaSTube ref."""


class InvalidStateError(FaasTubeError):
    """The object is not in a state that allows the operation (e.g. seal twice)."""


class ObjectNotFoundError(FaasTubeError):
    """The object cannot be read by this caller. Subclasses say why."""


class UnknownObjectError(ObjectNotFoundError):
    """No object with this id exists (or it was forgotten long ago)."""


class ObjectDeletedError(ObjectNotFoundError):
    """The object was deleted, released by all its consumers, or its scope was closed."""


class ObjectExpiredError(ObjectNotFoundError):
    """The object's TTL expired."""


class ObjectLostError(ObjectNotFoundError):
    """The object's bytes were lost with the controller that held them."""


class NamespaceError(FaasTubeError, PermissionError):
    """The caller's namespace may not do this (other namespace, missing or wrong secret)."""


class PoolExhaustedError(FaasTubeError, MemoryError):
    """The pool cannot hold the requested bytes within its limit."""


class QuotaExceededError(PoolExhaustedError):
    """The caller's namespace already holds its quota of the pool (``--namespace-quota``)."""


class ControllerUnavailableError(FaasTubeError, ConnectionError):
    """No controller answers on the socket."""


class ControllerBusyError(ControllerUnavailableError):
    """The controller is at one of its limits (connections, gets waiting) and refused this
    connection or request; it keeps serving the others."""


class RedisUnavailableError(FaasTubeError, ConnectionError):
    """The controller cannot reach Redis, so it cannot publish or resolve objects."""


class FaasTubeTimeoutError(FaasTubeError, TimeoutError):
    """A wait (e.g. ``get`` of an object that is not sealed yet) ran out of time."""


class ProtocolError(FaasTubeError):
    """A malformed frame or request on the controller socket."""


class FrameTooLarge(ProtocolError):
    """A length prefix over the frame limit: the stream is out of step and must be closed."""


class CudaError(FaasTubeError):
    """A CUDA driver call failed (faastube/cuda.py says which and why)."""


class PumpUnavailable(FaasTubeError):
    """The controller's native pump cannot be built or loaded here (controller/pump.py)."""


class PumpError(FaasTubeError):
    """A pump refused a move (its queue is full, it is closed) or was handed a bad token."""


#: Every error class by the name it travels under on the socket (redis-py's EXCEPTION_CLASSES).
WIRE_NAMES = {
    cls.__name__: cls
    for cls in (
        FaasTubeError, InvalidArgumentError, NotAnArrayError, UnsupportedDtypeError,
        InvalidRefError, InvalidStateError, ObjectNotFoundError, UnknownObjectError,
        ObjectDeletedError, ObjectExpiredError, ObjectLostError, NamespaceError,
        PoolExhaustedError, QuotaExceededError, ControllerUnavailableError, ControllerBusyError,
        RedisUnavailableError,
        FaasTubeTimeoutError, ProtocolError, FrameTooLarge, CudaError, PumpUnavailable, PumpError,
    )
}


def to_wire(exc: FaasTubeError) -> dict:
    """The reply fields that describe ``exc`` on the socket (its nearest documented class)."""
    name = next(cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in WIRE_NAMES)
    return {"error": name, "message": str(exc)}


def from_wire(name: str, message: str) -> FaasTubeError:
    """Rebuild an error received from the controller; unknown names become FaasTubeError."""
    return WIRE_NAMES.get(name, FaasTubeError)(message)
