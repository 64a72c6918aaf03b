"""Static checks of the inference tier's deployment: k8s Deployment, Service and HPA, the compose
service, and the env that ties the API to it. Like tests/unit/test_deploy.py, nothing here needs a cluster,
Docker or a GPU; the container commands are parsed by the real `flashdmd` CLI and the probe paths and the
HPA's metric are checked against the real app, so a renamed route, option or metric fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from api.cli import serve_command
from api.main import create_app
from api.observability import GenerateMetrics
from api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DEPLOYMENT = K8S / "inference-deployment.yaml"
HPA = K8S / "inference-hpa.yaml"
COMPOSE = ROOT / "docker-compose.yml"
WARM_UP_BUDGET_S = 600  # a cold torch.compile of every served shape must fit in the startup probe


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def _serve_args(argv: list[str]) -> dict:
    """What `flashdmd serve` makes of a container's command line (parsed by click, not run)."""
    assert argv[:2] == ["flashdmd", "serve"], argv
    return serve_command.make_context("serve", list(argv[2:])).params


def _inference_routes() -> set[str]:
    app = create_app(Settings(role="inference", database_url="sqlite:///:memory:"))
    return set(app.openapi()["paths"])


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return {p.name: _docs(p) for p in K8S.glob("*.yaml")}


@pytest.fixture(scope="module")
def deployment(k8s) -> dict:
    return _one(k8s[DEPLOYMENT.name], "Deployment", "flashdmd-inference")


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_manifests_validate_against_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version()
    docs = _docs(DEPLOYMENT) + _docs(HPA)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises on an unknown or mistyped field


def test_the_deployment_runs_the_inference_role_on_one_gpu_from_the_worker_image(deployment, k8s):
    container = _container(deployment)
    argv = [*container.get("command", []), *container.get("args", [])]
    params = _serve_args(argv)
    assert params["role"] == "inference" and params["host"] == "0.0.0.0"
    assert "command" not in container, "args, not command: the image's tini stays PID 1"
    worker = _container(_one(k8s["worker-statefulset.yaml"], "StatefulSet", "flashdmd-worker-gpu1"))
    assert container["image"] == worker["image"], "the inference tier runs the worker (CUDA) image"
    for side in ("requests", "limits"):
        assert int(container["resources"][side]["nvidia.com/gpu"]) == 1, side
    assert {"configMapRef": {"name": "flashdmd-config"}} in container["envFrom"]
    assert {"secretRef": {"name": "flashdmd-secrets"}} in container["envFrom"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": params["port"]}


def test_probes_hit_real_routes_and_give_the_warm_up_time(deployment):
    container = _container(deployment)
    routes = _inference_routes()
    assert routes == {"/generate", "/healthz", "/readyz", "/metrics"}
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    port_names = {p["name"] for p in container["ports"]}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["path"] in routes, probe
        assert get["port"] in port_names, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= WARM_UP_BUDGET_S
    # A pod replaced during a rollout must be warm before the old one goes.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_service_selects_only_inference_pods_and_the_api_points_at_it(deployment, k8s):
    service = _one(k8s[DEPLOYMENT.name], "Service", "flashdmd-inference")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Neither Service may pick the other tier's pods.
    api = _one(k8s["api-deployment.yaml"], "Deployment", "flashdmd-api")
    api_service = _one(k8s["api-deployment.yaml"], "Service", "flashdmd-api")
    assert not api_service["spec"]["selector"].items() <= labels.items()
    assert not service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    # The URL the API forwards to is this Service's name and port, and Settings accepts it.
    config = _one(k8s["configmap.yaml"], "ConfigMap", "flashdmd-config")["data"]
    url = urlsplit(config["FLASHDMD_INFERENCE_URL"])
    (port,) = service["spec"]["ports"]
    assert url.hostname == service["metadata"]["name"] and (url.port or 80) == port["port"]
    assert port["targetPort"] in {p["name"] for p in _container(deployment)["ports"]}
    settings = Settings(inference_url=config["FLASHDMD_INFERENCE_URL"],
                        generate_warm=config["FLASHDMD_GENERATE_WARM"])
    assert settings.inference_url == config["FLASHDMD_INFERENCE_URL"] and settings.generate_warm == []
    assert {"configMapRef": {"name": "flashdmd-config"}} in _container(api)["envFrom"]
    assert _serve_args(_container(api)["command"])["role"] == "all"  # all + the URL: forwards /generate


def test_the_hpa_scales_the_deployment_on_a_metric_the_pods_export(deployment):
    hpa = _one(_docs(HPA), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    registry = CollectorRegistry()
    GenerateMetrics(registry)
    exported = generate_latest(registry).decode()
    assert re.search(rf"^# TYPE {re.escape(name)} gauge$", exported, re.M), f"/metrics has no gauge {name}"


def test_the_compose_service_parses_and_uses_the_existing_image_and_env():
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    inference, api, worker = services["inference"], services["api"], services["worker"]
    params = _serve_args(inference["command"])
    assert params["role"] == "inference" and params["host"] == "0.0.0.0"
    assert inference["image"] == worker["image"] and inference["build"] == worker["build"]
    assert inference["environment"] is api["environment"], "the shared env anchor, not a copy"
    (device,) = inference["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and int(device["count"]) == 1 and "gpu" in device["capabilities"]
    assert inference["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert "ports" not in inference, "clients go through the api"
    health = " ".join(inference["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert match and int(match.group(1)) == params["port"] and match.group(2) in _inference_routes()
    # The api's default URL names this service and the port it binds.
    raw = api["environment"]["FLASHDMD_INFERENCE_URL"]
    default = re.fullmatch(r"\$\{FLASHDMD_INFERENCE_URL-([^}]*)\}", raw)
    assert default, raw
    url = urlsplit(default.group(1))
    assert (url.hostname, url.port) == ("inference", params["port"])


def test_the_readme_documents_the_tier_and_the_engine_choice():
    readme = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Inference tier", 1)[1].split("\n## ", 1)[0]
    for name in ("Ray Serve", "BentoML", "Triton", "flashdmd_generate_inflight", "FLASHDMD_GENERATE_WARM",
                 "--role inference", "inference-hpa.yaml"):
        assert name in section, name
