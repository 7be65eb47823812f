#!/usr/bin/env bash
# The Services of knative/services.yaml, created with `kn` instead of YAML. `kn` has no flag
# for hostPath volumes, node selectors, tolerations or the container's group, so they are
# added afterwards with a JSON patch (RFC 6902). Not a merge patch: a JSON merge patch
# (RFC 7386, `--type merge`) replaces a list whole, so a `containers` list in it would drop
# the container's env, ports and GPU limit; a strategic merge (`--type strategic`) is for
# built-in kinds only. Each JSON patch operation adds one field at its path and leaves the
# rest of the container as `kn` made it (tests/test_deploy_kits.py applies it to such a
# spec). Needs knative/config-features.yaml.
set -euo pipefail
image="${1:-faastube/faastube-examples:0.1.0}"
patch='[
  {"op": "add", "path": "/spec/template/spec/volumes",
   "value": [{"name": "faastube-socket", "hostPath": {"path": "/run/faastube", "type": "Directory"}}]},
  {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts",
   "value": [{"name": "faastube-socket", "mountPath": "/run/faastube"}]},
  {"op": "add", "path": "/spec/template/spec/containers/0/securityContext",
   "value": {"runAsGroup": 10002, "allowPrivilegeEscalation": false}},
  {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {"nvidia.com/gpu.present": "true"}},
  {"op": "add", "path": "/spec/template/spec/tolerations",
   "value": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
]'
for stage in preprocess infer postprocess; do
  # --no-wait: the first revision cannot reach the controller (no socket yet); the patched
  # one replaces it.
  kn service create "ft-$stage" --image "$image" --port 8080 --no-wait \
    --limit nvidia.com/gpu=1 --concurrency-limit 8 --scale-min 1 \
    --env FAASTUBE_FUNCTION="/function/$stage.py:main" \
    --env FAASTUBE_SOCKET=/run/faastube/controller.sock \
    --env FAASTUBE_REDIS=redis://redis.faastube:6379/0 \
    --env FAASTUBE_CE_TYPE="dev.faastube.$stage.done"
  kubectl patch ksvc "ft-$stage" --type json -p "$patch"
done
