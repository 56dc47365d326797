"""deploy/grafana/llmk-dashboard.json: a Grafana dashboard (its datasource a variable) with a panel for
each serving signal. That its expressions name exported metrics is in test_metric_names.py, that they run
on a real Prometheus in test_monitoring_e2e.py."""

from __future__ import annotations

import re

from tests.deploy.monitoring import dashboard

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_is_an_importable_grafana_dashboard():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    assert board.get("id") is None  # Grafana assigns the id on import
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE and variables[name]["includeAll"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat"} and panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        refs = [target["refId"] for target in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"], panel["title"]
            # every query follows the job and instance variables, and ranges follow Grafana's step
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
            ranges = re.findall(r"\[([^\]]+)\]", target["expr"])
            assert all(value == "$__rate_interval" for value in ranges), target["expr"]


def test_dashboard_has_a_panel_for_each_serving_signal():
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in dashboard()["panels"]}

    def panel_with(*parts: str) -> str:
        found = [title for title, expr in exprs.items() if all(part in expr for part in parts)]
        assert found, f"no panel queries {parts}"
        return found[0]

    for quantile in ("0.5", "0.95", "0.99"):
        panel_with(f"histogram_quantile({quantile}", "llmk:e2e_request_latency_seconds_bucket")
        panel_with(f"histogram_quantile({quantile}", "llmk:time_to_first_token_seconds_bucket")
    panel_with("rate(llmk:generation_tokens_total")
    panel_with("rate(llmk:prompt_tokens_total")
    panel_with("llmk:num_requests_waiting", "llmk:num_requests_running")
    panel_with("sum by (code)", "llmk:request_errors_total")
    panel_with("rate(llmk:rate_limited_total")
    panel_with("sum by (code)", "llmk:connections_refused_total")
    panel_with("up{")
