"""The OpenWhisk and Knative deployment kits: every manifest is valid and consistent with the
runtime (routes, example files, kinds). No cluster is run: these are its inputs."""

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
YAML_FILES = sorted((ROOT / "knative").glob("*.yaml")) + [ROOT / "openwhisk" / "invoker-pod-template.yaml"]
CORE_KINDS = {"Namespace", "Deployment", "Service", "DaemonSet", "ConfigMap", "Pod"}
EXAMPLES = ROOT / "examples" / "sequence"


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_yamllint_is_clean():
    result = subprocess.run(["yamllint", "--strict", "-c", str(ROOT / ".yamllint"),
                             *map(str, YAML_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_core_kinds_validate_against_the_kubernetes_schema(path):
    for doc in documents(path):
        if doc["apiVersion"] in ("v1", "apps/v1") and doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, "1.30", strict=True)


def knative_services():
    return [doc for doc in documents(ROOT / "knative" / "services.yaml")]


def test_knative_services_run_the_examples_with_a_gpu_and_the_socket():
    services = knative_services()
    assert [s["metadata"]["name"] for s in services] == ["ft-preprocess", "ft-infer", "ft-postprocess"]
    for service in services:
        assert service["apiVersion"] == "serving.knative.dev/v1" and service["kind"] == "Service"
        spec = service["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        path, _, main = env["FAASTUBE_FUNCTION"].partition(":")
        assert path.startswith("/function/") and (EXAMPLES / Path(path).name).exists() and main == "main"
        assert env["FAASTUBE_SOCKET"] == "/run/faastube/controller.sock"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["faastube-socket"]["hostPath"]["path"] == mounts["faastube-socket"] == "/run/faastube"
        assert spec["containerConcurrency"] >= 1
        # The copy SLO comes from the revision's annotation through the downward API.
        (slo,) = [e for e in container["env"] if e["name"] == "FAASTUBE_SLO_MS"]
        assert slo["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['faastube.dev/slo-ms']"
    annotations = services[1]["spec"]["template"]["metadata"]["annotations"]
    assert float(annotations["faastube.dev/slo-ms"]) > 0


def test_the_shim_serves_the_probe_routes_the_manifests_use():
    from faastube.config import ShimConfig
    from shim.app import create_app
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(ShimConfig(platform="knative", function=os.path.join(folder, "missing.py:main")))
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    assert {"/", "/health/readiness", "/health/liveness"} <= routes


def test_the_sequence_chains_the_services():
    (sequence,) = documents(ROOT / "knative" / "sequence.yaml")
    assert sequence["apiVersion"] == "flows.knative.dev/v1" and sequence["kind"] == "Sequence"
    steps = [step["ref"]["name"] for step in sequence["spec"]["steps"]]
    assert steps == [s["metadata"]["name"] for s in knative_services()]


def test_config_features_enables_hostpath_volumes_and_fieldref_env():
    (config,) = documents(ROOT / "knative" / "config-features.yaml")
    assert config["metadata"] == {"name": "config-features", "namespace": "knative-serving"}
    assert config["data"]["kubernetes.podspec-volumes-hostpath"] == "enabled"
    # The services' env uses the downward API (POD_NAMESPACE, FAASTUBE_SLO_MS).
    assert config["data"]["kubernetes.podspec-fieldref"] == "enabled"


def test_the_controller_daemonset_serves_the_socket_the_functions_mount():
    (daemonset,) = documents(ROOT / "knative" / "controller-daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--socket", "/run/faastube/controller.sock"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/run/faastube"
    from faastube.cli import build_parser
    build_parser().parse_args(["controller", *container["args"]])      # flags exist


def test_openwhisk_runtime_manifest_and_deploy_script_agree():
    manifest = json.loads((ROOT / "openwhisk" / "runtimes.json").read_text())
    (runtime,) = manifest["runtimes"]["python"]
    assert set(runtime) >= {"kind", "default", "deprecated", "image", "attached", "requireMain", "stemCells"}
    assert set(runtime["image"]) == {"prefix", "name", "tag"}
    assert manifest["blackboxes"] == [runtime["image"]]
    script = (ROOT / "openwhisk" / "deploy-example.sh").read_text()
    assert f'kind="{runtime["kind"]}"' in script
    for stage in re.search(r"for stage in ([\w ]+); do", script).group(1).split():
        assert (EXAMPLES / f"{stage}.py").exists()
    assert "--sequence ft-preprocess,ft-infer,ft-postprocess" in script and "--docker" in script
    for script_path in ("openwhisk/deploy-example.sh", "knative/kn-commands.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script_path)]).returncode == 0


def test_invoker_settings_give_containers_the_gpu_and_the_socket():
    lines = [l for l in (ROOT / "openwhisk" / "invoker.env").read_text().splitlines()
             if l and not l.startswith("#")]
    settings = dict(line.split("=", 1) for line in lines)
    assert all(key.startswith("CONFIG_whisk_") for key in settings)
    assert settings["CONFIG_whisk_containerFactory_containerArgs_extraArgs_gpus_0"] == "all"
    assert settings["CONFIG_whisk_containerFactory_containerArgs_extraArgs_volume_0"] == "/run/faastube:/run/faastube"
    env = [v for k, v in settings.items() if k.startswith("CONFIG_whisk_containerFactory_containerArgs_extraArgs_env_")]
    assert "__OW_ALLOW_CONCURRENT=true" in env and settings["CONFIG_whisk_containerPool_akkaClient"] == "true"
