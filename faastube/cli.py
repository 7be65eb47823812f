"""``faastube``: one command, with subcommands (``controller``, ``status``, ``shim``, ``conformance``, ``demo``)."""

from __future__ import annotations

import argparse
import os
import json
import sys

from .config import DEFAULT_SOCKET, Config, format_size, parse_gpus, parse_share, parse_size
from .errors import FaasTubeError


def _words(parse):
    """``parse`` as an argparse type that reports its own words: argparse turns a plain
    ValueError into "invalid parse_size value"."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    convert.__name__ = parse.__name__
    return convert


def _controller(args) -> int:
    from controller import run_controller
    config = Config.from_env(socket=args.socket, redis=args.redis, node=args.node,
                             slab_size=args.slab_size, pool_limit=args.pool_limit,
                             idle_release_s=args.idle_release, tombstone_ttl_s=args.tombstone_ttl,
                             secrets_file=args.secrets_file, gpus=args.gpus,
                             gpu_slab_size=args.gpu_slab_size, gpu_pool_limit=args.gpu_pool_limit,
                             metrics_port=args.metrics_port, chunk_size=args.chunk_size,
                             socket_mode=args.socket_mode)
    run_controller(config)
    return 0


def _status(args) -> int:
    from . import protocol
    from .client import Client
    client = Client(Config.from_env(socket=args.socket), anonymous=True)
    try:
        reply = client.request(protocol.Status())
    finally:
        client.close()
    if args.json:
        print(json.dumps(reply.as_dict(), indent=2))
    else:
        print(render_status(reply.as_dict()))
    return 0


def render_status(status: dict) -> str:
    lines = [f"node {status['node']}  epoch {status['epoch']}  clients {status.get('clients')}"]
    for pool in status["pools"]:
        lines.append(
            f"pool {pool.get('name', pool['device'])}: {pool.get('slabs', '?')} slabs of {format_size(pool['slab_size'])}, "
            f"reserved {format_size(pool.get('reserved', 0))}, used {format_size(pool.get('used', 0))}, "
            f"limit {format_size(pool['limit'])}")
    topology = status.get("topology")
    if topology:
        lines.append(f"topology ({topology['source']}); moves of {format_size(topology['multipath_min'])} "
                     f"or more take every route:")
        for gpu, switch in sorted(topology["pcie_switch"].items()):
            lines.append(f"  {gpu} behind {switch}")
        for name, rate in sorted(topology["nvlink_GBps"].items()):
            lines.append(f"  NVLink {name}: {rate:.1f} GB/s")
        for name, paths in sorted(topology["routes"].items()):
            if len(paths) == 1 and len(paths[0]["hops"]) == 2 and "host" not in paths[0]["hops"]:
                continue          # a direct GPU pair: nothing to route
            routes = " + ".join(f"{'→'.join(p['hops'])} {p['GBps']:.1f} GB/s" for p in paths)
            lines.append(f"  route {name}: {routes}")
    for name, link in sorted(status.get("links", {}).items()):
        rate = link["bytes"] / link["busy_s"] / 1e9 if link["busy_s"] else 0.0
        moves = max(link["transfers"], 1)
        lines.append(f"link {name}: {format_size(link['bytes'])} in {link['transfers']} transfers, "
                     f"busy {link['busy_s']:.3f} s ({rate:.1f} GB/s while busy), {link['queued']} queued, "
                     f"mean wait {link['wait_s'] / moves * 1e6:.0f} µs, service "
                     f"{link['service_s'] / moves * 1e6:.0f} µs, chunks of {format_size(link['chunk_bytes'])}, "
                     f"measured {link['bandwidth'] / 1e9:.1f} GB/s"
                     + (f", native pump ({link['pump']['express_pieces']} express moves, lead "
                        f"{link['pump']['lead_s'] * 1e6:.0f} µs)" if link.get("pump") else ""))
    requests = status.get("requests")
    if requests and requests["ops"]:
        answered = []
        for op, e in sorted(requests["ops"].items()):
            count = e["ok"] + e["error"]
            answered.append(f"{op} {count}" + (f" ({e['error']} failed)" if e["error"] else "")
                            + f" mean {e['seconds'] / count * 1e6:.0f} µs")
        copies = requests["get_copies"]
        lines.append("requests: " + ", ".join(answered)
                     + (f"; {copies['count']} gets copied, mean copy "
                        f"{copies['seconds'] / copies['count'] * 1e6:.0f} µs" if copies["count"] else ""))
    header = ("namespace", "slabs", "reserved", "used", "objects", "pending", "sealed",
              "bytes", "leases", "freeing", "waiting", "clients")
    rows = [header]
    for ns, e in sorted(status["namespaces"].items()):
        rows.append((ns, e["slabs"], format_size(e["reserved"]), format_size(e["used"]),
                     e["objects"], e["pending"], e["sealed"], format_size(e["object_bytes"]),
                     e["leases"], e["freeing"], e.get("waiting_gets", 0), e["clients"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    if len(rows) == 1:
        lines.append("(no namespace holds anything)")
    return "\n".join(lines)


def _shim(args) -> int:
    from shim.serve import run_shim
    run_shim(args.port)
    return 0


def _conformance(args) -> int:
    from .conformance import run_conformance
    return run_conformance(args.url, args.stdout, args.stderr, args.timeout)


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(size_mb=args.size_mb, runs=args.runs)


def _bench(args) -> int:
    # The workflows and their driver live in the source tree (bench/workflows), beside the
    # package, not inside it: they need PyTorch, which the package does not.
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "workflows")
    if not os.path.exists(os.path.join(folder, "run.py")):
        raise FaasTubeError(f"faastube bench runs from a source checkout of FaaSTube ({folder} is missing)")
    sys.path.insert(0, folder)
    import run
    return run.main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faastube", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("controller", help="run the per-node controller (pools, socket, directory)")
    p.add_argument("--socket", help=f"Unix socket to serve (FAASTUBE_SOCKET; default {DEFAULT_SOCKET})")
    p.add_argument("--redis", help="Redis URL for metadata (FAASTUBE_REDIS; default redis://127.0.0.1:6379/0)")
    p.add_argument("--node", help="this node's name in the directory (FAASTUBE_NODE; default hostname)")
    p.add_argument("--slab-size", type=_words(parse_size), help="bytes per host slab (FAASTUBE_SLAB_SIZE; default 64MiB)")
    p.add_argument("--pool-limit", type=_words(parse_size),
                   help="most bytes the host pool may hold, e.g. 8GiB (FAASTUBE_POOL_LIMIT; default 1/4 of RAM)")
    p.add_argument("--idle-release", type=float, metavar="SECONDS",
                   help="release a slab after it stayed empty this long (FAASTUBE_IDLE_RELEASE_S; default 30)")
    p.add_argument("--tombstone-ttl", type=int, metavar="SECONDS",
                   help="how long Redis remembers why an object is gone (FAASTUBE_TOMBSTONE_TTL_S; default 3600)")
    p.add_argument("--gpus", type=_words(parse_gpus), help="'auto': a pool on every GPU the controller sees; "
                   "'none': host tier only (FAASTUBE_GPUS; default auto)")
    p.add_argument("--gpu-slab-size", type=_words(parse_size), help="bytes per GPU slab (FAASTUBE_GPU_SLAB_SIZE; default 256MiB)")
    p.add_argument("--gpu-pool-limit", type=_words(parse_share),
                   help="most bytes each GPU pool may hold: a size, or a share of the GPU's memory "
                        "such as 50%% (FAASTUBE_GPU_POOL_LIMIT; default 50%%)")
    p.add_argument("--chunk-size", type=_words(parse_size),
                   help="bytes per chunk on PCIe links; NVLink links use chunks as many times larger "
                        "as they are faster (FAASTUBE_CHUNK_SIZE; default 4MiB)")
    p.add_argument("--secrets-file", help='JSON {"namespace": "secret"} (FAASTUBE_SECRETS_FILE)')
    p.add_argument("--socket-mode", type=lambda v: int(v, 8), help="socket file mode, octal (default 660)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on PORT, all interfaces (FAASTUBE_METRICS_PORT; default off)")
    p.set_defaults(func=_controller)

    p = sub.add_parser("status", help="print pools, slabs, objects and bytes per namespace")
    p.add_argument("--socket", help="the controller's socket (FAASTUBE_SOCKET)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_status)

    p = sub.add_parser("shim", help="the action runtime: OpenWhisk /init + /run on $PORT (default 8080)")
    p.add_argument("--port", type=int, help="port to serve (default $PORT, else 8080)")
    p.set_defaults(func=_shim)

    p = sub.add_parser("conformance", help="check a runtime endpoint against the stock OpenWhisk "
                                           "Python runtime's behaviour")
    p.add_argument("url", help="a fresh (uninitialised) runtime, e.g. http://127.0.0.1:8080")
    p.add_argument("--stdout", help="the runtime's stdout log file (for the sentinel checks)")
    p.add_argument("--stderr", help="the runtime's stderr log file (for the sentinel checks)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.set_defaults(func=_conformance)

    p = sub.add_parser("demo", help="a 3-stage pipeline through the pool and through Redis bytes")
    p.add_argument("--size-mb", type=int, default=48, help="array size per hand-off in MB (default 48)")
    p.add_argument("--runs", type=int, default=5, help="pipeline runs per mode (default 5)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", add_help=False,
                       help="the end-to-end workflow benchmark, every data-passing mode "
                            "(faastube bench --help for its options)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:          # its options are run.py's own: argparse would claim them
        argv = ["bench", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FaasTubeError as exc:
        print(f"faastube {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
