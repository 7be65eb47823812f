"""faastube: GPU-resident data passing for serverless functions. One command, with
subcommands: controller, status, shim, conformance, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import Config, ShimConfig, field_default, format_size
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


def add_setting_flags(parser: argparse.ArgumentParser, config_class, names=None) -> None:
    """One flag per setting of ``config_class`` that has one (faastube/config.py), its help
    naming the variable and the default; ``names``: only those fields."""
    for field in config_class.flags():
        if names is not None and field.name not in names:
            continue
        meta = field.metadata
        shown = field_default(field) if meta["shown"] is None else meta["shown"]
        parser.add_argument(meta["flag"], dest=field.name, type=_words(meta["parse"]), metavar=meta["metavar"],
                            help=f"{meta['help']} ({meta['env']}; default {shown})")


def settings_from(args, config_class, **more):
    """``config_class`` from the environment, with the flags given on the command line."""
    given = {f.name: getattr(args, f.name) for f in config_class.flags() if hasattr(args, f.name)}
    return config_class.from_env(**given, **more)


def _controller(args) -> int:
    from controller import run_controller
    run_controller(settings_from(args, Config))
    return 0


def _status(args) -> int:
    from . import protocol
    from .client import Client
    client = Client(settings_from(args, Config), anonymous=True)
    try:
        reply = client.request(protocol.Status())
    finally:
        client.close()
    status = reply.as_dict()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    # A controller whose Redis is down serves what it holds but cannot publish or resolve:
    # say so in the exit status too, for scripts and probes.
    return 1 if (status.get("directory") or {}).get("state") == "down" else 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) + [f"{minutes}m"] * bool(
        days or hours or minutes) + [f"{seconds}s"]
    return " ".join(parts)


def render_status(status: dict) -> str:
    lines = []
    controller = status.get("controller")
    if controller:
        lines.append(f"controller {controller['version']}, up {_duration(controller['uptime_s'])}")
    lines.append(f"node {status['node']}  epoch {status['epoch']}  clients {status.get('clients')}")
    directory = status.get("directory")
    if directory:
        where = f" at {directory['url']}" if directory.get("url") else ""
        version = f" {directory['redis_version']}" if directory.get("redis_version") else ""
        if directory["state"] == "up":
            lines.append(f"directory: Redis{version} up{where}; {directory['queued']} writes queued, "
                         f"{directory['dropped']} refused")
        else:
            ago = directory.get("last_ok_s_ago")
            lines.append(f"directory: Redis DOWN{where}"
                         + (f" (last reached {ago:.0f} s ago)" if ago is not None else " (never reached)")
                         + f": new puts fail until it is back (gets of objects this node holds "
                           f"still work); {directory['queued']} writes queued")
    for pool in status["pools"]:
        lines.append(
            f"pool {pool.get('name', pool['device'])}: {pool.get('slabs', '?')} slabs of {format_size(pool['slab_size'])}, "
            f"reserved {format_size(pool.get('reserved', 0))}, used {format_size(pool.get('used', 0))}, "
            f"limit {format_size(pool['limit'])}"
            + (f"; writers with slabs of their own {pool['writers']}" if pool.get("writers") else ""))
        if "grown" in pool:             # Note [Reservation ahead of demand]
            ahead, request = pool["grown"]["ahead"], pool["grown"]["request"]
            wanted = pool["ahead_wanted"]
            lines.append(f"  room kept ahead {format_size(sum(wanted.values()))} for {len(wanted)} namespaces; "
                         f"grown ahead {ahead['slabs']} slabs ({format_size(ahead['bytes'])}), on a request's "
                         f"path {request['slabs']} ({format_size(request['bytes'])}); idle minimum "
                         f"{format_size(pool['idle_minimum'])}"
                         + ("" if pool.get("device_free") is None else
                            f"; device free {format_size(pool['device_free'])}, watermark "
                            f"{format_size(pool['watermark'])}, given back {pool['given_back']['slabs']} slabs "
                            f"({format_size(pool['given_back']['bytes'])})"))
        if pool.get("eviction") not in (None, "none"):      # Note [Queue-aware eviction]
            moves, waits, evicted = pool["moves"], pool["waits"], pool["evicted"]
            lines.append(
                f"  eviction {pool['eviction']}: {evicted['objects']} objects ({format_size(evicted['bytes'])}) "
                f"on the host now; " + ", ".join(
                    f"{label} {moves[kind]['objects']} ({format_size(moves[kind]['bytes'])}, "
                    f"{moves[kind]['seconds']:.3f} s)"
                    for kind, label in (("evict", "evicted"), ("restore", "restored on get"),
                                        ("ahead", "restored ahead"), ("spill", "put to the host")))
                + f"; requests that waited {waits['requests']} ({waits['seconds']:.3f} s, {waits['failed']} failed)")
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
    for entry in (status.get("demand") or [])[:20]:
        sizes = ", ".join(f"{device} {format_size(n)}" for device, n in sorted(entry["bytes"].items())) or "nothing"
        lines.append(f"function {entry['function']} (namespace {entry['namespace']}): {entry['activations']} activations, "
                     f"puts {sizes} each, concurrency {entry['concurrency']}, window {entry['window_s']:.1f} s, "
                     f"idle {entry['idle_s']:.1f} s" + (", room kept" if entry["reserving"] else ""))
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
    connections = (requests or {}).get("connections")
    if connections:                   # Note [Bounded connections]
        refused = ", ".join(f"{limit} {count}" for limit, count in sorted(connections["refused"].items()))
        lines.append(f"connections {connections['open']} of {connections['limit']}; refused at a limit: "
                     f"{refused or 'none'}")
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
    if status.get("namespaces_omitted"):
        lines.append(f"(and {status['namespaces_omitted']} more namespaces: the {len(rows) - 1} that "
                     f"reserve the most are listed)")
    return "\n".join(lines)


def _shim(args) -> int:
    from shim.serve import run_shim
    run_shim(settings_from(args, ShimConfig))
    return 0


def _conformance(args) -> int:
    from .conformance import run_conformance
    if bool(args.stdout) != bool(args.stderr):
        raise FaasTubeError("--stdout and --stderr go together: give both log files, or neither")
    for path in filter(None, (args.stdout, args.stderr)):
        if not os.path.isfile(path):
            raise FaasTubeError(f"no log file at {path}: give the files the runtime writes its "
                                f"stdout and stderr to")
    if args.prebuilt and args.prebuilt.rstrip("/") == args.url.rstrip("/"):
        raise FaasTubeError("--prebuilt needs a second fresh runtime: a runtime initialises once, "
                            "and the first URL's is used by the other checks")
    return run_conformance(args.url, args.stdout, args.stderr, args.timeout, prebuilt_url=args.prebuilt)


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(size_mb=args.size_mb, runs=args.runs)


def workflows_folder() -> str:
    """Where ``faastube bench``'s workflows are: bench/workflows in a source checkout, else
    the ``faastube_bench.workflows`` package a wheel installs (the same files, pyproject.toml)."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "workflows")
    if os.path.exists(os.path.join(checkout, "run.py")):
        return checkout
    import importlib.util
    spec = importlib.util.find_spec("faastube_bench.workflows")
    if spec is None or not spec.submodule_search_locations:
        raise FaasTubeError("faastube bench cannot find its workflows (bench/workflows in a source "
                            "checkout, or the faastube_bench package of the wheel): reinstall "
                            "faastube")
    return list(spec.submodule_search_locations)[0]


def _bench(args) -> int:
    # The workflows need PyTorch, which the package does not: run.py says so if it is missing.
    folder = workflows_folder()
    sys.path.insert(0, folder)
    import run
    return run.main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def _positive(kind, most: int | None = None):
    """An argparse type: a whole number from 1 (to ``most``)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
        if value < 1 or (most is not None and value > most):
            raise ValueError(f"write {kind} from 1" + (f" to {most}" if most is not None else ""))
        return value
    parse.__name__ = kind
    return _words(parse)


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 < value < 86400:
        raise ValueError("write seconds above 0 and below 86400")
    return value


def _runtime_url(text):
    """A runtime's base URL: http://host[:port][/prefix]."""
    import urllib.parse
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a runtime's URL: write http://HOST:PORT, e.g. http://127.0.0.1:8080")
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="faastube", description=__doc__)
    parser.add_argument("--version", action="version", version=f"faastube {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("controller", help="run the per-node controller (pools, socket, directory)")
    add_setting_flags(p, Config)
    p.set_defaults(func=_controller)

    p = sub.add_parser("status", help="print the controller's version and uptime, Redis's state, and pools, "
                                      "slabs, objects and bytes per namespace (exit 1 while Redis is down)")
    add_setting_flags(p, Config, names=("socket",))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_status)

    p = sub.add_parser("shim", help="the action runtime: OpenWhisk /init + /run (or the Knative "
                                    "contract) on $PORT")
    add_setting_flags(p, ShimConfig)
    p.set_defaults(func=_shim)

    p = sub.add_parser("conformance", help="check a runtime endpoint against the stock OpenWhisk "
                                           "Python runtime's behaviour")
    p.add_argument("url", type=_runtime_url, help="a fresh (uninitialised) runtime, e.g. http://127.0.0.1:8080")
    p.add_argument("--stdout", help="the runtime's stdout log file (for the sentinel checks)")
    p.add_argument("--stderr", help="the runtime's stderr log file (for the sentinel checks)")
    p.add_argument("--timeout", type=_words(_seconds), default=60.0, help="seconds per request (default 60)")
    p.add_argument("--prebuilt", type=_runtime_url, metavar="URL",
                   help="a second fresh runtime, for the prebuilt ActionLoop zip checks")
    p.set_defaults(func=_conformance)

    p = sub.add_parser("demo", help="a 3-stage pipeline through the pool and through Redis bytes")
    p.add_argument("--size-mb", type=_positive("megabytes", 4096), default=48,
                   help="array size per hand-off in MB, 1 to 4096 (default 48)")
    p.add_argument("--runs", type=_positive("runs", 1000), default=5,
                   help="pipeline runs per mode, 1 to 1000 (default 5)")
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
    except OSError as exc:          # a file or port the command was pointed at: one line, no trace
        print(f"faastube {args.command}: {exc.strerror or exc}"
              + (f": {exc.filename}" if getattr(exc, "filename", None) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
