"""deploy/k8s/ holds valid Kubernetes objects that fit together: yamllint-clean; every core
object valid against Kubernetes' own schemas (kubernetes-validate, strict: an unknown field
fails) at the oldest and newest versions checked; the LeaderWorkerSet against the schema of
its fields in deploy/k8s/schemas/ and its pod templates against Kubernetes' PodTemplateSpec;
selectors that find their pods; and every container's flags and FOVEA_* settings accepted by
Fovea's own argument parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from fovea.common.config import ServerArgs, parse_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
FILES = sorted(K8S.rglob("*.yaml"))
VERSIONS = ("1.29.0", "1.37.0")  # LWS needs 1.26+; kubernetes-validate 1.37 knows 1.25-1.37
LWS_KIND = ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
# What LWS injects into a group's pods (the leader of group 0 in namespace default).
LWS_ENV = {"LWS_LEADER_ADDRESS": "fovea-tp-0.fovea-tp.default", "LWS_GROUP_SIZE": "2"}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[dict[str, Any]]:
    return [d for path in FILES for d in docs(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in all_docs() if d["kind"] == kind}


def lws() -> dict[str, Any]:
    (found,) = [d for d in all_docs() if (d["apiVersion"], d["kind"]) == LWS_KIND]
    return found


def test_the_manifests_are_there() -> None:
    names = sorted(p.relative_to(K8S).as_posix() for p in FILES)
    assert names == ["multinode/fovea-lws.yaml", "replicas/fovea.yaml", "replicas/router.yaml"]
    kinds = sorted(d["kind"] for d in all_docs())
    assert kinds == [
        "Deployment", "Deployment", "LeaderWorkerSet", "PodDisruptionBudget", "Role",
        "RoleBinding", "Service", "Service", "Service", "ServiceAccount",
    ]  # fmt: skip


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_yamllint_is_clean(path: Path) -> None:
    conf = yamllint_config.YamlLintConfig(file=str(K8S / ".yamllint"))
    problems = [f"{p.line}:{p.column} {p.message}" for p in linter.run(path.read_text(), conf)]
    assert problems == []


@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    core = [d for d in all_docs() if (d["apiVersion"], d["kind"]) != LWS_KIND]
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    # The check above can fail: a field Kubernetes does not know ("readinesProbe") is an error.
    deployment = by_kind("Deployment")["fovea"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken = {**container, "readinesProbe": container["readinessProbe"]}
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0] = broken
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_leaderworkerset_validates(version: str) -> None:
    schema = json.loads((K8S / "schemas" / "leaderworkerset-v1.json").read_text())
    doc = lws()
    jsonschema.Draft202012Validator(schema).validate(doc)
    template = doc["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        as_pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"fovea-tp-{role.lower()}"},
            "template": template[role],
        }
        kubernetes_validate.validate(as_pod_template, version, strict=True)
    # The schema of LWS's own fields refuses what LWS would refuse.
    bad = json.loads(json.dumps(doc))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_find_their_pods() -> None:
    deployments, services = by_kind("Deployment"), by_kind("Service")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, d in deployments.items():
        assert selects(d["spec"]["selector"]["matchLabels"], pods[name])
    assert selects(services["fovea"]["spec"]["selector"], pods["fovea"])
    assert not selects(services["fovea"]["spec"]["selector"], pods["fovea-router"])
    assert selects(services["fovea-router"]["spec"]["selector"], pods["fovea-router"])
    pdb = by_kind("PodDisruptionBudget")["fovea"]["spec"]
    assert selects(pdb["selector"]["matchLabels"], pods["fovea"]) and pdb["maxUnavailable"] == 1
    # The router discovers the Fovea pods, not itself, on the port Fovea serves.
    args = deployments["fovea-router"]["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index("--selector") + 1
    end = next(i for i in range(start, len(args)) if args[i].startswith("--"))
    wanted = dict(pair.split("=", 1) for pair in args[start:end])
    assert selects(wanted, pods["fovea"]) and not selects(wanted, pods["fovea-router"])
    assert args[args.index("--service-discovery-port") + 1] == "30000"
    # The multi-node Service reaches the leader pods only (LWS labels each pod with its set).
    lws_pods = {
        role: {**t["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": "fovea-tp"}
        for role, t in lws()["spec"]["leaderWorkerTemplate"].items()
        if role.endswith("Template")
    }
    leader_service = services["fovea-tp"]["spec"]["selector"]
    assert selects(leader_service, lws_pods["leaderTemplate"])
    assert not selects(leader_service, lws_pods["workerTemplate"])


def server_args(container: dict[str, Any], extra_env: dict[str, str]) -> ServerArgs:
    """The container's args and FOVEA_* env through launch_server's parser, with Kubernetes'
    $(VAR) references expanded from `extra_env` (what LWS injects)."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = list(container.get("args", []))
    for key, value in extra_env.items():
        argv = [a.replace(f"$({key})", value) for a in argv]
    assert not any("$(" in a for a in argv), argv
    return parse_args(argv, env={**env, **extra_env})  # type: ignore[no-any-return]


def gpus(container: dict[str, Any]) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_fovea_accepts_the_replicas_settings() -> None:
    pod = by_kind("Deployment")["fovea"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = server_args(container, {})
    assert (args.host, args.port, args.enable_metrics) == ("0.0.0.0", 30000, True)
    assert args.tp_size == gpus(container)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": args.port}]
    # The pod outlives the drain of requests in flight.
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout


def test_fovea_accepts_the_multinode_settings() -> None:
    spec = lws()["spec"]["leaderWorkerTemplate"]
    (leader,) = spec["leaderTemplate"]["spec"]["containers"]
    (worker,) = spec["workerTemplate"]["spec"]["containers"]
    assert (leader["args"], leader["env"]) == (worker["args"], worker["env"])
    nodes = [server_args(c, {**LWS_ENV, "LWS_WORKER_INDEX": str(rank)})
             for rank, c in enumerate([leader, worker])]  # fmt: skip
    assert [(a.nnodes, a.node_rank) for a in nodes] == [(spec["size"], 0), (spec["size"], 1)]
    assert {a.dist_init_addr for a in nodes} == {"fovea-tp-0.fovea-tp.default:20000"}
    # tp-size = GPUs per pod x pods per group; the leader exposes the three ports from
    # --dist-init-addr's (torch.distributed, then the scheduler's two worker sockets).
    assert nodes[0].tp_size == gpus(leader) * spec["size"] == gpus(worker) * spec["size"]
    ports = {p["name"]: p["containerPort"] for p in leader["ports"]}
    assert ports == {"http": nodes[0].port, "dist-init": 20000, "worker-plan": 20001,
                     "worker-result": 20002}  # fmt: skip
    assert leader["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "readinessProbe" not in worker and "livenessProbe" not in worker
