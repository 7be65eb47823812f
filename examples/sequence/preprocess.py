"""Stage 1 of the example sequence: make a batch of frames (here: generated from a seed).

Runs unchanged on OpenWhisk (`wsk action create preprocess preprocess.py ...`) and on
Knative (FAASTUBE_FUNCTION=preprocess.py:main). The array in the result is put into the
FaaSTube pool by the runtime; only its ref travels to the next action."""

import numpy as np
def main(args):
    rng = np.random.default_rng(args["seed"])
    frames = rng.integers(0, 255, (4, 256, 256, 3), dtype=np.uint8)
    return {"frames": frames, "seed": args["seed"]}          # the runtime puts the array
