"""Traffic analysis: frame pre-processing (CPU) → object detection (GPU) → crops → person and
car classifiers in parallel (GPU, fan-out) → merge (CPU).

Each function below is one action: OpenWhisk ``wsk action create detect traffic.py --main
detect`` (zipped with common.py), Knative ``FAASTUBE_FUNCTION=traffic.py:detect``.
"""

import torch

import common

BATCH = {"gpu": 8, "cpu": 2}       # frames per request
OBJECTS = {"gpu": 8, "cpu": 3}     # crops per frame


def preprocess(args):
    return common.preprocess_frames(args, BATCH[common.size()])


def detect(args):
    stage = common.Stage(args)
    where = common.device()
    frames = common.as_images(stage.get(args["frames"], where))
    features = common.infer("backbone", frames)
    crops, boxes = common.top_crops(frames, features, OBJECTS[common.size()], common.CROP[common.size()])
    return stage.result(crops=stage.put(crops, consumers=2), boxes=boxes)


def classify_person(args):
    return common.classify(args, "classifier-a", "crops", "scores")


def classify_car(args):
    return common.classify(args, "classifier-b", "crops", "scores")


def merge(args):
    stage = common.Stage(args)
    person, car = (stage.get(branch["scores"], "cpu") for branch in args["branches"])
    labels = torch.stack([person.argmax(dim=1), car.argmax(dim=1)], dim=1)
    return stage.result(objects=len(labels), labels=labels[:4].tolist(),
                        checksum=common.checksum(torch.cat([person, car], dim=1)))
