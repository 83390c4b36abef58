"""Compose's multihost profile: a head and a worker that agree, as tokenmill's CLI reads them."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.deploy_helpers import REPO
from tests.deploy.manifests import (
    MULTIHOST_FLAGS,
    cli_has,
    drain_s,
    expand_compose,
    flag,
    parse_cli,
    shared_flags,
)

PORT = 8000
PROFILE = "multihost"
HEAD, WORKER = "tokenmill-head", "tokenmill-worker"


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def command(service: str, env: dict[str, str] | None = None) -> list[str]:
    """The service's command after compose's ${VAR:-default} interpolation."""
    return [expand_compose(str(a), env) for a in compose()["services"][service]["command"]]


def host_ports(svc: dict) -> set[str]:
    return {p.split(":")[0] for p in svc.get("ports", [])}


def compose_spec() -> jsonschema.protocols.Validator:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema."""
    path = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.timeout(30)
def test_compose_files_match_the_compose_spec() -> None:
    spec = compose_spec()
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in spec.iter_errors(compose(name))]  # fmt: skip
        assert not errors, f"{name}: " + "\n".join(errors)
    broken = compose()
    broken["services"][WORKER]["healthcheck"] = {"disabled": True}  # `disable`, misspelt
    assert not spec.is_valid(broken)


@pytest.mark.timeout(30)
def test_profile_adds_a_head_and_a_worker_and_leaves_plain_up_alone() -> None:
    services = compose()["services"]
    profiled = {n for n, s in services.items() if PROFILE in s.get("profiles", [])}
    assert profiled == {HEAD, WORKER}
    assert {"tokenmill", "prometheus", "grafana"}.isdisjoint(profiled)
    assert all(not s.get("profiles") for n, s in services.items() if n not in profiled)
    # The same image, built from the same Dockerfile as the single-host service (each service
    # that names it can build it: compose would otherwise try to pull tokenmill:latest).
    single = services["tokenmill"]
    for name in (HEAD, WORKER):
        svc = services[name]
        assert svc["image"] == single["image"] and svc["build"] == single["build"], name
        assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["restart"] == "unless-stopped"
        m = re.fullmatch(r"(\d+)s", str(svc["stop_grace_period"]))
        assert m and int(m.group(1)) > drain_s(), name
    # The head publishes the API next to, not over, the single-host service's port.
    head = services[HEAD]
    published = [host_ports(s) for n, s in services.items() if n != HEAD]
    assert host_ports(head) and all(host_ports(head).isdisjoint(p) for p in published)
    assert all(p.split(":")[1] == str(PORT) for p in head["ports"])
    assert f"127.0.0.1:{PORT}/health" in " ".join(head["healthcheck"]["test"])
    assert "TOKENMILL_API_KEY" in head["environment"]
    # The worker serves no HTTP: no ports, and the image's HTTP healthcheck is turned off.
    worker = services[WORKER]
    assert not worker.get("ports") and worker["healthcheck"] == {"disable": True}
    assert HEAD in worker["depends_on"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("env", [{}, {"TOKENMILL_MODEL": "/models/other", "TOKENMILL_TP": "4"}])
def test_head_and_worker_agree_on_model_ranks_and_rendezvous(env: dict[str, str]) -> None:
    head, worker = command(HEAD, env), command(WORKER, env)
    assert (head[0], worker[0]) == ("serve", "worker")
    assert shared_flags(head) == shared_flags(worker)
    model, tp, nnodes, addr, _port = shared_flags(head)
    assert addr == HEAD, "--master-addr is the head's name on the compose network"
    assert int(tp) % int(nnodes) == 0, f"-tp {tp} does not split over {nnodes} hosts"
    ranks = sorted(int(flag(c, "--node-rank")) for c in (head, worker))
    assert ranks == list(range(int(nnodes)))
    assert model == env.get("TOKENMILL_MODEL", "/models/model")
    for name in (HEAD, WORKER):
        mounts = [v.split(":")[1] for v in compose()["services"][name]["volumes"]]
        assert any(Path(model).is_relative_to(m) for m in mounts), (name, model)
    assert flag(head, "--host") == "0.0.0.0" and flag(head, "--port") == str(PORT)


@pytest.mark.timeout(30)
def test_gpu_override_gives_each_host_its_ranks_gpus() -> None:
    base, gpu = compose()["services"], compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) <= set(base), "an override-only service would have no command"
    _, tp, nnodes, _, _ = shared_flags(command(HEAD))
    for name in (HEAD, WORKER):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["count"] == int(tp) // int(nnodes), name
        assert gpu[name]["image"] == gpu["tokenmill"]["image"]


@pytest.mark.timeout(30)
@pytest.mark.xfail(
    not cli_has("serve", *MULTIHOST_FLAGS),
    reason="`tokenmill serve` has no --nnodes/--node-rank/--master-addr/--master-port yet",
    strict=False,
)
def test_head_command_parses_with_tokenmill_serve() -> None:
    ns = parse_cli(command(HEAD))
    assert (ns.command, ns.node_rank, ns.nnodes, ns.master_addr) == ("serve", 0, 2, HEAD)
    assert ns.master_port == 29500 and ns.port == PORT


@pytest.mark.timeout(30)
@pytest.mark.xfail(
    not cli_has("worker", *MULTIHOST_FLAGS),
    reason="`tokenmill worker` does not exist yet",
    strict=False,
)
def test_worker_command_parses_with_tokenmill_worker() -> None:
    ns = parse_cli(command(WORKER))
    assert (ns.command, ns.node_rank, ns.nnodes, ns.master_addr) == ("worker", 1, 2, HEAD)
    assert ns.tensor_parallel_size == int(flag(command(WORKER), "-tp"))
