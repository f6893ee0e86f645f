"""What deploy/ ships validates offline: the Kubernetes manifests against the API's schemas, the compose file's
services against the HAProxy config they run."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("document", documents(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_each_manifest_is_valid_for_the_kubernetes_api(document):
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_server_is_probed_on_readiness_and_liveness_and_has_time_to_drain():
    [deployment] = [
        doc for doc in documents() if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "inference-server"
    ]
    pod = deployment["spec"]["template"]["spec"]
    [server] = pod["containers"]
    env = {item["name"]: item.get("value") for item in server["env"]}
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert pod["terminationGracePeriodSeconds"] > float(env["DRAIN_S"]) + float(env["SHUTDOWN_TIMEOUT_S"])
    kinds = {doc["kind"] for doc in documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    assert any(
        doc["kind"] == "Deployment" and doc["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "worker"
        for doc in documents()
    )


def test_the_compose_file_runs_every_replica_that_haproxy_routes_to():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    haproxy = services["haproxy"]
    assert haproxy["volumes"] == ["./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    routed = [
        line.split()[1]
        for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()
        if line.strip().startswith("server ")
    ]
    assert len(routed) >= 2
    for name in routed:
        host, port = haproxy["environment"][name.upper()].split(":")
        assert host in services and services[host]["environment"]["BATCH_WORKER"] == "off" and port == "8000"
    assert {"worker", "redis", "postgres"} <= set(services)
