#!/usr/bin/env bash
# The Services of knative/services.yaml, created with `kn` instead of YAML. hostPath volumes
# have no `kn` flag, so the socket directory is added with a patch afterwards.
set -euo pipefail
image="${1:-faastube/faastube-examples:latest}"
for stage in preprocess infer postprocess; do
  kn service create "ft-$stage" --image "$image" --port 8080 \
    --limit nvidia.com/gpu=1 --concurrency-limit 8 --scale-min 1 \
    --env FAASTUBE_FUNCTION="/function/$stage.py:main" \
    --env FAASTUBE_SOCKET=/run/faastube/controller.sock \
    --env FAASTUBE_REDIS=redis://redis.faastube:6379/0 \
    --env FAASTUBE_CE_TYPE="dev.faastube.$stage.done"
  kubectl patch ksvc "ft-$stage" --type merge -p '{"spec":{"template":{"spec":{
    "volumes":[{"name":"faastube-socket","hostPath":{"path":"/run/faastube","type":"Directory"}}],
    "containers":[{"image":"'"$image"'","volumeMounts":[{"name":"faastube-socket","mountPath":"/run/faastube"}]}]}}}}'
done
