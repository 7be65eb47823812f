"""Results that carry arrays: what an action returns crosses HTTP as JSON, so every array in
it (inside dicts and lists) is put into the pool and replaced by its ref.

Objects an activation creates belong to its scope (the activation id, see
:func:`faastube.sdk.activation`); when an activation fails, the runtime closes that scope,
so nothing it allocated outlives it. A successful activation's objects live on: the refs in
its result hand them to the next function.
"""

from __future__ import annotations

import numpy as np

from .views import cuda_address


def publish_arrays(result, scope: str | None = None):
    """``result`` with each array (numpy, CuPy, CUDA torch tensor) replaced by
    ``faastube.put(array)``'s ref."""
    if isinstance(result, np.ndarray) or cuda_address(result) is not None:
        from .sdk import put
        return put(result, scope=scope)
    if isinstance(result, dict):
        return {key: publish_arrays(value, scope) for key, value in result.items()}
    if isinstance(result, list):
        return [publish_arrays(value, scope) for value in result]
    return result

