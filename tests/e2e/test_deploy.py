"""The Grafana dashboard and the Prometheus alerts in deploy/ ask only for metrics the gateway exports: every metric
name in their PromQL is among those a running gateway's /metrics names."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import grpc
import yaml
from llmrelay import v1 as pb
from prometheus_client.parser import text_string_to_metric_families
from support import GatewayFactory, chat, stream_chat, two_backends
from upstream import FakeUpstream

DEPLOY = Path(__file__).parents[2] / "deploy"
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
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), server='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None and gateway.metrics.port is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        await stub.Complete(chat(), timeout=5)
        [chunk async for chunk in stub.StreamComplete(stream_chat(), timeout=5)]
    exported = await exported_names(gateway.metrics.port)

    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        used = set().union(*(metric_names(expr) for expr in exprs))
        assert len(used) >= 5, (source, used)
        assert used <= exported, f"{source} uses metrics the gateway does not export: {sorted(used - exported)}"
