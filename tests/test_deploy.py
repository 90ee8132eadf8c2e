"""deploy/ checked with real tools: hadolint, kustomize (kubectl), kubernetes-validate, promtool.

The container image itself is not built here (no container engine on CI); its Dockerfile is
linted, its build context checked against .dockerignore, and its health check script run
against a live server. The Kubernetes manifests are rendered from every overlay and validated
against the bundled Kubernetes JSON schemas offline, strictly (unknown fields fail). The
probes' endpoints are checked against real servers: /healthz answers 503 when the event loop
stalls (an injected stall: the HTTP side lives in its own thread), and a server stopped with
SIGSTOP makes the probe's request time out.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from raflora.server.config import FederationConfig
from raflora.server.metrics import DEPRECATED_RATIO_NAMES
from raflora.server.settings import ServerSettings
from raflora.server.testing import ServerProcess, free_port, scrape, threaded_server

from .helpers import ROOT
from .helpers.deploy import (
    DASHBOARD,
    DEPLOY,
    KUSTOMIZE,
    RULES,
    RULES_TEST,
    all_rules,
    dashboard_queries,
    debian_tool,
    exported_series_names,
    load_dashboard,
    load_rules,
    metric_names,
    run,
    tool,
)

DOCKERFILE = DEPLOY / "docker/Dockerfile"
OPERATIONS = ROOT / "docs/operations.md"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "GRPCRoute", "RayCluster"}
# Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS = ("1.29", "1.37")
# "edge": the cpu overlay with the gateway and ingress-nginx components; "object-store": the cpu
# overlay in object-store mode (storage = s3) with its Secret filled; "ray": the cpu overlay
# aggregating on a KubeRay RayCluster.
OVERLAYS = ("cpu", "gpu", "tls", "edge", "object-store", "ray")
NAMESPACE = "raflora"


# -- rendering ------------------------------------------------------------------------------


def tls_overlay(root: Path) -> Path:
    """What docs/operations.md tells operators to write to turn TLS on: the cpu overlay, the
    tls component and the real Secret from local files (never committed)."""
    overlay = root / "my-overlay"
    overlay.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (overlay / name).write_text(f"-----BEGIN PLACEHOLDER-----\n{name}\n")
    (overlay / "admin-token").write_text("an-admin-token-of-32-characters!\n")
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - {rel / 'overlays/cpu'}\n"
        f"components:\n  - {rel / 'components/tls'}\n"
        "secretGenerator:\n"
        "  - name: raflora-tls\n"
        "    behavior: replace\n"
        "    files: [tls.crt, tls.key, ca.crt, admin-token]\n"
    )
    return overlay


def object_store_overlay(root: Path) -> Path:
    """docs/operations.md's object-store mode: the component and the real Secret from local
    files (never committed)."""
    overlay = root / "object-store"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "AWS_ACCESS_KEY_ID").write_text("an-access-key")
    (overlay / "AWS_SECRET_ACCESS_KEY").write_text("a-secret-key")
    (overlay / "token.key").write_text("ab" * 32 + "\n")
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {rel / 'overlays/object-store'}\n"
        "secretGenerator:\n"
        "  - name: raflora-object-store\n"
        "    behavior: replace\n"
        "    files: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, token.key]\n"
    )
    return overlay


def ray_overlay(root: Path) -> Path:
    """docs/operations.md's Ray mode: the overlay and the real Ray token from a local file."""
    overlay = root / "ray"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "RAY_AUTH_TOKEN").write_text("cd" * 32)
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {rel / 'overlays/ray'}\n"
        "secretGenerator:\n"
        "  - name: raflora-ray-auth\n"
        "    behavior: replace\n"
        "    files: [RAY_AUTH_TOKEN]\n"
    )
    return overlay


def second_instance_overlay(root: Path) -> Path:
    """docs/operations.md's second instance: its own namespace, no second copy of the rules."""
    overlay = root / "raflora-b"
    overlay.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    deletions = "".join(
        "  - patch: |-\n"
        "      $patch: delete\n"
        f"      apiVersion: {api}\n"
        f"      kind: {kind}\n"
        f"      metadata: {{name: {name}}}\n"
        for api, kind, name in (
            ("monitoring.coreos.com/v1", "PrometheusRule", "raflora"),
            ("v1", "ConfigMap", "raflora-dashboard"),
        )
    )
    (overlay / "kustomization.yaml").write_text(
        f"namespace: raflora-b\nresources:\n  - {rel / 'overlays/cpu'}\npatches:\n{deletions}"
    )
    return overlay


def edge_overlay(root: Path) -> Path:
    """The cpu overlay exposed through a Gateway API gateway and ingress-nginx."""
    overlay = root / "edge"
    overlay.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {rel / 'overlays/cpu'}\n"
        f"components:\n  - {rel / 'components/gateway'}\n"
        f"  - {rel / 'components/ingress-nginx'}\n"
    )
    return overlay


def second_namespace_overlay(root: Path) -> Path:
    """docs/operations.md's namespace of the second instance."""
    overlay = root / "raflora-b-namespace"
    overlay.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(KUSTOMIZE, overlay))
    (overlay / "kustomization.yaml").write_text(
        f"namespace: raflora-b\nresources:\n  - {rel / 'namespace'}\n"
    )
    return overlay


@functools.cache
def render(overlay: str, workdir: Path) -> tuple[dict[str, Any], ...]:
    if overlay == "tls":
        path = tls_overlay(workdir)
    elif overlay == "second":
        path = second_instance_overlay(workdir)
    elif overlay == "edge":
        path = edge_overlay(workdir)
    elif overlay == "object-store":
        path = object_store_overlay(workdir)
    elif overlay == "ray":
        path = ray_overlay(workdir)
    elif overlay == "second-namespace":
        path = second_namespace_overlay(workdir)
    elif overlay == "namespace":
        path = KUSTOMIZE / "namespace"
    else:
        path = KUSTOMIZE / "overlays" / overlay
    out = run([tool("kubectl"), "kustomize", str(path)])
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, workdir: Path) -> tuple[dict[str, Any], ...]:
    return render(request.param, workdir)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def settings_of(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "raflora-settings-")["data"]
    return data


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_image_is_non_root_with_health_check_and_cuda_variant() -> None:
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users  # numeric, not 0
    health = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert health and "healthcheck.py" in health[0]
    assert any(w == "EXPOSE" and rest.split() == ["50051", "9464"] for w, rest in final)
    assert ("ENTRYPOINT", '["raflora-server"]') in final
    args = {rest.split("=")[0] for word, rest in instructions if word == "ARG"}
    assert "TORCH_VARIANT" in args  # cpu by default; cu126, cu128 … for the CUDA image
    env = " ".join(rest for word, rest in final if word == "ENV")
    for needed in ("RAFLORA_HOST=0.0.0.0", "RAFLORA_METRICS_HOST=0.0.0.0", "RAFLORA_DATA_DIR="):
        assert needed in env


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = to_regex(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    sent = {p for p in tracked if not dockerignore_excludes(patterns, p)}
    # Every source the Dockerfile COPYs is in the context ...
    copied = [
        rest.split()[:-1]
        for word, rest in dockerfile_instructions()
        if word == "COPY" and "--from" not in rest
    ]
    for sources in copied:
        for source in sources:
            assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in sent), (
                f"COPY {source}: excluded by .dockerignore"
            )
    # ... and nothing else: no tests, venv, git metadata, data or manifests.
    allowed = ("pyproject.toml", "README.md", "proto/", "server/", "client_sdk/", "demo/")
    extra = sorted(p for p in sent if not p.startswith(allowed))
    assert extra == ["deploy/docker/constraints.txt", "deploy/docker/healthcheck.py"], extra
    for path in (".venv/bin/python", ".git/HEAD", "server/raflora/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, path), path


def test_container_health_check_script(tmp_path: Path) -> None:
    script = DEPLOY / "docker/healthcheck.py"

    def check(target: str, **env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAFLORA_")}
        return subprocess.run(
            [sys.executable, str(script)],
            env={**clean, "RAFLORA_HEALTHCHECK_TARGET": target, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    with threaded_server(tmp_path) as server:
        ok = check(server.target)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok
        tcp = check(server.target, RAFLORA_TLS_CERT_FILE="/etc/raflora/tls/tls.crt")
        assert tcp.returncode == 0 and "accepts connections" in tcp.stdout, tcp
    down = check(f"127.0.0.1:{free_port()}", RAFLORA_HEALTHCHECK_TIMEOUT="1")
    assert down.returncode == 1 and "unhealthy" in down.stderr, down


# -- Kubernetes manifests -------------------------------------------------------------------


def validate(docs: list[dict[str, Any]], path: Path) -> str:
    path.write_text(yaml.safe_dump_all(docs))
    cmd = [tool("kubernetes-validate"), "--strict", "--quiet"]
    for version in K8S_VERSIONS:
        cmd += ["-k", version]
    done = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def test_manifests_validate_strictly_offline(
    rendered: tuple[dict[str, Any], ...], tmp_path: Path
) -> None:
    core = [d for d in rendered if d["kind"] not in CRD_KINDS]
    kinds = sorted(d["kind"] for d in core)
    assert {
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= set(kinds)
    assert validate(core, tmp_path / "core.yaml") == "rc=0\n"  # no error, no warning


def test_namespace_is_applied_apart_from_the_app(workdir: Path, tmp_path: Path) -> None:
    """`kubectl delete -k` on an overlay deletes what it renders: never the Namespace (and so
    never the PersistentVolumeClaim in it). The namespace has a kustomization of its own."""
    for overlay in (*OVERLAYS, "second"):
        assert "Namespace" not in {d["kind"] for d in render(overlay, workdir)}, overlay
    (namespace,) = render("namespace", workdir)
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert validate([namespace], tmp_path / "namespace.yaml") == "rc=0\n"
    (other,) = render("second-namespace", workdir)
    assert other["metadata"]["name"] == "raflora-b" and other["metadata"]["labels"] == labels


def test_strict_validation_catches_misspelt_fields(workdir: Path, tmp_path: Path) -> None:
    sts = json.loads(json.dumps(one(render("cpu", workdir), "StatefulSet")))
    c = sts["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    report = validate([sts], tmp_path / "bad.yaml")
    assert report.startswith("rc=1") and "readinesProbe" in report, report


def test_statefulset_probes_storage_security(rendered: tuple[dict[str, Any], ...]) -> None:
    sts = one(rendered, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = container(rendered)
    assert sts["spec"]["replicas"] == 1
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    data_dir = settings_of(rendered)["RAFLORA_DATA_DIR"]
    if settings_of(rendered).get("RAFLORA_STORAGE") == "s3":
        # Object-store mode: the data directory is node-local scratch, nothing is claimed.
        assert "volumeClaimTemplates" not in sts["spec"]
        (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
        assert data["emptyDir"]["sizeLimit"] and mounts["data"]["mountPath"] == data_dir
    else:
        # The data directory is a PersistentVolumeClaim per pod.
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"]
        assert mounts[claim["metadata"]["name"]]["mountPath"] == data_dir
    # The TLS/credentials Secret is mounted read-only at /etc/raflora/tls.
    secret = one(rendered, "Secret", "raflora-tls")
    (tls_volume,) = [
        v
        for v in pod["volumes"]
        if v.get("secret", {}).get("secretName", "").startswith("raflora-tls")
    ]
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts[tls_volume["name"]] == {
        "name": tls_volume["name"],
        "mountPath": "/etc/raflora/tls",
        "readOnly": True,
    }
    assert {"tls.crt", "tls.key", "ca.crt", "admin-token"} <= set(
        secret.get("data", {}) | secret.get("stringData", {})
    )
    # Probes: one handler each, plaintext HTTP on the health port in every mode (TLS too):
    # /healthz (the event loop beats) for liveness and start-up, /readyz for readiness.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464, "health": 8080}
    assert int(settings_of(rendered)["RAFLORA_HEALTH_PORT"]) == ports["health"]
    paths = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        handlers = set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
        assert handlers == {"httpGet"}, (probe, handlers)
        assert c[probe]["httpGet"] == {"path": path, "port": "health"}
    # Liveness fails only after the heartbeat timeout and a few periods: a slow moment is not
    # a hang.
    timeout = ServerSettings().health_heartbeat_timeout_seconds
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 2 * timeout
    # Non-root, no privileges, read-only root: the restricted Pod Security Standard.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    # The server shuts down within its grace period, before the kubelet's SIGKILL.
    grace = float(settings_of(rendered)["RAFLORA_GRACE_SECONDS"])
    assert grace + 5 <= pod["terminationGracePeriodSeconds"]


def test_gpu_only_in_the_gpu_overlay(workdir: Path) -> None:
    for overlay in OVERLAYS:
        docs = render(overlay, workdir)
        c = container(docs)
        gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        device = settings_of(docs)["RAFLORA_DEVICE"]
        if overlay == "gpu":
            assert gpu == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
            assert device == "cuda" and c["image"].endswith("-cuda")
            tolerations = one(docs, "StatefulSet")["spec"]["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                tolerations
            )
        else:
            assert gpu is None and device == "cpu" and not c["image"].endswith("-cuda")


def test_services_and_disruption_budget_select_the_pod(
    rendered: tuple[dict[str, Any], ...],
) -> None:
    sts = one(rendered, "StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(rendered)["ports"]}
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert sts["spec"]["serviceName"] in services
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    exposed = set()
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
            exposed.add(port["name"])
    assert exposed == {"grpc", "metrics"}
    pdb = one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # Every object lands in the one namespace, which deploy/kubernetes/namespace creates.
    assert {d["metadata"].get("namespace") for d in rendered} == {NAMESPACE}


def test_network_policy(rendered: tuple[dict[str, Any], ...]) -> None:
    """gRPC and health open, /metrics only from the monitoring namespace, nothing else in."""
    (policy,) = (
        d for d in rendered if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "raflora"
    )
    spec = policy["spec"]
    pod_labels = one(rendered, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]  # egress is not restricted
    container_ports = {p["name"] for p in container(rendered)["ports"]}
    opened: dict[str, Any] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in container_ports and port["protocol"] == "TCP"
            opened[port["port"]] = rule.get("from")
    assert opened["grpc"] is None and opened["health"] is None  # from anywhere
    assert opened["metrics"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert set(opened) == container_ports


def test_ray_cluster_runs_the_servers_image_and_takes_only_the_server(
    workdir: Path, tmp_path: Path
) -> None:
    """overlays/ray: the RayCluster's pods validate strictly as Pods, run the server's image at
    the pinned Ray version, and the server dials the head Service KubeRay creates; only the
    server and the Ray pods may reach the Ray pods (a Ray cluster runs what drivers send)."""
    docs = render("ray", workdir)
    cluster = one(docs, "RayCluster", "raflora-ray")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    pins = dict(
        line.split("==")
        for line in (ROOT / "deploy/docker/constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert spec["rayVersion"] == pins["ray"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert set(spec) <= {
        "rayVersion",
        "enableInTreeAutoscaling",
        "headGroupSpec",
        "workerGroupSpecs",
    }
    server_image = container(docs)["image"]
    pods = []
    for group in groups:
        template = group["template"]
        (ray_container,) = template["spec"]["containers"]
        assert ray_container["image"] == server_image
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "raflora-ray"
        assert set(group["rayStartParams"]) <= {
            "num-cpus",
            "include-dashboard",
            "disable-usage-stats",
        }
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": ray_container["name"], **template["metadata"]},
                "spec": template["spec"],
            }
        )
    worker = spec["workerGroupSpecs"][0]
    cpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert worker["rayStartParams"]["num-cpus"] == cpus  # one task per CPU it is given
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs none
    assert validate(pods, tmp_path / "ray-pods.yaml") == "rc=0\n"
    settings = settings_of(docs)
    head_service = f"{cluster['metadata']['name']}-head-svc"
    assert settings["RAFLORA_RAY_ADDRESS"] == f"ray://{head_service}:10001"
    policy = next(
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "raflora-ray"
    )
    ray_labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= ray_labels.items()
    server_labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    (rule,) = policy["spec"]["ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespace, no IP
    assert [a.items() <= server_labels.items() for a in allowed] == [True, False]
    assert allowed[1].items() <= ray_labels.items()
    # Ray's token authentication: every Ray pod and the server present the one token of the
    # Secret the operator's overlay generates (docs/operations.md), whatever it is named.
    secret = one(docs, "Secret", "raflora-ray-auth")
    assert base64.b64decode(secret["data"]["RAY_AUTH_TOKEN"]) == b"cd" * 32
    for member in [*(g["template"]["spec"]["containers"][0] for g in groups), container(docs)]:
        env = {e["name"]: e for e in member.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", member["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "RAY_AUTH_TOKEN"}, member


def test_gateway_and_ingress_route_grpc_to_the_service(workdir: Path) -> None:
    docs = render("edge", workdir)
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "raflora"]
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    exposed = {"raflora.v1.AggregationService", "grpc.health.v1.Health"}
    # Gateway API: a v1 GRPCRoute to the Service's gRPC port, by service name.
    route = one(docs, "GRPCRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["namespace"] == NAMESPACE
    (parent,) = route["spec"]["parentRefs"]
    assert parent["kind"] == "Gateway" and parent["name"] and parent["sectionName"]
    (rule,) = route["spec"]["rules"]
    assert {m["method"]["service"] for m in rule["matches"]} == exposed
    assert all(m["method"].get("type", "Exact") == "Exact" for m in rule["matches"])
    assert rule["backendRefs"] == [
        {"group": "", "kind": "Service", "name": "raflora", "port": grpc_port["port"]}
    ]
    # ingress-nginx: gRPC to the backend, TLS at the edge, no body-size cap on client streams.
    ingress = one(docs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] in {"GRPC", "GRPCS"}
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert float(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= float(
        ServerSettings().max_request_seconds
    )
    (tls,) = ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in tls["hosts"] and tls["secretName"]
    paths = rule["http"]["paths"]
    assert {p["path"].strip("/") for p in paths} == exposed
    for path in paths:
        assert path["pathType"] == "Prefix"
        assert path["backend"]["service"] == {"name": "raflora", "port": {"name": "grpc"}}


def test_second_instance_overlay(workdir: Path) -> None:
    docs = render("second", workdir)
    kinds = {d["kind"] for d in docs}
    assert "PrometheusRule" not in kinds and "ServiceMonitor" in kinds
    assert not [d for d in docs if d["metadata"]["name"].startswith("raflora-dashboard")]
    assert {d["metadata"].get("namespace") for d in docs} == {"raflora-b"}


def test_settings_are_valid_server_settings(rendered: tuple[dict[str, Any], ...]) -> None:
    """Every RAFLORA_* key is a real setting, and the values validate as the server's own."""
    env = settings_of(rendered)
    fields = {f"RAFLORA_{name.upper()}": name for name in ServerSettings.model_fields}
    unknown = sorted(set(env) - set(fields))
    assert not unknown, f"not server settings: {unknown}"
    settings = ServerSettings.model_validate({fields[k]: v for k, v in env.items()})
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert settings.port == 50051 and settings.metrics_port == 9464
    # The federations file is where the ConfigMap is mounted, and parses.
    mounts = {m["mountPath"] for m in container(rendered)["volumeMounts"]}
    assert settings.federations_file is not None
    assert str(settings.federations_file.parent) in mounts
    federations = one(rendered, "ConfigMap", "raflora-federations-")["data"]
    for raw in json.loads(federations[settings.federations_file.name]):
        FederationConfig.parse(raw)
    if settings.storage == "s3":  # the bucket's credentials and the token key from the Secret
        assert settings.s3_bucket and settings.token_key_file is not None
        assert str(settings.token_key_file.parent) in mounts
        env_from_secret = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container(rendered).get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        store_secret = one(rendered, "Secret", "raflora-object-store")
        assert {k: v["name"] for k, v in env_from_secret.items()} == {
            "AWS_ACCESS_KEY_ID": store_secret["metadata"]["name"],
            "AWS_SECRET_ACCESS_KEY": store_secret["metadata"]["name"],
        }
    # Paths the TLS component sets all point into the mounted Secret.
    for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "admin_token_file"):
        value = getattr(settings, key, None)
        assert value is None or str(value).startswith("/etc/raflora/tls/"), (key, value)


# -- Monitoring objects and alert rules ------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_service(
    rendered: tuple[dict[str, Any], ...],
) -> None:
    monitor = one(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    selected = [
        d
        for d in rendered
        if d["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["raflora-metrics"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # job="raflora", which the alert rules and the dashboard select on.
    assert selected[0]["metadata"]["labels"][spec["jobLabel"]] == "raflora"
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


def test_prometheus_rule_is_the_rule_file_and_passes_promtool(
    rendered: tuple[dict[str, Any], ...], tmp_path: Path
) -> None:
    rule = one(rendered, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["spec"] == load_rules()
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    out = run([debian_tool("promtool"), "check", "rules", str(spec)])
    assert f"SUCCESS: {len(all_rules(load_rules()))} rules found" in out, out


def test_generated_deploy_files_are_current() -> None:
    run([sys.executable, str(ROOT / "scripts/gen_deploy.py"), "--check"])


def test_alert_rules_unit_tests_cover_every_alert() -> None:
    out = run([debian_tool("promtool"), "test", "rules", str(RULES_TEST)])
    assert "SUCCESS" in out, out
    alerts = {r["alert"] for r in all_rules(load_rules()) if "alert" in r}
    assert alerts == {
        "RafloraRankCollapse",
        "RafloraRoundsStalled",
        "RafloraUploadErrorRatioHigh",
        "RafloraAggregationFailed",
        "RafloraRayFallback",
        "RafloraServerDown",
    }
    cases = [
        case
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == alerts and silent == alerts  # each alert: when it fires, when it doesn't


# -- Dashboard ------------------------------------------------------------------------------


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run([debian_tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(queries)} rules found" in out, out


def test_dashboard_structure() -> None:
    board = load_dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"] == {
                "type": "prometheus",
                "uid": "${datasource}",
            }
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "federation"}
    sections = [p["title"] for p in panels if p["type"] == "row"]
    assert sections == [
        "Rounds",
        "Clients",
        "Throughput",
        "Latency",
        "Rank energy",
        "Privacy",
        "Process",
    ]
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for needed in (
        "raflora_current_round",
        "raflora_rounds_published_total",
        "raflora_active_clients",
        "raflora_uploads_total",
        "raflora_upload_bytes_total",
        "raflora_push_duration_seconds_bucket",
        "raflora_pull_duration_seconds_bucket",
        "raflora_aggregation_duration_seconds_bucket",
        "raflora_rank_energy_min_ratio",
        "raflora_rank_partition_energy_ratio",
        "raflora_rank_collapse_rounds",
        "raflora_privacy_epsilon",
        "process_cpu_seconds_total",
        "raflora_build_info",
    ):
        assert needed in used, needed
    # The deprecated names of the 0-1 gauges are for old dashboards, not for ours.
    assert not used & set(DEPRECATED_RATIO_NAMES), used & set(DEPRECATED_RATIO_NAMES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Series names the real server declares on /metrics."""
    with threaded_server(tmp_path_factory.mktemp("scrape")) as server:
        yield exported_series_names(scrape(server.metrics_url))


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, federation) (rate(a_bucket{x="y z"}[5m]))) '
        '/ on(job) b offset 5m and c:d:e or up{job="r"} > bool 1e3'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:d:e", "up"}


def test_dashboard_references_only_exported_metrics(exported: set[str]) -> None:
    assert "raflora_current_round" in exported and "raflora_uploads_total" in exported
    for title, expr in dashboard_queries():
        missing = metric_names(expr) - exported
        assert not missing, f"panel {title!r} uses {missing}, which the server does not export"
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.findall(r"label_values\((\w+)", variable["definition"])
            assert metric in exported


def test_alert_rules_reference_only_exported_metrics(exported: set[str]) -> None:
    rules = all_rules(load_rules())
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        used = metric_names(rule["expr"])
        missing = used - exported - recorded - {"up"}
        assert not missing, f"{rule.get('alert') or rule.get('record')} uses {missing}"
        assert not used & set(DEPRECATED_RATIO_NAMES), rule


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped)."""
    anchors = set()
    for line in markdown.splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_every_alert_has_a_runbook() -> None:
    """Every alert's runbook_url is an entry of docs/operations.md's Runbooks section."""
    guide = OPERATIONS.read_text()
    anchors = github_anchors(guide)
    runbooks = guide[guide.index("\n## Runbooks\n") :]
    for rule in all_rules(load_rules()):
        if "alert" not in rule:
            continue
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md" and anchor == rule["alert"].lower(), url
        assert anchor in anchors, f"no heading for {url} in docs/operations.md"
        assert f"\n### {rule['alert']}\n" in runbooks, rule["alert"]


# -- health probes against real servers -------------------------------------------------------


def http_status(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    """Status and JSON body ({} for another type) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, kind, body = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        status, kind, body = exc.code, exc.headers["Content-Type"], exc.read()
    return int(status), json.loads(body) if kind == "application/json" else {}


def test_health_endpoints_fail_while_the_event_loop_is_stalled(tmp_path: Path) -> None:
    """/healthz and /readyz answer from a thread of their own: a callback that blocks the
    event loop (the server hung, its port and TLS handshakes still fine) turns them to 503,
    and they recover with the loop. Here on a separate health port; on the metrics port by
    default."""
    with threaded_server(tmp_path, health_port=0, health_heartbeat_timeout_seconds=1.5) as handle:
        server = handle.server
        assert server.health_port not in (0, server.metrics_port)
        base = f"http://127.0.0.1:{server.health_port}"
        for path in ("/healthz", "/readyz"):
            status, body = http_status(base + path)
            assert (status, body["status"]) == (200, "ok"), body
        assert http_status(base + "/metrics")[0] == 404  # /metrics stays on its own port
        handle.loop.call_soon_threadsafe(time.sleep, 4.0)  # the injected stall
        time.sleep(2.5)
        for path in ("/healthz", "/readyz"):
            status, body = http_status(base + path)
            assert (status, body["status"]) == (503, "event loop stalled"), body
            assert body["heartbeat_age_seconds"] > 1.5
        time.sleep(2.5)  # the stall is over, the loop beats again
        status, body = http_status(base + "/healthz")
        assert (status, body["status"]) == (200, "ok"), body
        assert body["heartbeat_age_seconds"] < 1.5
        # Draining: not ready, still alive.
        handle.run(server.health.enter_graceful_shutdown())
        server.heartbeat.ready = False
        assert http_status(base + "/readyz")[0] == 503
        assert http_status(base + "/healthz")[0] == 200


def test_health_probe_times_out_on_a_stopped_server(tmp_path: Path) -> None:
    """The kubelet's view of a server process that hangs entirely (here: SIGSTOP): the probe's
    request gets no answer within its timeout, which counts as a failure; after SIGCONT it
    answers 200 again. /healthz lives on the metrics port by default."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    with server:
        url = f"http://127.0.0.1:{server.metrics_port}/healthz"
        assert http_status(url)[0] == 200
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises((TimeoutError, urllib.error.URLError)) as failed:
                urllib.request.urlopen(url, timeout=1.5)
            assert "timed out" in str(failed.value), failed.value
        finally:
            os.kill(server.pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while http_status(url, 5)[0] != 200:
            assert time.monotonic() < deadline, "no 200 after SIGCONT"
            time.sleep(0.2)


def test_paths_in_docs_exist() -> None:
    guide = (ROOT / "docs/operations.md").read_text()
    for path in (DASHBOARD, RULES, RULES_TEST, DOCKERFILE):
        assert str(path.relative_to(ROOT)) in guide
