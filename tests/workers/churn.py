"""One of many concurrent function processes: put random arrays, get others' arrays, verify.

    churn.py REDIS_URL LIST_KEY ITERATIONS SEED

Each iteration puts an array of random size and dtype, publishes (ref, sha256) on a Redis
list shared by all workers, then gets a random published entry and checks its sha256.
Prints {"puts": n, "gets": n, "verified": n}.
"""

import hashlib
import json
import sys

import numpy as np
import redis

import faastube

DTYPES = ["uint8", "int16", "float32", "float64", "complex64", "bool"]


def main(redis_url, key, iterations, seed):
    rng = np.random.default_rng(int(seed))
    board = redis.Redis.from_url(redis_url)
    puts = gets = verified = 0
    for _ in range(int(iterations)):
        dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
        n = int(rng.integers(1, (1 << 20) // dtype.itemsize))
        data = (rng.integers(0, 2, n) if dtype == bool else rng.integers(0, 100, n)).astype(dtype)
        ref = faastube.put(data, scope=key)
        puts += 1
        board.rpush(key, json.dumps({"ref": ref, "sha": hashlib.sha256(data).hexdigest()}))
        entries = board.llen(key)
        entry = json.loads(board.lindex(key, int(rng.integers(entries))))
        view = faastube.get(entry["ref"])
        gets += 1
        if hashlib.sha256(view).hexdigest() != entry["sha"]:
            raise SystemExit(f"checksum mismatch for {entry['ref']['id']}")
        verified += 1
        del view
    print(json.dumps({"puts": puts, "gets": gets, "verified": verified}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
