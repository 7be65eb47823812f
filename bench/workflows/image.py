"""Image classification: pre-processing (CPU) → an ensemble of three classifiers (GPU, in
parallel) → vote (CPU).

Each function below is one action (see traffic.py for how to deploy them)."""

import torch

import common

BATCH = {"gpu": 32, "cpu": 4}


def preprocess(args):
    stage = common.Stage(args)
    frames = common.as_images(common.normalise(common.frames(stage.seed, BATCH[common.size()])))
    side = common.CROP[common.size()]
    images = torch.nn.functional.interpolate(frames, size=(side, side), mode="bilinear", align_corners=False)
    return stage.result(images=stage.put(images, consumers=3))


def classify_a(args):
    return common.classify(args, "classifier-a", "images", "probs")


def classify_b(args):
    return common.classify(args, "classifier-b", "images", "probs")


def classify_c(args):
    return common.classify(args, "classifier-c", "images", "probs")


def vote(args):
    stage = common.Stage(args)
    probs = torch.stack([stage.get(branch["probs"], "cpu") for branch in args["branches"]])
    votes = probs.argmax(dim=2)                                   # (3, N)
    winner = torch.mode(votes, dim=0).values
    return stage.result(images=votes.shape[1], winners=winner[:8].tolist(),
                        checksum=common.checksum(probs))
