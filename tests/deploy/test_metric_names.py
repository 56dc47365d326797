"""Every metric name in every PromQL expression of the alert rules and the dashboard is one a real
`llmk serve` app exports: the names come from the /metrics body of an app on a tiny Llama after a
completion, a 404 and a rate-limited request, so a renamed metric fails here and not in production."""

from __future__ import annotations

import pytest

from llmkernel.serve.security import create_key
from tests.deploy.monitoring import (
    SYNTHETIC,
    alert_rules,
    dashboard_expressions,
    exported_names,
    metric_names,
)
from tests.serve.conftest import running_client, serve_config
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    folder = tmp_path_factory.mktemp("metric-names")
    model = make_tiny_llama(folder / "tiny-llama")
    key, _ = create_key(folder / "keys.json", "client")
    headers = {"Authorization": f"Bearer {key}"}
    config = serve_config(model, api_keys=str(folder / "keys.json"), requests_per_minute=1)
    with running_client(model, headers=headers, config=config) as client:
        completion = {"prompt": "hello", "max_tokens": 4}
        assert client.post("/v1/completions", json=completion, headers=headers).status_code == 200
        assert client.get("/v1/models", headers=headers).status_code == 429
        assert client.get("/no-such-route", headers=headers).status_code == 404
        body = client.get("/metrics", headers=headers).text
    possible, sampled = exported_names(body)
    # the ones the expressions use are really there, not only derived from a type line
    assert {
        "llmk:e2e_request_latency_seconds_bucket",
        "llmk:time_to_first_token_seconds_bucket",
        "llmk:generation_tokens_total",
        "llmk:rate_limited_total",
        "llmk:request_errors_total",
        "llmk:num_requests_waiting",
    } <= sampled
    return possible | SYNTHETIC


def test_metric_names_are_read_from_promql():
    expr = 'sum by (le) (rate(llmk:a_bucket{code=~"5..", job=~"$job"}[$__rate_interval] offset 5m)) / up'
    assert metric_names(expr) == {"llmk:a_bucket", "up"}
    assert metric_names("deriv(x[10m]) * 60 > 1e3 and on (instance) y > bool 8") == {"x", "y"}
    assert metric_names('sum(rate(z_total[5m])) by (code) > 0.1 unless absent(w{a="b"})') == {"z_total", "w"}


def test_every_alert_expression_names_an_exported_metric(exported):
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']}"
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} are not exported"


def test_every_dashboard_expression_names_an_exported_metric(exported):
    for expr in dashboard_expressions():
        names = metric_names(expr)
        assert names, f"no metric found in {expr}"
        assert names <= exported, f"{sorted(names - exported)} are not exported (in {expr})"
