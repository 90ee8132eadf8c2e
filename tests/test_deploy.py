"""deploy/ checked with real tools: hadolint, kustomize (kubectl), kubernetes-validate, promtool.

The container image itself is not built here (no container engine on CI); its Dockerfile is
linted, its build context checked against .dockerignore, and its health check script run
against a live server. The Kubernetes manifests are rendered from every overlay and validated
against the bundled Kubernetes JSON schemas offline, strictly (unknown fields fail).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from raflora.server.config import FederationConfig
from raflora.server.settings import ServerSettings
from raflora.server.testing import free_port, scrape, threaded_server

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
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS = ("1.29", "1.37")
OVERLAYS = ("cpu", "gpu", "tls")


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


@functools.cache
def render(overlay: str, workdir: Path) -> tuple[dict[str, Any], ...]:
    if overlay == "tls":
        path = tls_overlay(workdir)
    elif overlay == "second":
        path = second_instance_overlay(workdir)
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
    assert extra == ["deploy/docker/healthcheck.py"], extra
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
    assert {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= set(kinds)
    assert validate(core, tmp_path / "core.yaml") == "rc=0\n"  # no error, no warning


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
    # The data directory is a PersistentVolumeClaim per pod.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    data_dir = settings_of(rendered)["RAFLORA_DATA_DIR"]
    assert mounts[claim["metadata"]["name"]]["mountPath"] == data_dir
    # The TLS/credentials Secret is mounted read-only at /etc/raflora/tls.
    secret = one(rendered, "Secret", "raflora-tls")
    (tls_volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts[tls_volume["name"]] == {
        "name": tls_volume["name"],
        "mountPath": "/etc/raflora/tls",
        "readOnly": True,
    }
    assert {"tls.crt", "tls.key", "ca.crt", "admin-token"} <= set(
        secret.get("data", {}) | secret.get("stringData", {})
    )
    # Probes: exactly one handler each; native gRPC health on the gRPC port unless TLS is on.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    tls = "RAFLORA_TLS_CERT_FILE" in settings_of(rendered)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handlers = set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
        if tls:
            assert handlers == {"tcpSocket"} and c[probe]["tcpSocket"]["port"] == "grpc"
        else:
            assert handlers == {"grpc"} and c[probe]["grpc"]["port"] == ports["grpc"]
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
    # Every object lands in the one namespace (cluster-scoped Namespace aside).
    namespaces = {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"}
    assert namespaces == {one(rendered, "Namespace")["metadata"]["name"]}


def test_second_instance_overlay(workdir: Path) -> None:
    docs = render("second", workdir)
    kinds = {d["kind"] for d in docs}
    assert "PrometheusRule" not in kinds and "ServiceMonitor" in kinds
    assert not [d for d in docs if d["metadata"]["name"].startswith("raflora-dashboard")]
    assert one(docs, "Namespace")["metadata"]["name"] == "raflora-b"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "raflora-b"
    }


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
    assert sections == ["Rounds", "Clients", "Throughput", "Latency", "Rank energy"]
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
        "raflora_rank_energy_min_fraction",
        "raflora_rank_partition_energy",
    ):
        assert needed in used, needed


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
        missing = metric_names(rule["expr"]) - exported - recorded - {"up"}
        assert not missing, f"{rule.get('alert') or rule.get('record')} uses {missing}"


def test_paths_in_docs_exist() -> None:
    guide = (ROOT / "docs/operations.md").read_text()
    for path in (DASHBOARD, RULES, RULES_TEST, DOCKERFILE):
        assert str(path.relative_to(ROOT)) in guide
