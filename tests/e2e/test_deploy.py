"""The files in deploy/ against the gateway they deploy.

The Grafana dashboard and the Prometheus alerts ask only for metrics the gateway exports: every metric name in their
PromQL is among those a running gateway's /metrics names. The Kubernetes manifests, the Envoy configuration and the
systemd unit agree with the gateway and with each other: their configurations load with the gateway's own loader,
probes and health checks name services a running gateway answers without a key, their flags are ones
`llmrelay-server` takes, and ports, secrets, labels and shutdown timeouts match from one file to the next.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import re
import shlex
import shutil
import subprocess
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from certs import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import BIN, clean_env
from llmrelay import v1 as pb
from llmrelay.cli import FAILED_CODES
from llmrelay_server.config import GatewayConfig, is_postgresql, load_config
from llmrelay_server.domain import (
    AllBackendsFailedError,
    AttemptOutcome,
    DeadlineExceededError,
    FieldViolation,
    InvalidRequestError,
    ShuttingDownError,
    StreamInterruptedError,
    TokenizerUnavailableError,
    UnauthenticatedError,
    UpstreamError,
    UpstreamErrorKind,
)
from llmrelay_server.health import SERVICE_NAME
from llmrelay_server.router import NOT_THE_BACKENDS_FAULT, CircuitState
from llmrelay_server.status import rpc_failure
from prometheus_client.parser import text_string_to_metric_families
from support import GatewayFactory, chat, stream_chat, two_backends
from upstream import FakeUpstream

DEPLOY = Path(__file__).parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
# What a PromQL expression may name besides metrics.
KEYWORDS = frozenset(
    ("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset")
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels, keywords or Grafana variables)."""
    bare = _RANGE.sub("", _MATCHERS.sub("", _GROUPING.sub("", _STRING.sub('""', expr))))
    bare = re.sub(r"\$\w+", "", bare)
    return {name for name in _NAME.findall(bare) if name not in KEYWORDS and not re.fullmatch(r"\d+\w*", name)}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "llmrelay.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 9
    return exprs


def alert_exprs() -> list[str]:
    rules = [rule for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
             for rule in group["rules"]]  # fmt: skip
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    return [str(rule["expr"]) for rule in rules]


def alert_rule(name: str) -> dict[str, Any]:
    """The rule of the alert of this name."""
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    [rule] = [rule for group in groups for rule in group["rules"] if rule["alert"] == name]
    return dict(rule)


def alert(name: str) -> str:
    """The expression of the alert of this name."""
    return str(alert_rule(name)["expr"])


def matched(expr: str, label: str) -> set[str]:
    """The values a `label=~"a|b"` matcher of the expression takes."""
    found = re.search(rf'{label}=~"([^"]+)"', expr)
    assert found, (label, expr)
    return set(found.group(1).split("|"))


def test_backend_down_sees_every_failure_that_is_the_backends() -> None:
    """A backend that refused every call for its rate limit, or broke every stream part-way, failed 100% of its
    attempts while the alert saw none of them."""
    backends_own = {kind.attempt_outcome.value for kind in UpstreamErrorKind if kind not in NOT_THE_BACKENDS_FAULT}
    assert backends_own | {AttemptOutcome.INTERRUPTED.value} <= matched(alert("LLMRelayBackendDown"), "outcome")


def test_the_error_ratio_counts_the_gateways_and_upstreams_failures_not_the_callers() -> None:
    """Calls cut by a broken stream (ABORTED), or refused for our own upstream credentials (FAILED_PRECONDITION),
    failed every call without the error ratio moving."""
    ours = [
        StreamInterruptedError(UpstreamError(UpstreamErrorKind.SERVER_ERROR, "openai", "cut")),
        ShuttingDownError(stream_started=True),
        TokenizerUnavailableError("o200k_base", "missing"),
        AllBackendsFailedError("down", []),
        DeadlineExceededError("late", ()),
    ]
    callers = [InvalidRequestError([FieldViolation("messages", "must not be empty")]), UnauthenticatedError("no key")]
    counted = matched(alert("LLMRelayErrorRatioHigh"), "grpc_code")
    assert {rpc_failure(error).code.name for error in ours} <= counted
    assert not {rpc_failure(error).code.name for error in callers} & counted


def test_llmrelay_stats_counts_as_failed_what_the_error_ratio_counts() -> None:
    """`llmrelay stats`' failed column and the alert on the error ratio say the same thing of the same calls."""
    assert matched(alert("LLMRelayErrorRatioHigh"), "grpc_code") == FAILED_CODES


def test_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(x_bucket{a="b{c}",d=~"e|f"}[$__rate_interval])))'
        " * 3600 > 0.05 unless on (backend) y_total offset 5m and bool z"
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "z"}


async def exported_names(port: int) -> set[str]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names: set[str] = set()
    # A family is named even before it has samples (a labelled counter nothing has counted yet).
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def test_dashboard_and_alerts_use_only_exported_metrics(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, tmp_path: Path
) -> None:
    # Over TLS, whose certificate's end is a metric too.
    ca = Authority("llmrelay test CA")
    ca.server().write(tmp_path / "server.pem", tmp_path / "server.key")
    tls = f'tls: {{cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.key"}"}}'
    gateway = await gateway_factory(two_backends(primary, local), server=f'metrics_listen: "127.0.0.1:0", {tls}')
    assert gateway.metrics is not None and gateway.metrics.port is not None
    credentials = grpc.ssl_channel_credentials(ca.cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{gateway.port}", credentials) as channel:
        stub = pb.LLMServiceStub(channel)
        await stub.Complete(chat(), timeout=5)
        [chunk async for chunk in stub.StreamComplete(stream_chat(), timeout=5)]
    exported = await exported_names(gateway.metrics.port)

    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        used = set().union(*(metric_names(expr) for expr in exprs))
        assert len(used) >= 5, (source, used)
        assert used <= exported, f"{source} uses metrics the gateway does not export: {sorted(used - exported)}"


def promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    """Runs `promtool test rules` (Prometheus' own evaluation of the rules and expressions, on made-up series
    scraped every 15 s) over alerts.yaml with these tests; fails with promtool's account of what differed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian's prometheus package): run `make services`")
    suite = tmp_path / "alerts_test.yaml"
    rules = str(DEPLOY / "prometheus" / "alerts.yaml")
    suite.write_text(yaml.safe_dump({"rule_files": [rules], "evaluation_interval": "15s", "tests": tests}))
    done = subprocess.run([promtool, "test", "rules", str(suite)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def circuit_series(backend: str, process: str, states: list[str]) -> list[dict[str, str]]:
    """llmrelay_circuit_state as one process exports it, one scrape for each state in `states`."""
    return [
        {
            "series": f'llmrelay_circuit_state{{backend="{backend}",instance="{process}",state="{state}"}}',
            "values": " ".join("1" if seen == state else "0" for seen in states),
        }
        for state in CircuitState
    ]


def test_the_circuit_alert_fires_for_a_backend_whose_probes_keep_failing(tmp_path: Path) -> None:
    """It asked for the circuit open for 2 minutes on end, which a circuit never is with a cool-down shorter than that
    (30 s by default): each cool-down ends half open, and a probe that fails opens it again, so the alert never
    fired. A circuit left half open by a blip, with no call since to probe it, does not fire it."""
    failing = ["open", "open", "half_open"] * 8  # a 30 s cool-down, a probe seen at a scrape, failing again
    blip = ["open", "open"] + ["half_open"] * 22  # open once, then no traffic
    recovered = ["open", "open", "half_open"] + ["closed"] * 21
    rule = alert_rule("LLMRelayCircuitOpen")
    annotations = {name: text.replace("{{ $labels.backend }}", "openai") for name, text in rule["annotations"].items()}
    promtool_test(
        tmp_path,
        [
            {
                "interval": "15s",
                "input_series": circuit_series("openai", "a", failing)
                + circuit_series("local", "a", blip)
                + circuit_series("vllm", "a", recovered),
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": rule["alert"], "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": rule["alert"],
                        "exp_alerts": [
                            {
                                "exp_labels": {"backend": "openai", "severity": "warning"},
                                "exp_annotations": annotations,
                            }
                        ],
                    },
                ],
            }
        ],
    )


def test_the_circuit_panel_shows_the_worst_state_among_the_processes(tmp_path: Path) -> None:
    """It added the processes' worst open and worst half open: 3, shown as no state, while one process had the
    circuit open and another half open."""

    def sample(backend: str, value: int) -> dict[str, Any]:
        return {"labels": f'{{backend="{backend}"}}', "value": value}

    [expr] = [
        target["expr"]
        for panel in json.loads((DEPLOY / "grafana" / "llmrelay.json").read_text())["panels"]
        if panel["title"] == "Circuit state"
        for target in panel["targets"]
    ]
    promtool_test(
        tmp_path,
        [
            {
                "interval": "15s",
                "input_series": circuit_series("openai", "a", ["open", "half_open", "closed"])
                + circuit_series("openai", "b", ["half_open", "half_open", "closed"])
                + circuit_series("local", "a", ["closed", "closed", "closed"]),
                "promql_expr_test": [
                    {"expr": expr, "eval_time": time, "exp_samples": [sample("openai", openai), sample("local", 0)]}
                    for time, openai in (("0s", 2), ("15s", 1), ("30s", 0))
                ],
            }
        ],
    )


# --- Kubernetes, Envoy and systemd ----------------------------------------------------------------------------------

# A ${VAR} (required) or ${VAR:-default} of the gateway's YAML, as its loader interpolates them.
_INTERPOLATED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
# Where an Envoy retry cannot replay a call a gateway has started (and billed an upstream for).
SAFE_RETRIES = frozenset(("connect-failure", "refused-stream", "reset-before-request"))
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi)?")


def required_variables(config_file: Path) -> set[str]:
    """The environment variables a gateway YAML needs: those its values (not its comments) interpolate without a
    default."""

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [text for item in value.values() for text in strings(item)]
        if isinstance(value, list):
            return [text for item in value for text in strings(item)]
        return [value] if isinstance(value, str) else []

    found = _INTERPOLATED.findall(" ".join(strings(yaml.safe_load(config_file.read_text()))))
    return {name for name, default in found if not default}


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def seconds(duration: str | int) -> float:
    """An Envoy ("600s") or systemd ("90", "90s") duration in seconds."""
    text = str(duration)
    assert re.fullmatch(r"\d+(\.\d+)?s?", text), f"{duration!r}: write plain seconds"
    return float(text.removesuffix("s"))


def quantity_bytes(quantity: str) -> int:
    match = _QUANTITY.fullmatch(quantity)
    assert match, quantity
    return int(match[1]) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match[2]]


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return document


def manifests() -> dict[str, dict[str, Any]]:
    """The resources kustomization.yaml lists, by kind (there is one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert document["kind"] not in found, f"{name}: a second {document['kind']}"
            found[document["kind"]] = document
    return found


def config_map() -> tuple[str, Path]:
    """The ConfigMap kustomization.yaml generates: its name and the one file it holds (the gateway's YAML)."""
    [generator] = kustomization()["configMapGenerator"]
    [file] = generator["files"]
    return generator["name"], KUBERNETES / file


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    gateway: dict[str, Any]
    [gateway] = pod_spec()["containers"]
    return gateway


def container_port(name_or_number: str | int) -> int:
    """A port as a Service's targetPort names it: a number, or the name of one of the container's ports."""
    if isinstance(name_or_number, int):
        return name_or_number
    [port] = [p["containerPort"] for p in container()["ports"] if p["name"] == name_or_number]
    return int(port)


def mount_of(volume_name: str) -> str:
    [path] = [m["mountPath"] for m in container()["volumeMounts"] if m["name"] == volume_name]
    return str(path)


def probes() -> dict[str, dict[str, Any]]:
    return {kind: container()[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def envoy() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    return document


def envoy_cluster() -> dict[str, Any]:
    cluster: dict[str, Any]
    [cluster] = envoy()["static_resources"]["clusters"]
    return cluster


def envoy_connection_manager() -> dict[str, Any]:
    [listener] = envoy()["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [manager] = chain["filters"]
    config: dict[str, Any] = manager["typed_config"]
    return config


def systemd_service() -> dict[str, str]:
    """The [Service] section of the unit. configparser reads unit files well enough (no line continuations here);
    non-strict, since systemd allows a key more than once."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in systemd
    parser.read_string((SYSTEMD / "llmrelay.service").read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    return dict(parser["Service"])


def load_deployed(config_file: Path, env: dict[str, str], tmp_path: Path, keys_yaml: str) -> GatewayConfig:
    """The configuration as the gateway loads it, its variables set to stand-ins and its keys file (which the loader
    reads and checks) replaced by a copy of `keys_yaml`."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(keys_yaml)
    stand_ins = {name: f"stand-in-{name.lower()}" for name in required_variables(config_file)}
    return load_config({**stand_ins, **env, "LLMRELAY_KEYS_FILE": str(keys_file)}, path=config_file)


@pytest.fixture
def k8s_config(tmp_path: Path) -> GatewayConfig:
    return load_deployed(config_map()[1], {}, tmp_path, manifests()["Secret"]["stringData"]["keys.yaml"])


def help_flags() -> set[str]:
    help_text = subprocess.run(
        [str(BIN / "llmrelay-server"), "--help"], capture_output=True, text=True, check=True, env=clean_env()
    ).stdout
    return set(re.findall(r"--[a-z][a-z-]*", help_text))


def exec_start() -> list[str]:
    return shlex.split(systemd_service()["ExecStart"])


def flag_value(argv: list[str], flag: str) -> str:
    [value] = [argv[i + 1] for i, arg in enumerate(argv) if arg == flag] + [
        arg.partition("=")[2] for arg in argv if arg.startswith(f"{flag}=")
    ]
    return value


def test_kustomization_ties_every_manifest_together() -> None:
    resources = kustomization()["resources"]
    name, config_file = config_map()
    listed = {*resources, config_file.name, "kustomization.yaml"}
    assert {path.name for path in KUBERNETES.iterdir()} == listed
    found = manifests()
    assert set(found) == {"Deployment", "Service", "PodDisruptionBudget", "Secret"}
    assert {(d["kind"], d["apiVersion"]) for d in found.values()} == {
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("Secret", "v1"),
    }
    assert {"name": "config", "configMap": {"name": name}} in pod_spec()["volumes"]
    [image] = kustomization()["images"]
    assert image["name"] == container()["image"]

    # Where kubectl is at hand, kustomize itself: the generated ConfigMap's hashed name reaches the Deployment.
    if kubectl := shutil.which("kubectl"):
        built = subprocess.run(
            [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        rendered = {d["kind"]: d for d in yaml.safe_load_all(built)}
        generated = rendered["ConfigMap"]["metadata"]["name"]
        assert generated.startswith(f"{name}-")
        assert rendered["ConfigMap"]["data"][config_file.name] == config_file.read_text()
        deployment = rendered["Deployment"]["spec"]["template"]["spec"]
        assert {"name": "config", "configMap": {"name": generated}} in deployment["volumes"]
        assert deployment["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
        assert {d["metadata"]["namespace"] for d in rendered.values()} == {kustomization()["namespace"]}


def test_ports_agree_across_config_container_service_and_probes(k8s_config: GatewayConfig) -> None:
    grpc_port = port_of(k8s_config.server.listen)
    assert k8s_config.server.metrics_listen is not None
    metrics_port = port_of(k8s_config.server.metrics_listen)
    assert {p["name"]: p["containerPort"] for p in container()["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    # Headless: clients dial the pods on the Service's ports themselves, so each must be the container's.
    service = manifests()["Service"]["spec"]
    assert service["clusterIP"] == "None"
    ports = {p["name"]: (p["port"], container_port(p["targetPort"])) for p in service["ports"]}
    assert ports == {"grpc": (grpc_port, grpc_port), "metrics": (metrics_port, metrics_port)}
    for kind, probe in probes().items():
        assert probe["grpc"]["port"] == grpc_port, kind
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_kubernetes_config_shares_state_and_mounts_what_it_names(k8s_config: GatewayConfig) -> None:
    assert k8s_config.state.redis_url is not None and is_postgresql(k8s_config.server.usage_db)
    assert "grpc.health.v1.Health" in k8s_config.auth.open_services  # the probes carry no key
    assert [backend.name for backend in k8s_config.backends] == ["openai"]  # no Ollama on the pod's localhost
    _, config_file = config_map()
    assert flag_value(container()["args"], "--config") == f"{mount_of('config')}/{config_file.name}"
    # The keys file is the Secret's, mounted as a directory so that edits reach it.
    keys_file = yaml.safe_load(config_file.read_text())["auth"]["keys_file"]
    [keys] = [v for v in pod_spec()["volumes"] if v["name"] == "keys"]
    assert keys["secret"]["secretName"] == manifests()["Secret"]["metadata"]["name"]
    assert [f"{mount_of('keys')}/{item['path']}" for item in keys["secret"]["items"]] == [keys_file]
    # The journal is the one writable place besides /tmp, and holds what the gateway may write there.
    assert k8s_config.server.usage_journal_dir == mount_of("journal")
    [journal] = [v for v in pod_spec()["volumes"] if v["name"] == "journal"]
    limit = quantity_bytes(journal["emptyDir"]["sizeLimit"])
    assert limit > k8s_config.server.usage_journal_max_bytes * k8s_config.server.workers


def test_secret_supplies_every_variable_the_config_interpolates() -> None:
    secret = manifests()["Secret"]
    provided = secret["stringData"]
    injected = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container()["env"]}
    assert required_variables(config_map()[1]) == set(injected)
    for name, ref in injected.items():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in provided, name
    # A template: every value is visibly a placeholder, and the keys file as shipped admits nobody (not everybody).
    assert all("REPLACE-ME" in value for value in provided.values())
    assert yaml.safe_load(provided["keys.yaml"])["keys"]


def test_deployment_survives_disruption_and_drains_before_it_is_killed(k8s_config: GatewayConfig) -> None:
    found = manifests()
    deployment = found["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["replicas"] == 3
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    # SIGKILL only after the gateway's own shutdown: the drain, the grace period for calls in flight, and the ledger's
    # last writes to a PostgreSQL that may have stopped answering (two writes and the pool's close, some 27 s).
    assert is_postgresql(k8s_config.server.usage_db)
    drain_and_grace_s = k8s_config.server.drain_s + k8s_config.server.grace_period_s
    assert pod_spec()["terminationGracePeriodSeconds"] >= drain_and_grace_s + 30
    assert "lifecycle" not in container()  # no preStop: SIGTERM is the drain
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert {"memory"} <= set(container()["resources"]["limits"]) and container()["resources"]["requests"]["cpu"]
    # The calls the gateway admits fit the memory the pod may use: some 160 MiB at rest, and about 3 MiB a call whose
    # prompt fills a 128k context (six times its size, while it waits on its upstream). 1,000 calls in a 1Gi pod
    # had it killed for its memory, every stream on it cut, before the gateway refused one.
    limit = container()["resources"]["limits"]["memory"]
    assert limit.endswith(("Mi", "Gi"))
    limit_mib = int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1)
    assert k8s_config.server.max_concurrent_rpcs is not None
    assert 160 + 3 * k8s_config.server.max_concurrent_rpcs <= limit_mib


def test_probes_use_grpc_health_with_the_gateways_services() -> None:
    services = {kind: probe["grpc"]["service"] for kind, probe in probes().items()}
    # Liveness asks whether the process answers, readiness whether it can serve calls (a backend is usable).
    assert services == {"startupProbe": "", "livenessProbe": "", "readinessProbe": SERVICE_NAME}


async def test_probe_and_health_check_services_answer_without_a_key(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    names = {probe["grpc"]["service"] for probe in probes().values()}
    names.add(envoy_cluster()["health_checks"][0]["grpc_health_check"]["service_name"])
    # Keys configured, as in the deployed config: every model call needs one, the probes must not.
    keyed = f'auth: {{keys: [{{name: someone, sha256: "{"0" * 64}"}}]}}\n'
    gateway = await gateway_factory(two_backends(primary, local) + keyed)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in names:
            response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        # A name the gateway does not register would fail every probe.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await health.Check(health_pb2.HealthCheckRequest(service="llmrelay.v1.Nothing"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("source", ["kubernetes", "systemd"])
def test_command_lines_use_only_flags_the_gateway_takes(source: str) -> None:
    if source == "kubernetes":
        argv = [*container()["command"], *container()["args"]]
        assert argv[0] == "llmrelay-server"
    else:
        argv = exec_start()
        assert PurePosixPath(argv[0]).name == "llmrelay-server"
    used = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
    assert "--config" in used
    assert used <= help_flags(), f"{source}: flags llmrelay-server does not take: {sorted(used - help_flags())}"


def test_envoy_balances_calls_over_the_headless_service(k8s_config: GatewayConfig) -> None:
    # Every typed config is of the v3 API.
    types = re.findall(r'"@type":\s*"?([\w./]+)', (DEPLOY / "envoy" / "envoy.yaml").read_text())
    assert types and all(".v3." in t for t in types), types
    cluster = envoy_cluster()
    service = manifests()["Service"]
    assert cluster["type"] == "STRICT_DNS" and service["spec"]["clusterIP"] == "None"
    [endpoints] = cluster["load_assignment"]["endpoints"]
    [endpoint] = endpoints["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] == f"{service['metadata']['name']}.{kustomization()['namespace']}.svc.cluster.local"
    assert address["port_value"] == port_of(k8s_config.server.listen)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == probes()["readinessProbe"]["grpc"]["service"]
    # Envoy's default circuit breaker (1024 calls) would hold the fleet below what its replicas admit.
    [thresholds] = cluster["circuit_breakers"]["thresholds"]
    replicas = manifests()["Deployment"]["spec"]["replicas"]
    assert k8s_config.server.max_concurrent_rpcs is not None
    assert thresholds["max_requests"] >= replicas * k8s_config.server.max_concurrent_rpcs

    manager = envoy_connection_manager()
    assert manager["codec_type"] == "HTTP2"
    # Long streams: no route timeout, and an idle timeout longer than a Complete may stay silent.
    assert seconds(manager["stream_idle_timeout"]) > k8s_config.router.request_timeout_s
    [host] = manager["route_config"]["virtual_hosts"]
    [route] = host["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert seconds(route["route"]["timeout"]) == 0
    retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
    assert retry_on <= SAFE_RETRIES, f"retries that could replay a started call: {sorted(retry_on - SAFE_RETRIES)}"


def test_systemd_unit_matches_its_configuration(tmp_path: Path) -> None:
    service = systemd_service()
    argv = exec_start()
    config_file = PurePosixPath(flag_value(argv, "--config"))
    config_dir = PurePosixPath("/etc") / service["ConfigurationDirectory"]
    assert config_file.parent == config_dir and config_file.name == "llmrelay.yaml"
    workers = flag_value(argv, "--workers")
    assert int(workers) > 1

    # The configuration shipped beside the unit, loaded as the gateway would with that many workers (which needs
    # shared limits) and the secrets of the EnvironmentFile's template.
    env_file = PurePosixPath(service["EnvironmentFile"])
    assert env_file.parent == config_dir
    template = dict(
        line.split("=", 1)
        for line in (SYSTEMD / "llmrelay.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert all("REPLACE-ME" in value for value in template.values())
    yaml_file = SYSTEMD / config_file.name
    assert required_variables(yaml_file) <= set(template)
    config = load_deployed(yaml_file, {**template, "LLMRELAY_WORKERS": workers}, tmp_path, "keys: []\n")
    assert config.server.workers == int(workers) and config.state.redis_url is not None
    # The backends it configures alone: an Ollama on localhost:11434 (a port any local user may take) was in the
    # chain, and took callers' prompts when OpenAI failed.
    assert [backend.name for backend in config.backends] == ["openai"]

    # What it writes is in the StateDirectory (writable under ProtectSystem=strict); what it reads, in /etc/llmrelay.
    state_dirs = [PurePosixPath("/var/lib") / d for d in service["StateDirectory"].split()]
    assert config.server.usage_journal_dir is not None
    for written in (PurePosixPath(config.server.usage_db), PurePosixPath(config.server.usage_journal_dir)):
        assert written.is_relative_to(state_dirs[0]), written
    assert PurePosixPath(config.server.usage_journal_dir) in state_dirs  # created by systemd, as the gateway's user
    raw = yaml.safe_load(yaml_file.read_text())
    assert config.server.tls is not None
    for read in (raw["auth"]["keys_file"], config.server.tls.cert_file, config.server.tls.key_file):
        assert PurePosixPath(read).parent == config_dir, read

    # Stopping waits for the gateway's drain and grace period; reloading re-reads the keys file.
    assert seconds(service["TimeoutStopSec"]) > config.server.drain_s + config.server.grace_period_s
    assert service["KillSignal"] == "SIGTERM"
    assert shlex.split(service["ExecReload"])[1:] == ["-HUP", "$MAINPID"]
    assert service["Restart"] == "on-failure" and service["Type"] in ("simple", "exec")
    assert service.get("User") or service.get("DynamicUser") == "yes"
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}
    assert hardening.items() <= service.items()

    # Where systemd is at hand, its own check (which also wants ExecStart's program to exist: the installed one).
    if analyze := shutil.which("systemd-analyze"):
        unit = tmp_path / "llmrelay.service"
        text = (SYSTEMD / "llmrelay.service").read_text()
        unit.write_text(text.replace(f"ExecStart={argv[0]} ", f"ExecStart={BIN / 'llmrelay-server'} "))
        verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        # It exits 0 on unknown keys and bad values too, only saying so: any word from it is a failure.
        assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def image_instructions() -> list[list[tuple[str, str]]]:
    """deploy/Dockerfile's instructions (name, arguments), stage by stage; comments left out, continued lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, arguments = line.strip().partition(" ")
        if name == "FROM":
            stages.append([])
        stages[-1].append((name, " ".join(arguments.split())))
    return stages


def test_the_image_runs_as_the_deployment_runs_it() -> None:
    *_, final = image_instructions()
    said = dict(final)
    security = pod_spec()["securityContext"]
    assert said["USER"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert json.loads(said["ENTRYPOINT"]) == container()["command"]
    assert {int(port) for port in said["EXPOSE"].split()} == {port["containerPort"] for port in container()["ports"]}


def test_the_image_builds_the_package_from_what_it_copies_and_nothing_else(tmp_path: Path) -> None:
    """What the build stage copies (and .dockerignore lets into the build) makes the package with both commands: a
    module beside them that the package came to need would fail only at `docker build`."""
    root = DEPLOY.parent
    build, *_ = image_instructions()
    copied = [arguments.split() for name, arguments in build if name == "COPY"]
    sources = [source for *paths, _ in copied for source in paths]
    allowed = {line.strip("!/") for line in (root / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert set(sources) == allowed
    tree = tmp_path / "context"
    for source in sources:
        if (root / source).is_dir():
            shutil.copytree(root / source, tree / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(root / source, tree / source)
    subprocess.run(
        [BIN / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, tree],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("llmrelay-*.whl")
    with zipfile.ZipFile(wheel) as made:
        names = set(made.namelist())
        [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        commands = made.read(entry_points).decode()
    assert "llmrelay_server/__main__.py" in names and "llmrelay/v1/llmrelay_pb2.py" in names
    assert "llmrelay-server = llmrelay_server.__main__:main" in commands
    assert "llmrelay = llmrelay_command:main" in commands
