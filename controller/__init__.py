"""The per-node FaaSTube controller: pools, object table, Redis directory, socket server.

Modules, one concern each: ``allocator`` (regions inside a slab), ``slabs`` (memfd
backend), ``pool`` (elastic slabs per device), ``objects`` (lifecycle, leases, sessions),
``directory`` (Redis metadata), ``handlers`` (requests → replies), ``server`` (the Unix
socket), ``app`` (wiring and the daemon's life).
"""

from .app import Controller, run_controller

__all__ = ["Controller", "run_controller"]
