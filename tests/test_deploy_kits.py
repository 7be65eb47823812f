"""The OpenWhisk and Knative deployment kits: every manifest is valid and consistent with the
runtime (routes, example files, kinds). No cluster is run: these are its inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import faastube

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "knative").glob("*.yaml")) + [ROOT / "openwhisk" / "helm" / "action-pod-template.yaml"]
YAML_FILES = MANIFESTS + [ROOT / "openwhisk" / "helm" / "values-faastube.yaml",
                          *sorted((ROOT / "openwhisk" / "ansible").glob("*.yml"))]
DATA = Path(__file__).resolve().parent / "data"
CORE_KINDS = {"Namespace", "Deployment", "Service", "DaemonSet", "ConfigMap", "Pod"}
EXAMPLES = ROOT / "examples" / "sequence"


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_yamllint_is_clean():
    result = subprocess.run(["yamllint", "--strict", "-c", str(ROOT / ".yamllint"),
                             *map(str, YAML_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
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
    # The services' GPU node selector and toleration.
    assert config["data"]["kubernetes.podspec-nodeselector"] == "enabled"
    assert config["data"]["kubernetes.podspec-tolerations"] == "enabled"


def test_the_controller_daemonset_serves_the_socket_the_functions_mount():
    (daemonset,) = documents(ROOT / "knative" / "controller-daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--socket", "/run/faastube/controller.sock"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/run/faastube"
    from faastube.cli import build_parser
    args = build_parser().parse_args(["controller", *container["args"]])      # flags exist
    # Probes on the controller's HTTP port (Note [Health endpoints]).
    (port,) = container["ports"]
    assert port["containerPort"] == args.metrics_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Tainted GPU nodes, evicted last.
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"


def test_the_socket_folder_the_daemonset_makes_is_the_controllers_and_open_to_the_function_group():
    """kubelet makes a missing hostPath folder root-owned 0755: the init container gives it to
    the controller's user and the functions' group, and the functions run in that group."""
    (daemonset,) = documents(ROOT / "knative" / "controller-daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    user, group = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"USER {user}:{group}" in dockerfile                       # the image's own user
    (init,) = pod["initContainers"]
    assert init["command"] == ["install", "-d", "-o", str(user), "-g", str(group), "-m", "2770", "/run/faastube"]
    assert init["securityContext"]["runAsUser"] == 0 and init["image"] == pod["containers"][0]["image"]
    assert init["volumeMounts"] == pod["containers"][0]["volumeMounts"][:1]
    (container,) = pod["containers"]
    assert container["args"][container["args"].index("--socket-mode") + 1] == "660"
    for service in knative_services():
        (function,) = service["spec"]["template"]["spec"]["containers"]
        assert function["securityContext"]["runAsGroup"] == group
    assert ":latest" not in (ROOT / "knative" / "controller-daemonset.yaml").read_text()


def _strict(schema):
    """A CRD's structural schema as JSON Schema that refuses fields it does not list, as
    `kubectl apply --validate=strict` does (except where the CRD keeps unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if (schema.get("type") == "object" and "properties" in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out.setdefault("additionalProperties", False)
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def knative_service_schema():
    """Knative Serving 1.17.2's Service CRD schema (tests/data, from the release's CRD YAML)."""
    import jsonschema
    (crd,) = documents(ROOT / "tests" / "data" / "knative-serving-1.17.2-service-crd.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_knative_services_validate_against_the_knative_service_crd():
    validator = knative_service_schema()
    for service in knative_services():
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(service)]
        assert not errors, errors
    # The schema check can fail: a misspelt field is refused.
    broken = knative_services()[0]
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e.message for e in validator.iter_errors(broken))


def _kn_service_spec(stage: str, image: str) -> dict:
    """The Service `kn service create` makes from knative/kn-commands.sh's flags (kn 1.17:
    --port → ports[0].containerPort, --limit → resources.limits, --concurrency-limit →
    containerConcurrency, --scale-min → the min-scale annotation, --env → env in order)."""
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": f"ft-{stage}", "namespace": "default"},
            "spec": {"template": {
                "metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "1"}},
                "spec": {"containerConcurrency": 8, "containers": [{
                    "image": image, "ports": [{"containerPort": 8080}],
                    "env": [{"name": "FAASTUBE_FUNCTION", "value": f"/function/{stage}.py:main"},
                            {"name": "FAASTUBE_SOCKET", "value": "/run/faastube/controller.sock"},
                            {"name": "FAASTUBE_REDIS", "value": "redis://redis.faastube:6379/0"},
                            {"name": "FAASTUBE_CE_TYPE", "value": f"dev.faastube.{stage}.done"}],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}}


def test_kn_commands_patch_keeps_every_field_kn_set_and_adds_what_the_yaml_has():
    import jsonpatch
    script = (ROOT / "knative" / "kn-commands.sh").read_text()
    (patch_line,) = re.findall(r"^\s*kubectl patch .*$", script, re.M)
    assert "--type json" in patch_line
    patch = json.loads(re.search(r"^patch='(.*?)'$", script, re.S | re.M).group(1))
    validator = knative_service_schema()
    by_name = {s["metadata"]["name"]: s for s in knative_services()}
    for stage in re.search(r"for stage in ([\w ]+); do", script).group(1).split():
        made = _kn_service_spec(stage, "faastube/faastube-examples:0.1.0")
        patched = jsonpatch.apply_patch(made, patch)
        before, after = made["spec"]["template"]["spec"], patched["spec"]["template"]["spec"]
        (container,), (kept,) = before["containers"], after["containers"]
        for field in ("image", "ports", "env", "resources"):
            assert kept[field] == container[field], field              # nothing kn set is lost
        assert after["containerConcurrency"] == 8
        assert not [e.message for e in validator.iter_errors(patched)]
        # What the patch adds is what services.yaml has.
        wanted = by_name[f"ft-{stage}"]["spec"]["template"]["spec"]
        assert after["volumes"] == wanted["volumes"]
        assert kept["volumeMounts"] == wanted["containers"][0]["volumeMounts"]
        assert kept["securityContext"] == wanted["containers"][0]["securityContext"]
        assert after["nodeSelector"] == wanted["nodeSelector"] and after["tolerations"] == wanted["tolerations"]


def test_openwhisk_runtime_manifest_and_deploy_script_agree():
    manifest = json.loads((ROOT / "openwhisk" / "runtimes.json").read_text())
    (runtime,) = manifest["runtimes"]["python"]
    assert set(runtime) == {"kind", "default", "deprecated", "image", "attached", "requireMain"}
    assert runtime["default"] is False  # the stock python default stays the default
    assert runtime["image"] == {"prefix": "faastube", "name": "faastube-runtime", "tag": faastube.__version__}
    assert manifest["blackboxes"] == [runtime["image"]]
    script = (ROOT / "openwhisk" / "deploy-example.sh").read_text()
    assert f'kind="{runtime["kind"]}"' in script
    assert f'image="${{1:-faastube/faastube-runtime:{faastube.__version__}}}"' in script
    for stage in re.search(r"for stage in ([\w ]+); do", script).group(1).split():
        assert (EXAMPLES / f"{stage}.py").exists()
    assert "--sequence ft-preprocess,ft-infer,ft-postprocess" in script and "--docker" in script
    assert """limits=(-m 1024 -t 60000 -c 8 -a invoker-resources '["gpu"]')""" in script
    for script_path in ("openwhisk/deploy-example.sh", "knative/kn-commands.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script_path)]).returncode == 0


def merge_runtimes(path):
    return subprocess.run([sys.executable, str(ROOT / "openwhisk" / "merge-runtimes.py"), str(path)],
                          capture_output=True, text=True)


def test_merge_runtimes_keeps_every_stock_kind_and_adds_ours_once(tmp_path):
    stock = json.loads((DATA / "openwhisk-2.0.0-runtimes.json").read_text())
    ours = json.loads((ROOT / "openwhisk" / "runtimes.json").read_text())
    result = merge_runtimes(DATA / "openwhisk-2.0.0-runtimes.json")
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)
    for family, kinds in stock["runtimes"].items():
        assert merged["runtimes"][family][: len(kinds)] == kinds
    assert merged["runtimes"]["python"][-1] == ours["runtimes"]["python"][0]
    assert merged["blackboxes"] == stock["blackboxes"] + ours["blackboxes"]
    assert {k: v for k, v in merged.items() if k not in ("runtimes", "blackboxes")} == \
        {k: v for k, v in stock.items() if k not in ("runtimes", "blackboxes")}
    (tmp_path / "merged.json").write_text(result.stdout)
    assert merge_runtimes(tmp_path / "merged.json").stdout == result.stdout  # merging again changes nothing

    clash = json.loads(result.stdout)
    clash["runtimes"]["python"][-1]["image"]["tag"] = "other"
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    refused = merge_runtimes(tmp_path / "clash.json")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "already has a kind 'python:3.12-faastube' that differs" in refused.stderr
    (tmp_path / "list.json").write_text("[]")
    assert "not a runtimes manifest" in merge_runtimes(tmp_path / "list.json").stderr


def stock_ansible_variables(version):
    lines = (DATA / f"openwhisk-{version}-ansible-variables.txt").read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


def openwhisk_config_key(variable):
    """The config path OpenWhisk's transformEnvironment.sh makes of a CONFIG_ variable:
    parts split at '_', camelCase parts kebab-cased, PascalCase parts kept."""
    parts = variable.removeprefix("CONFIG_").split("_")
    return ".".join(p if p[:1].isupper() else re.sub(r"([a-z0-9])([A-Z])", lambda m: m[1] + "-" + m[2].lower(), p)
                    for p in parts)


def test_ansible_settings_are_variables_the_stock_playbooks_read():
    group_vars = yaml.safe_load((ROOT / "openwhisk" / "ansible" / "group_vars.yml").read_text())
    host_vars = yaml.safe_load((ROOT / "openwhisk" / "ansible" / "host_vars-gpu-invoker.yml").read_text())
    assert set(group_vars) | set(host_vars) <= stock_ansible_variables("2.0.0")
    # The client's other name, for OpenWhisk after the Pekko migration, is what master reads.
    assert "container_pool_pekko_client" in stock_ansible_variables("master-1fae641")
    assert "container_pool_akka_client" not in stock_ansible_variables("master-1fae641")
    assert group_vars["limit_action_memory_max"] == "2048m" and group_vars["limit_action_concurrency_max"] == 8
    assert host_vars["container_pool_akka_client"] is True and host_vars["runtimes_enable_concurrency"] is True
    keys = {openwhisk_config_key(k): v for k, v in host_vars["invoker_extraEnv"].items()}
    args = "whisk.container-factory.container-args.extra-args."
    assert keys[args + "gpus.0"] == "all" and keys[args + "volume.0"] == "/run/faastube:/run/faastube"
    assert keys[args + "group-add.0"] == "10002"
    assert sorted(v.split("=")[0] for k, v in keys.items() if k.startswith(args + "env.")) == \
        ["FAASTUBE_REDIS", "FAASTUBE_SOCKET"]
    assert "whisk.spi.LogStoreProvider" in keys
    assert "tags=\"['gpu']\"" in (ROOT / "openwhisk" / "ansible" / "host_vars-gpu-invoker.yml").read_text()


def leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_helm_values_are_values_the_chart_has():
    chart = yaml.safe_load((DATA / "openwhisk-deploy-kube-108f327-values.yaml").read_text())
    ours = yaml.safe_load((ROOT / "openwhisk" / "helm" / "values-faastube.yaml").read_text())
    for path, value in leaves(ours):
        default = chart
        for key in path:
            assert key in default, f"{'.'.join(path)} is not a value of the openwhisk-deploy-kube chart"
            default = default[key]
        assert type(value) is type(default), path
    assert ours["scheduler"]["enabled"] is True and chart["scheduler"]["enabled"] is False


def rendered_chart(release="owdev"):
    """The manifests `helm template` makes of the chart's invoker and scheduler, cut to the
    fields the post-renderer reads and writes (helm/openwhisk/templates/invoker-pod.yaml)."""
    labels = {"heritage": "Helm", "release": release, "chart": "openwhisk-1.0.1", "app": f"{release}-openwhisk"}
    def statefulset(name, env):
        return {"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": name, "labels": dict(labels, name=name)},
                "spec": {"serviceName": name, "replicas": 1, "selector": {"matchLabels": {"name": name}},
                         "template": {"metadata": {"labels": dict(labels, name=name)},
                                      "spec": {"serviceAccountName": name, "restartPolicy": "Always",
                                               "containers": [{"name": name.rsplit("-", 1)[1],
                                                               "image": "openwhisk/invoker:ef725a6",
                                                               "env": env}]}}}}
    invoker_env = [{"name": "PORT", "value": "8080"},
                   {"name": "CONFIG_whisk_containerFactory_containerArgs_extraEnvVars_0",
                    "value": "__OW_ALLOW_CONCURRENT=false"},
                   {"name": "INVOKER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    return [statefulset(f"{release}-invoker", invoker_env), statefulset(f"{release}-scheduler", []),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{release}-controller"},
             "spec": {"ports": [{"port": 8080}]}}]


def renamed_invoker_container(chart):
    chart[0]["spec"]["template"]["spec"]["containers"][0]["name"] = "proxy"
    return chart


def post_render(documents, **env):
    return subprocess.run([str(ROOT / "openwhisk" / "helm" / "faastube-post-render")],
                          input=yaml.safe_dump_all(documents), capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_the_post_renderer_adds_gpu_invokers_and_leaves_the_chart_as_it_was():
    chart = rendered_chart()
    result = post_render(chart, FAASTUBE_GPU_INVOKERS="2")
    assert result.returncode == 0, result.stderr
    out = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert out[: len(chart)] == chart  # the stock invoker keeps running plain actions
    configmap, gpu = out[len(chart):]
    for doc in (configmap, gpu):
        kubernetes_validate.validate(doc, "1.30", strict=True)
    template = yaml.safe_load(configmap["data"]["action-pod-template.yaml"])
    assert template == yaml.safe_load((ROOT / "openwhisk" / "helm" / "action-pod-template.yaml").read_text())
    assert gpu["metadata"]["name"] == "owdev-invoker-gpu" and gpu["spec"]["replicas"] == 2
    assert gpu["spec"]["selector"]["matchLabels"] == {"name": "owdev-invoker-gpu"}
    assert gpu["spec"]["template"]["metadata"]["labels"]["name"] == "owdev-invoker-gpu"
    spec = gpu["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PORT"] == "8080" and "INVOKER_NAME" in env
    extra = sorted(v for k, v in env.items() if k.startswith("CONFIG_whisk_containerFactory_containerArgs_extraEnvVars_"))
    assert extra == ["FAASTUBE_REDIS=redis://redis.faastube:6379/0", "FAASTUBE_SOCKET=/run/faastube/controller.sock",
                     "__OW_ALLOW_CONCURRENT=true"]
    assert env["CONFIG_whisk_invoker_resource_tags"] == "gpu" and env["CONFIG_whisk_containerPool_akkaClient"] == "true"
    (mount,) = container["volumeMounts"]
    assert env["CONFIG_whisk_kubernetes_podTemplate"] == f"file:{mount['mountPath']}/action-pod-template.yaml"
    assert spec["volumes"] == [{"name": mount["name"], "configMap": {"name": configmap["metadata"]["name"]}}]
    # Action pods land where the controller DaemonSet runs.
    daemonset = documents(ROOT / "knative" / "controller-daemonset.yaml")
    (node_selector,) = [d["spec"]["template"]["spec"]["nodeSelector"] for d in daemonset if d["kind"] == "DaemonSet"]
    assert {env["CONFIG_whisk_kubernetes_userPodNodeAffinity_key"]:
            env["CONFIG_whisk_kubernetes_userPodNodeAffinity_value"]} == node_selector


def test_the_action_pod_template_keeps_what_the_invoker_does_not_overwrite():
    # WhiskPodBuilder (OpenWhisk ef725a6) sets the user-action container's resources, env, image
    # and ports itself: a GPU limit or env in the template would be dropped without a word.
    template = yaml.safe_load((ROOT / "openwhisk" / "helm" / "action-pod-template.yaml").read_text())
    (container,) = template["spec"]["containers"]
    assert container["name"] == "user-action" and set(container) == {"name", "volumeMounts"}
    assert template["spec"]["runtimeClassName"] == "nvidia"
    assert 10002 in template["spec"]["securityContext"]["supplementalGroups"]
    (volume,) = template["spec"]["volumes"]
    assert volume["hostPath"]["path"] == container["volumeMounts"][0]["mountPath"] == "/run/faastube"


@pytest.mark.parametrize("chart, env, message", [
    ([d for d in rendered_chart() if not d["metadata"]["name"].endswith("-scheduler")], {},
     "tag-based placement needs scheduler.enabled: true"),
    ([dict(rendered_chart()[0], kind="DaemonSet")] + rendered_chart()[1:], {}, "invoker.containerFactory.impl=docker"),
    (rendered_chart()[1:], {}, "no invoker StatefulSet"),
    ([rendered_chart()[0], rendered_chart("other")[0]] + rendered_chart()[1:], {},
     "more than one invoker StatefulSet"),
    (renamed_invoker_container(rendered_chart()), {}, "no single container named 'invoker' (its containers: 'proxy')"),
    (rendered_chart(), {"FAASTUBE_GPU_INVOKERS": "0"}, "FAASTUBE_GPU_INVOKERS='0'"),
], ids=["no-scheduler", "docker-factory", "no-invoker", "two-invokers", "no-invoker-container", "bad-replicas"])
def test_the_post_renderer_refuses_what_it_cannot_serve(chart, env, message):
    result = post_render(chart, **env)
    assert result.returncode == 1 and result.stdout == ""
    assert message in result.stderr
