"""Refs: the small JSON dicts that travel through OpenWhisk results and CloudEvents.

A ref names an object; it never carries bytes and it is not a capability: the bytes are
reachable only through the controller socket, which checks the caller's namespace.

    {"__faastube_ref__": 1, "id": "5f0c…", "shape": [1080, 1920, 3], "dtype": "uint8",
     "nbytes": 6220800, "device": "GPU-5d8e…"}

``device`` ("host" or a GPU's UUID) says where the object was made; ``get`` uses it to
decide whether the caller wants it on its own GPU. A ref without it means "host".
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidRefError, UnsupportedDtypeError
from .protocol import check_dtype, dtype_name

REF_MARKER = "__faastube_ref__"
REF_VERSION = 1


def make_ref(object_id: str, shape, dtype: np.dtype, device: str = "host") -> dict:
    shape = [int(d) for d in shape]
    return {REF_MARKER: REF_VERSION, "id": object_id, "shape": shape,
            "dtype": dtype_name(dtype), "nbytes": math.prod(shape) * dtype.itemsize,
            "device": device}


def is_ref(value) -> bool:
    """True for anything that looks like a FaaSTube ref (a dict with the marker key)."""
    return isinstance(value, dict) and REF_MARKER in value


def parse_ref(ref) -> tuple[str, tuple, np.dtype]:
    """(id, shape, dtype) of a ref, or InvalidRefError saying what is wrong with it."""
    if not is_ref(ref):
        raise InvalidRefError(
            f"expected a FaaSTube ref (a dict with key {REF_MARKER!r}, as returned by "
            f"faastube.put), got {type(ref).__name__}")
    if ref[REF_MARKER] != REF_VERSION:
        raise InvalidRefError(f"ref version {ref[REF_MARKER]!r} is not supported (expected {REF_VERSION})")
    object_id, shape, dtype = ref.get("id"), ref.get("shape"), ref.get("dtype")
    if not isinstance(object_id, str) or not object_id:
        raise InvalidRefError("ref has no 'id' string")
    if not isinstance(shape, (list, tuple)) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidRefError(f"ref 'shape' must be a list of non-negative integers, got {shape!r}")
    try:
        resolved = check_dtype(dtype)
    except UnsupportedDtypeError as exc:
        raise InvalidRefError(f"ref 'dtype' is not usable: {exc}") from None
    return object_id, tuple(shape), resolved
