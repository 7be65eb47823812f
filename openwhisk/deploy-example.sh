#!/usr/bin/env bash
# Deploy the example sequence (preprocess → infer → postprocess, examples/sequence/) on an
# OpenWhisk set up with this kit (docs/runtime.md, "OpenWhisk"): once as the runtime kind
# from runtimes.json, once as blackbox (--docker) actions. Then invoke both sequences.
# Usage: openwhisk/deploy-example.sh [IMAGE]     (needs `wsk` configured for your OpenWhisk)
#
# -m 1024 and -c 8 are above a stock deployment's limits (512 MB, 1): the kit's group_vars.yml
# or values-faastube.yaml raise them. invoker-resources '["gpu"]' sends the actions only to
# invokers tagged gpu, the ones whose containers get the GPU and the controller's socket.
set -euo pipefail
image="${1:-faastube/faastube-runtime:0.1.0}"
examples="$(cd "$(dirname "${BASH_SOURCE[0]}")/../examples/sequence" && pwd)"
kind="python:3.12-faastube"
limits=(-m 1024 -t 60000 -c 8 -a invoker-resources '["gpu"]')

for stage in preprocess infer postprocess; do
  # As the runtime kind (needs runtimes.json merged into the deployment's manifest).
  wsk action update "ft-$stage" "$examples/$stage.py" --kind "$kind" "${limits[@]}"
  # As a blackbox image (works on any OpenWhisk that may pull the image).
  wsk action update "ft-$stage-docker" "$examples/$stage.py" --docker "$image" "${limits[@]}"
done

wsk action update ft-pipeline --sequence ft-preprocess,ft-infer,ft-postprocess
wsk action update ft-pipeline-docker --sequence ft-preprocess-docker,ft-infer-docker,ft-postprocess-docker

wsk action invoke ft-pipeline --param seed 1 --result
wsk action invoke ft-pipeline-docker --param seed 1 --result
