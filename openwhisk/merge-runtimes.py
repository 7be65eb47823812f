#!/usr/bin/env python3
"""Merge the FaaSTube runtime kind into a stock OpenWhisk runtimes manifest.

    python3 openwhisk/merge-runtimes.py STOCK.json > MERGED.json

STOCK.json is the deployment's manifest (Ansible: ansible/files/runtimes.json; Helm:
helm/openwhisk/runtimes.json). Every stock kind and blackbox is kept as it is; the kinds in
openwhisk/runtimes.json join their language family and its blackbox image joins
"blackboxes". Merging an already merged manifest changes nothing; a stock kind of the same
name but another definition is an error (nothing is written).
"""

import json
import sys
from pathlib import Path

FRAGMENT = Path(__file__).resolve().parent / "runtimes.json"


def merge(stock, fragment):
    merged = json.loads(json.dumps(stock))  # a deep copy; the stock manifest is not changed
    families = merged.setdefault("runtimes", {})
    for family, kinds in fragment["runtimes"].items():
        present = families.setdefault(family, [])
        for kind in kinds:
            same_name = [k for k in present if k.get("kind") == kind["kind"]]
            if same_name and same_name[0] != kind:
                raise ValueError(f"the manifest already has a kind {kind['kind']!r} that differs from "
                                 f"FaaSTube's: remove it or rename ours in {FRAGMENT}")
            if not same_name:
                present.append(kind)
    blackboxes = merged.setdefault("blackboxes", [])
    for image in fragment["blackboxes"]:
        if image not in blackboxes:
            blackboxes.append(image)
    return merged


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        sys.exit(__doc__.strip())
    try:
        stock = json.loads(Path(argv[1]).read_text())
        if not isinstance(stock, dict) or not isinstance(stock.get("runtimes"), dict):
            raise ValueError("not a runtimes manifest (no \"runtimes\" object)")
        merged = merge(stock, json.loads(FRAGMENT.read_text()))
    except (OSError, ValueError) as error:
        sys.exit(f"merge-runtimes: {argv[1]}: {error}")
    json.dump(merged, sys.stdout, indent=4)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
