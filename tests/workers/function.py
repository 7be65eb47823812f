"""A function process for tests: does one thing with the SDK and reports it as a JSON line.

    function.py put SIZE SEED [CONSUMERS]   put SIZE random bytes; print ref and sha256
    function.py get REF_JSON                get; print sha256 of the bytes
    function.py hold REF_JSON               get, print sha256, keep the view until stdin closes
    function.py pending SIZE [DEVICE]       empty() (on DEVICE, e.g. cuda) and half-write,
                                            print ref, never seal
    function.py held-put SIZE SEED          put, print, then keep running until stdin closes
    function.py held-puts SIZE COUNT        put SIZE bytes COUNT times, print, keep running
                                            until stdin closes (its spare is pending meanwhile)
"""

import hashlib
import json
import sys

import numpy as np

import faastube


def report(**fields):
    print(json.dumps(fields), flush=True)


def random_bytes(size, seed):
    return np.random.default_rng(int(seed)).integers(0, 256, int(size), dtype=np.uint8)


def main(op, *args):
    if op in ("put", "held-put"):
        data = random_bytes(args[0], args[1])
        consumers = int(args[2]) if len(args) > 2 else None
        ref = faastube.put(data, consumers=consumers)
        report(ref=ref, sha=hashlib.sha256(data).hexdigest())
        if op == "held-put":
            sys.stdin.read()
    elif op == "held-puts":
        refs = [faastube.put(random_bytes(args[0], i)) for i in range(int(args[1]))]
        report(refs=refs)
        sys.stdin.read()
    elif op in ("get", "hold"):
        view = faastube.get(json.loads(args[0]))
        report(sha=hashlib.sha256(view).hexdigest(), shape=list(view.shape), dtype=str(view.dtype))
        if op == "hold":
            sys.stdin.read()
            report(sha_after=hashlib.sha256(view).hexdigest())
    elif op == "pending":
        out = faastube.empty(int(args[0]), "uint8", device=args[1] if len(args) > 1 else None)
        out[: out.size // 2] = 7
        report(ref=faastube.ref_of(out))
        sys.stdin.read()
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(*sys.argv[1:])
