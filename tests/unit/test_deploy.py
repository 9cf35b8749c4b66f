"""deploy/kubernetes checked offline: every manifest against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields fail), the probe and drain contract between the
manifests and the server's flags, and haproxy.cfg through `haproxy -c` (installed by
scripts/bootstrap.sh; its absence fails the test)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from scripts.fleet import Replica, haproxy_binary, render_haproxy_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy/kubernetes"
# Native gRPC probes are GA since 1.27; check the oldest supported here and the newest known.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
READINESS_SERVICE = "apex.v1.GenerationService"


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def _by_kind(name: str) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in _documents(name)}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", ["apex-grpc.yaml", "haproxy.yaml"])
def test_manifests_match_the_kubernetes_schemas(manifest, version):
    documents = _documents(manifest)
    assert documents
    for doc in documents:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_misspelt_probe_field():
    deployment = _by_kind("apex-grpc.yaml")[("Deployment", "apex-grpc")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["serviceName"] = READINESS_SERVICE
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def _flags(args: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--"))


def test_probes_and_drain_follow_the_health_contract():
    deployment = _by_kind("apex-grpc.yaml")[("Deployment", "apex-grpc")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    flags = _flags(container["args"])
    port = int(flags["port"])
    assert container["args"][0] == "serve" and flags["host"] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": port, "metrics": int(flags["metrics-port"])}
    # Liveness asks for "" (the process answers); readiness and startup name the service.
    liveness, readiness, startup = (container[name] for name in
                                    ("livenessProbe", "readinessProbe", "startupProbe"))
    assert liveness["grpc"].get("service", "") == "" and liveness["grpc"]["port"] == port
    assert readiness["grpc"] == {"port": port, "service": READINESS_SERVICE}
    assert startup["grpc"] == {"port": port, "service": READINESS_SERVICE}
    # Model load gets at least 5 minutes before the kubelet restarts the container.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["terminationGracePeriodSeconds"] > float(flags["shutdown-grace"])
    assert float(flags["drain-quiet"]) > readiness["periodSeconds"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mount = container["volumeMounts"][0]
    assert mount["readOnly"] and flags["model"].startswith(mount["mountPath"] + "/")
    assert {v["name"] for v in pod["volumes"]} == {mount["name"]}


def test_headless_service_and_haproxy_point_at_the_replicas():
    service = _by_kind("apex-grpc.yaml")[("Service", "apex-grpc-headless")]
    deployment = _by_kind("apex-grpc.yaml")[("Deployment", "apex-grpc")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file()
    assert [f for gen in kustomization["configMapGenerator"] for f in gen["files"]] == [
        "haproxy.cfg"]
    config = (DEPLOY / "haproxy.cfg").read_text()
    metrics_port = _flags(deployment["spec"]["template"]["spec"]["containers"][0]["args"])[
        "metrics-port"]
    # server-template resolves the headless Service; checks go to the metrics port's /ready.
    assert f"apex-grpc-headless.{namespace}.svc.cluster.local:50051 " in config
    assert f" port {metrics_port} " in config and "uri /ready" in config
    assert "balance leastconn" in config and "retry-on conn-failure\n" in config


def test_haproxy_accepts_the_config_and_its_local_rendering(tmp_path):
    haproxy = haproxy_binary()  # raises (fails the test) when bootstrap did not install it
    result = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    replicas = [Replica(f"r{i}", process=None, port=50100 + i, metrics_port=50200 + i)
                for i in range(3)]
    local = tmp_path / "local.cfg"
    local.write_text(render_haproxy_config(replicas, listen_port=50300))
    result = subprocess.run([haproxy, "-c", "-f", str(local)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    text = local.read_text()
    assert "server r2 127.0.0.1:50102 proto h2 check check-proto h1 port 50202" in text
    assert "bind 127.0.0.1:50300 proto h2" in text and "server-template" not in text
