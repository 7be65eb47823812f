"""FaaSTube: pass arrays between serverless functions through a node-local memory pool.

Inside a function::

    import faastube
    ref = faastube.put(array)            # a small JSON dict; return it in your result
    array = faastube.get(ref)            # read-only, zero-copy view in the consumer

    out = faastube.empty((1024, 1024), "float32")   # write in place, no copy at all
    out[...] = compute()
    ref = faastube.seal(out)

Errors are in :mod:`faastube.errors`; settings in :mod:`faastube.config`.
"""

from . import errors
from .client import Client
from .config import Config
from .refs import REF_MARKER, is_ref
from .sdk import (client, close_scope, connect, delete, empty, event, flush_puts, get, put,
                  ref_of, release, seal)

__version__ = "0.1.0"

__all__ = ["put", "get", "empty", "seal", "ref_of", "delete", "release", "close_scope",
           "flush_puts", "event", "connect", "client", "is_ref", "REF_MARKER", "Client", "Config", "errors"]
