"""deploy/prometheus/: the alert rules pass `promtool check rules` and their `promtool test rules` unit tests,
every alert is unit-tested firing and quiet, and the example Prometheus and Alertmanager configs pass
promtool and amtool. Debian's prometheus and prometheus-alertmanager packages provide the programs; each
test skips with the reason when its program is absent."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.deploy.monitoring import PROMETHEUS_DIR, RULE_FILES, RULE_TESTS, alert_rules, program


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def test_promtool_check_rules_accepts_the_alert_rules():
    promtool = program("promtool")
    checked = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    found = [int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", checked.stdout)]
    assert sum(found) == len(alert_rules()) >= 9


def test_promtool_unit_tests_of_the_alerts_pass():
    promtool = program("promtool")
    tested = run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert sorted(tests["rule_files"]) == sorted(f"../{path.name}" for path in RULE_FILES)
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        own = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in own), f"{rule['alert']}: no test where it fires"
        assert any(not case["exp_alerts"] for case in own), f"{rule['alert']}: no test where it stays quiet"


def test_every_alert_waits_has_a_severity_and_says_what_is_wrong():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["for"] != "0s", rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    assert {"LlmkServerDown", "LlmkHighServerErrorRate", "LlmkHighRequestLatencyP99"} <= set(names)


def test_example_prometheus_config_passes_promtool(tmp_path):
    promtool = program("promtool")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "llmk-serve"  # llmk-availability.yml selects it
    assert job["authorization"]["type"] == "Bearer"  # /metrics needs a key unless --public_metrics
    # promtool checks that the key file exists: point it at one here, next to copies of the rule files
    key = tmp_path / "llmk-serve.key"
    key.write_text("llmk-not-a-real-key\n")
    job["authorization"]["credentials_file"] = str(key)
    for path in RULE_FILES:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sorted(config["rule_files"]) == sorted(path.name for path in RULE_FILES)


def test_example_alertmanager_config_passes_amtool():
    amtool = program("amtool")
    checked = run(amtool, "check-config", str(PROMETHEUS_DIR / "alertmanager.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
