"""Video analytics: a clip split into chunks (CPU, fan-out) → face detection (GPU) →
recognition (GPU), per chunk in parallel → aggregate (CPU).

Each function below is one action (see traffic.py for how to deploy them)."""

import torch

import common

FRAMES = {"gpu": 16, "cpu": 4}     # frames per clip
CHUNK = {"gpu": 4, "cpu": 2}       # frames per chunk
FACES = {"gpu": 4, "cpu": 2}       # faces per frame


def split(args):
    stage = common.Stage(args)
    clip = common.normalise(common.frames(stage.seed, FRAMES[common.size()]))
    step = CHUNK[common.size()]
    return stage.result(chunks=[stage.put(clip[i:i + step]) for i in range(0, len(clip), step)])


def detect_faces(args):
    stage = common.Stage(args)
    frames = common.as_images(stage.get(args["chunk"], common.device()))
    features = common.infer("backbone", frames)
    faces, boxes = common.top_crops(frames, features, FACES[common.size()], common.CROP[common.size()])
    return stage.result(faces=stage.put(faces), boxes=boxes)


def recognise(args):
    stage = common.Stage(args)
    faces = stage.get(args["faces"], common.device())
    embeddings = torch.nn.functional.normalize(common.infer("embedder", faces), dim=1)
    return stage.result(embeddings=stage.put(embeddings))


def aggregate(args):
    stage = common.Stage(args)
    embeddings = torch.cat([stage.get(branch["embeddings"], "cpu") for branch in args["branches"]])
    identities = embeddings.argmax(dim=1)
    return stage.result(faces=len(embeddings), identities=identities[:8].tolist(),
                        checksum=common.checksum(embeddings))
