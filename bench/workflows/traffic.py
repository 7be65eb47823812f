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
    stage = common.Stage(args)
    raw = common.frames(stage.seed, BATCH[common.size()])
    frames = common.normalise(raw, stage.empty((raw.shape[0], 3, *raw.shape[1:3])))
    return stage.result(frames=stage.put(frames))


@torch.no_grad()
def detect(args):
    stage = common.Stage(args)
    where = common.device()
    frames = stage.get(args["frames"], where)
    features = common.model("backbone")(frames)
    crops, boxes = common.top_crops(frames, features, OBJECTS[common.size()], common.CROP[common.size()])
    return stage.result(crops=stage.put(crops, consumers=2), boxes=boxes)


@torch.no_grad()
def _classify(args, role):
    stage = common.Stage(args)
    crops = stage.get(args["crops"], common.device())
    return stage.result(scores=stage.put(common.model(role)(crops).softmax(dim=1)))


def classify_person(args):
    return _classify(args, "classifier-a")


def classify_car(args):
    return _classify(args, "classifier-b")


def merge(args):
    stage = common.Stage(args)
    person, car = (stage.get(branch["scores"], "cpu") for branch in args["branches"])
    labels = torch.stack([person.argmax(dim=1), car.argmax(dim=1)], dim=1)
    return stage.result(objects=len(labels), labels=labels[:4].tolist(),
                        checksum=common.checksum(torch.cat([person, car], dim=1)))
