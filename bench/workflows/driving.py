"""Driving: pre-processing (CPU) → semantic segmentation (GPU) → post-processing (CPU).

Each function below is one action (see traffic.py for how to deploy them)."""

import torch

import common

BATCH = {"gpu": 2, "cpu": 2}


def preprocess(args):
    return common.preprocess_frames(args, BATCH[common.size()])


def segment(args):
    stage = common.Stage(args)
    frames = common.as_images(stage.get(args["frames"], common.device()))
    logits = common.infer("segmenter", frames)["out"]            # (N, 19, H, W)
    return stage.result(logits=stage.put(logits))


def postprocess(args):
    stage = common.Stage(args)
    logits = stage.get(args["logits"], "cpu")
    classes = logits.argmax(dim=1)
    histogram = torch.bincount(classes.flatten(), minlength=logits.shape[1])
    return stage.result(pixels=histogram.tolist(), checksum=common.checksum(classes))
