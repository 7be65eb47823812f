"""Image classification: pre-processing (CPU) → an ensemble of three classifiers (GPU, in
parallel) → vote (CPU).

Each function below is one action (see traffic.py for how to deploy them)."""

import torch

import common

BATCH = {"gpu": 32, "cpu": 4}


def preprocess(args):
    stage = common.Stage(args)
    frames = common.normalise(common.frames(stage.seed, BATCH[common.size()]))
    side = common.CROP[common.size()]
    images = torch.nn.functional.interpolate(frames, size=(side, side), mode="bilinear", align_corners=False)
    return stage.result(images=stage.put(images, consumers=3))


@torch.no_grad()
def _classify(args, role):
    stage = common.Stage(args)
    images = stage.get(args["images"], common.device())
    return stage.result(probs=stage.put(common.model(role)(images).softmax(dim=1)))


def classify_a(args):
    return _classify(args, "classifier-a")


def classify_b(args):
    return _classify(args, "classifier-b")


def classify_c(args):
    return _classify(args, "classifier-c")


def vote(args):
    stage = common.Stage(args)
    probs = torch.stack([stage.get(branch["probs"], "cpu") for branch in args["branches"]])
    votes = probs.argmax(dim=2)                                   # (3, N)
    winner = torch.mode(votes, dim=0).values
    return stage.result(images=votes.shape[1], winners=winner[:8].tolist(),
                        checksum=common.checksum(probs))
