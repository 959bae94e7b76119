"""The Grafana dashboard against the daemons that feed it: two simulated agents, the controller and the
router run as real processes on loopback, serve a few requests, and each one's `/metrics` is scraped.
Every metric a panel's query names must be a family some daemon exports, and docs/metrics.md must list
exactly the families the daemons export. The provisioning files must point where docs/deploy.md says."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.system.stack import ROOT, Stack
from tests.system.test_router_stack import MODEL, _post, start_serving

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dynamollm.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
METRICS_DOC = ROOT / "docs" / "metrics.md"
NAME = re.compile(r"\bdynamollm_\w+")
SUFFIXES = ("_bucket", "_sum", "_count")


def _panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _panel_metrics() -> dict[str, list[str]]:
    """metric family -> the panels whose queries name it."""
    out: dict[str, list[str]] = {}
    for panel in _panels():
        for target in panel["targets"]:
            for name in NAME.findall(target["expr"]):
                for suffix in SUFFIXES:
                    name = name.removesuffix(suffix)
                out.setdefault(name, []).append(panel["title"])
    return out


def _families(text: str) -> dict[str, int]:
    """family name as written on its TYPE line (counters with `_total`) -> samples it has."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # when each counter series began (docs/metrics.md, top)
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = len(family.samples)
    return out


def _documented() -> set[str]:
    return set(re.findall(r"^\| `(dynamollm_\w+)` \|", METRICS_DOC.read_text(), re.MULTILINE))


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


def _sum(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def _check_energy_per_class(text: str, served: int) -> None:
    """The controller's attribution of pool energy to classes (docs/metrics.md, Controller)."""
    assert _sum(text, "dynamollm_class_requests_total") >= served
    tokens = _sum(text, "dynamollm_class_output_tokens_total")
    energy_j = _sum(text, "dynamollm_class_energy_joules_total")
    pool_energy_j = _sum(text, "dynamollm_pool_energy_joules_total") - _sum(
        text, "dynamollm_pool_energy_joules_total", pool="idle"
    )
    assert tokens >= 4 * served and 0 < energy_j <= pool_energy_j + 1e-6
    per_token = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dynamollm_class_energy_per_output_token_joules"
    ]
    assert per_token and all(j > 0 for j in per_token)


async def test_every_panel_query_names_an_exported_metric_and_the_docs_list_them_all(
    stack: Stack, tmp_path: Path
) -> None:
    async def scenario() -> dict[str, dict[str, int]]:  # daemon -> metric family -> samples
        agents, ctl, router, url = await start_serving(stack, tmp_path, 2)
        try:
            async with aiohttp.ClientSession() as session:
                served = 0
                for _ in range(200):  # until the router has a table with engine ports, then ten more
                    status, _ = await _post(session, url, {"model": MODEL, "prompt": "hi", "max_tokens": 4})
                    served += status == 200
                    if served >= 10:
                        break
                    await asyncio.sleep(0.1 if served == 0 else 0)
                assert served >= 10
                await asyncio.sleep(2.5)  # a ledger interval or two: the per-class energy is attributed
                scraped = {
                    "router": await _scrape(session, url + "/metrics"),
                    "controller": await _scrape(session, f"http://127.0.0.1:{ctl.metrics_port}/metrics"),
                }
                for i, agent in enumerate(agents):
                    scraped[f"agent{i}"] = await _scrape(
                        session, f"http://127.0.0.1:{agent.metrics_port}/metrics"
                    )
                _check_energy_per_class(scraped["controller"], served)
                return {daemon: _families(text) for daemon, text in scraped.items()}
        finally:
            router.terminate()
            assert await asyncio.wait_for(router.wait(), 40) == 0

    scraped = await asyncio.wait_for(scenario(), 120)
    exported: dict[str, int] = {}
    for families in scraped.values():
        for name, samples in families.items():
            if name.startswith("dynamollm_"):
                exported[name] = exported.get(name, 0) + samples
    missing = {name: panels for name, panels in _panel_metrics().items() if name not in exported}
    assert not missing, f"panels query metrics no daemon exports: {missing}"
    assert _documented() == set(exported), (
        f"in docs/metrics.md only: {_documented() - set(exported)}; "
        f"exported only: {set(exported) - _documented()}"
    )
    # what a running stack with traffic must have put a value in (a dashboard of empty panels is no test)
    for name in (
        "dynamollm_router_requests_total",
        "dynamollm_router_ttft_seconds",
        "dynamollm_router_slo_attainment_ratio",
        "dynamollm_router_predictor_accuracy_ratio",
        "dynamollm_router_queue_depth",
        "dynamollm_pool_instances",
        "dynamollm_cluster_power_watts",
        "dynamollm_gpu_power_watts",
        "dynamollm_gpu_energy_joules_total",
        "dynamollm_agent_lease_remaining_seconds",
        "dynamollm_engine_state",
    ):
        assert exported[name] > 0, name


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0] == {
        "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0,
    }  # fmt: skip
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (mine & cells), f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        assert all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"]), panel["title"]


def test_the_provisioning_files_point_at_the_dashboard() -> None:
    provider = (PROVISIONING / "dashboards" / "dynamollm.yaml").read_text()
    path = re.search(r"^\s+path: (\S+)$", provider, re.MULTILINE)
    assert path is not None
    deploy_guide = (ROOT / "docs" / "deploy.md").read_text()
    assert path.group(1) in deploy_guide  # the guide says where to copy the dashboard
    datasource = (PROVISIONING / "datasources" / "dynamollm.yaml").read_text()
    assert re.search(r"^\s+type: prometheus$", datasource, re.MULTILINE)
