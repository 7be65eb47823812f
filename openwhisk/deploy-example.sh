#!/usr/bin/env bash
# Deploy the example sequence (preprocess → infer → postprocess, examples/sequence/) on an
# OpenWhisk that has the FaaSTube runtime: once as the runtime kind from runtimes.json, once
# as blackbox (--docker) actions. Then invoke both sequences.
# Usage: openwhisk/deploy-example.sh [IMAGE]     (needs `wsk` configured for your OpenWhisk)
set -euo pipefail
image="${1:-faastube/faastube-runtime:latest}"
examples="$(cd "$(dirname "${BASH_SOURCE[0]}")/../examples/sequence" && pwd)"
kind="python:3.12-faastube"

for stage in preprocess infer postprocess; do
  # As the runtime kind (needs runtimes.json merged into the deployment's manifest).
  wsk action update "ft-$stage" "$examples/$stage.py" --kind "$kind" -m 2048 -t 60000 -c 8
  # As a blackbox image (works on any OpenWhisk that may pull the image).
  wsk action update "ft-$stage-docker" "$examples/$stage.py" --docker "$image" -m 2048 -t 60000 -c 8
done

wsk action update ft-pipeline --sequence ft-preprocess,ft-infer,ft-postprocess
wsk action update ft-pipeline-docker --sequence ft-preprocess-docker,ft-infer-docker,ft-postprocess-docker

wsk action invoke ft-pipeline --param seed 1 --result
wsk action invoke ft-pipeline-docker --param seed 1 --result
