"""deploy/k8s, offline: every manifest is valid against the schemas of named Kubernetes versions
(kubernetes-validate bundles them; strict: unknown fields fail), the kustomize variants build
(when kubectl or kustomize is installed), and the Deployments agree with what `baton serve` does:
the ports, probes, scrape annotations and termination grace are those of the flags the image
runs with, so a changed default or a renamed flag fails here. docs/deployment.md, "Kubernetes".
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from engine.process import EngineProcess
from service import cli
from service.server import _MAX_BACKOFF_SECONDS
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
# The oldest version we claim (native gRPC probes are GA since 1.27) and the newest bundled.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
VARIANTS = {"cpu": "Dockerfile", "gpu": "Dockerfile.cuda"}   # variant -> the image it runs


def load(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def deployment(variant: str) -> dict:
    [doc] = load(K8S / variant / "deployment.yaml")
    return doc


def container(dep: dict) -> dict:
    [c] = dep["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(variant: str, monkeypatch) -> "cli.argparse.Namespace":
    """`baton serve`'s arguments as the container gets them: the image's ENTRYPOINT, the
    container's args, and BATON_* from the container's env (which the image's own ENV also sets)."""
    dockerfile = (REPO / VARIANTS[variant]).read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["baton", "serve"]
    c = container(deployment(variant))
    for name in [n for n in os.environ if n.startswith("BATON_")]:
        monkeypatch.delenv(name)
    for var in c.get("env", []):
        monkeypatch.setenv(var["name"], var["value"])
    return cli.build_parser().parse_args(["serve", *entrypoint[2:], *c.get("args", [])])


def serve_env_names(capsys) -> set[str]:
    """The BATON_* variables `baton serve --help` says it reads."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    return set(re.findall(r"\[env\s+(BATON_[A-Z0-9_]+)\]", capsys.readouterr().out))


# ---- schemas ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version):
    paths = manifests()
    assert {p.relative_to(K8S).as_posix() for p in paths} == {
        "base/service.yaml", "base/pdb.yaml", "cpu/deployment.yaml", "gpu/deployment.yaml"}
    for path in paths:
        for doc in load(path):
            kubernetes_validate.validate(doc, version, strict=True)
    # the validator does fail: a misspelt field, a wrong type
    dep = deployment("cpu")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 50
    wrong_type = copy.deepcopy(dep)
    container(wrong_type)["readinessProbe"]["grpc"]["port"] = "grpc"   # gRPC probes take a number only
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, version, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kustomize_builds_the_variant(variant):
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(K8S / variant)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S / variant)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PodDisruptionBudget", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    assert next(d for d in docs if d["kind"] == "Deployment") == deployment(variant)


# ---- agreement with `baton serve` -------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deployment_agrees_with_the_server_flags(variant, monkeypatch, capsys):
    dep = deployment(variant)
    pod = dep["spec"]["template"]
    c = container(dep)
    assert {"BATON_PORT", "BATON_GRACE_SECONDS", "BATON_LOG_PROMPTS"} <= serve_env_names(capsys)
    unknown = {v["name"] for v in c["env"] if v["name"].startswith("BATON_")} - serve_env_names(capsys)
    assert not unknown, f"env names no `baton serve` flag reads: {unknown}"
    args = serve_args(variant, monkeypatch)
    assert args.device == {"cpu": "cpu", "gpu": "cuda"}[variant]
    assert args.host == "0.0.0.0" and args.metrics_host is None    # reachable from the kubelet and Prometheus
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": args.port}, probe    # grpc.health.v1, service "": what the server sets
    # a liveness window that outlasts an engine restart (backoff + a 60 s load), so the kubelet
    # does not kill a pod that is healing itself
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= _MAX_BACKOFF_SECONDS + 60
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                              "prometheus.io/port": str(args.metrics_port),
                                              "prometheus.io/path": "/metrics"}
    # preStop sleep, then SIGTERM: --grace-seconds of draining and the engine's stop must fit
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    engine_stop = inspect.signature(EngineProcess.stop).parameters["timeout"].default
    needed = float(pre_stop[1]) + args.grace_seconds + engine_stop
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert pod["spec"]["terminationGracePeriodSeconds"] <= needed + 15   # and not far longer
    # the image's user, and GPUs where they belong
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert "useradd --system --uid 10001" in (REPO / VARIANTS[variant]).read_text()
    limits = c["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (variant == "gpu")


def test_service_and_budget_select_the_pods(monkeypatch):
    [service] = load(K8S / "base" / "service.yaml")
    [budget] = load(K8S / "base" / "pdb.yaml")
    args = serve_args("cpu", monkeypatch)
    assert service["spec"]["clusterIP"] == "None"      # headless: DNS lists every ready pod
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (args.port, "grpc"), "metrics": (args.metrics_port, "metrics")}
    for variant in VARIANTS:
        dep = deployment(variant)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for selector in (service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"],
                         dep["spec"]["selector"]["matchLabels"]):
            assert selector.items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_variants_differ_only_where_gpus_need_it():
    def comparable(variant: str) -> dict:
        dep = deployment(variant)
        dep["spec"].pop("strategy")
        pod = dep["spec"]["template"]["spec"]
        pod.pop("tolerations", None)
        c = container(dep)
        for key in ("image", "resources"):
            c.pop(key)
        c["startupProbe"].pop("failureThreshold")
        c["env"] = [v for v in c["env"] if v["name"] not in ("BATON_DEVICE", "BATON_MAX_BATCH_SIZE")]
        return dep
    assert comparable("cpu") == comparable("gpu")
