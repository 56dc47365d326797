"""`llmk deploy k8s`: the manifests, rendered through the real CLI, checked offline.

No cluster can run here, so every core object is validated against the Kubernetes API schemas of
kubernetes-validate in strict mode (unknown fields fail), the KEDA ScaledObject against the CRD schema in
deploy/kubernetes/schemas/, and the semantics are tested one by one: the rollout keeps every pod, the
probes reach the container's port (and the exec probe passes the real server's key check), the grace
period covers the drain, the Secret holds the keys file byte for byte, the HPA asks for the metric the
adapter's rule names, and the container's arguments are ones `llmk serve` accepts.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from llmkernel.cli import build_parser
from llmkernel.config import config_from_args
from llmkernel.serve.app import create_app
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.deploy_config import DEFAULT_IMAGE
from llmkernel.serve.kubernetes import PRESTOP_SLEEP_S, PROBE_KEY_ENV
from llmkernel.serve.kubernetes_scaling import CUSTOM_METRIC, METRIC
from llmkernel.serve.security import KeyStore, create_key
from tests.conftest import REPO, run_llmk
from tests.serve.conftest import live_server
from tests.test_cli import _exit_code
from tests.tiny_models import make_tiny_bert

KUBERNETES_VERSION = "1.37"  # the newest schemas kubernetes-validate 1.37 ships
# and an older release still in use, where every field here is GA or beta and on by default
KUBERNETES_VERSIONS = ("1.30", KUBERNETES_VERSION)
KEDA_SCHEMA = REPO / "deploy" / "kubernetes" / "schemas" / "keda-scaledobject-v1alpha1.json"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny classifier folder, a keys file with a user's key and a probe key, and the probe key file."""
    folder = tmp_path_factory.mktemp("deploy")
    make_tiny_bert(folder / "classifier", "classify")
    create_key(folder / "keys.json", "alice")
    probe_key, _ = create_key(folder / "keys.json", "probe")
    (folder / "probe.key").write_text(probe_key + "\n")
    return folder


def _render(workspace: Path, out: str, *flags: str) -> Path:
    result = run_llmk("deploy", "k8s", str(workspace / "classifier"), "--out", str(workspace / out), *flags)
    assert result.returncode == 0, result.stderr
    return workspace / out


@pytest.fixture(scope="module")
def with_keys(workspace) -> Path:
    """API keys, the model from a claim, the HPA through prometheus-adapter."""
    keys = ("--api_keys", str(workspace / "keys.json"), "--probe_key_file", str(workspace / "probe.key"))
    return _render(workspace, "with-keys", "--model_pvc", "llm-models", "--namespace", "serving", *keys)


@pytest.fixture(scope="module")
def with_keda(workspace) -> Path:
    """No keys, the model in the image, KEDA, and more flags for llmk serve."""
    return _render(
        workspace,
        "with-keda",
        "--model_source",
        "image",
        "--image",
        "registry.example.com/llmk-classifier:1",
        "--autoscaler",
        "keda",
        "--target_waiting_per_pod",
        "2.5",
        "--drain_timeout_s",
        "60",
        "--serve_args",
        "--max_waiting 32 --requests_per_minute 600",
    )


@pytest.fixture(params=["with_keys", "with_keda"])
def rendered(request) -> Path:
    return request.getfixturevalue(request.param)


def _load(folder: Path, name: str) -> dict:
    return yaml.safe_load((folder / name).read_text())


def _objects(folder: Path) -> dict[str, dict]:
    """File name -> object, for every Kubernetes object file (not the kustomization, not Helm values)."""
    loaded = {path.name: yaml.safe_load(path.read_text()) for path in sorted(folder.glob("*.yaml"))}
    return {n: o for n, o in loaded.items() if "kind" in o and o["kind"] != "Kustomization"}


def _container(folder: Path) -> dict:
    (container,) = _load(folder, "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return container


# ----------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_passes_the_kubernetes_schemas_in_strict_mode(rendered, version):
    objects = _objects(rendered)
    core = {n: o for n, o in objects.items() if o["apiVersion"] != "keda.sh/v1alpha1"}
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= {o["kind"] for o in core.values()}
    for name, obj in core.items():
        assert kubernetes_validate.validate(obj, version, strict=True) == version, name


def test_strict_validation_refuses_a_field_that_only_looks_right(with_keys):
    deployment = _load(with_keys, "deployment.yaml")
    deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailabe"] = 0  # misspelt: ignored by a lax check
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_scaled_object_matches_kedas_crd_schema(with_keda):
    schema = json.loads(KEDA_SCHEMA.read_text())
    scaled = _load(with_keda, "keda-scaledobject.yaml")
    jsonschema.Draft202012Validator(schema).validate(scaled)
    scaled["spec"]["minReplicas"] = 2  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(scaled)


def test_the_kustomization_lists_every_object_file_and_nothing_else(rendered):
    kustomization = _load(rendered, "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert sorted(kustomization["resources"]) == sorted(_objects(rendered))
    assert kustomization["resources"][0] == "deployment.yaml"


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed here (no cluster either)"
)
def test_kubectl_kustomize_builds_every_object(rendered):
    built = subprocess.run(
        ["kubectl", "kustomize", str(rendered)], capture_output=True, text=True, check=True
    )
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc)
    assert kinds == sorted(o["kind"] for o in _objects(rendered).values())


# --------------------------------------------------------------------------------- semantics


def test_the_rollout_keeps_every_pod_and_the_probes_reach_the_container_port(rendered):
    deployment = _load(rendered, "deployment.yaml")
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    container = _container(rendered)
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for probe in ("startupProbe", "readinessProbe"):
        check = container[probe]
        if "httpGet" in check:  # no keys: /ready is open
            assert check["httpGet"] == {"path": "/ready", "port": "http"}
        else:
            assert "http://127.0.0.1:8000/ready" in check["exec"]["command"][-1]
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    service = _load(rendered, "service.yaml")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert (
        service["spec"]["selector"]
        == selector
        == _load(rendered, "pdb.yaml")["spec"]["selector"]["matchLabels"]
    )
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert _load(rendered, "pdb.yaml")["spec"]["maxUnavailable"] == 1


def test_the_grace_period_covers_the_pause_and_the_drain(with_keys, with_keda):
    for folder, drain_s in ((with_keys, 30), (with_keda, 60)):
        pod = _load(folder, "deployment.yaml")["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert args[args.index("--drain_timeout_s") + 1] == str(drain_s)
        assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
            "sleep",
            str(PRESTOP_SLEEP_S),
        ]
        # the HTTP drain and then the engine's may each take --drain_timeout_s (serve/server.py, app.py)
        assert pod["terminationGracePeriodSeconds"] > PRESTOP_SLEEP_S + 2 * drain_s


def test_the_secret_holds_the_keys_file_exactly_and_a_key_that_passes(workspace, with_keys, with_keda):
    secret = _load(with_keys, "secret.yaml")
    assert base64.b64decode(secret["data"]["keys.json"]) == (workspace / "keys.json").read_bytes()
    probe_key = base64.b64decode(secret["data"]["probe-key"]).decode()
    assert probe_key == (workspace / "probe.key").read_text().strip()  # no newline in the header
    assert KeyStore.load(workspace / "keys.json").verify(probe_key).name == "probe"
    assert stat.S_IMODE((with_keys / "secret.yaml").stat().st_mode) == 0o600
    pod = _load(with_keys, "deployment.yaml")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] & 0o022 == 0  # the server refuses a keys file others may write
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount  # a subPath mount never sees an edited Secret
    args = pod["containers"][0]["args"]
    assert (
        args[args.index("--api_keys") + 1] == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    )
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env[PROBE_KEY_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "probe-key",
    }
    assert not (with_keda / "secret.yaml").exists()  # no keys, no Secret


def test_the_hpa_asks_for_the_metric_the_adapter_rule_names(with_keys):
    hpa = _load(with_keys, "hpa.yaml")
    (rule,) = _load(with_keys, "prometheus-adapter-values.yaml")["rules"]["custom"]
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["pods"]["metric"]["name"] == rule["name"]["as"] == CUSTOM_METRIC
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert re.fullmatch(rule["name"]["matches"], METRIC) and rule["seriesQuery"].startswith(METRIC + "{")
    assert f'"{METRIC}"' in (REPO / "llmkernel" / "serve" / "metrics.py").read_text()  # the server's gauge
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llmk-classifier",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in _load(with_keys, "deployment.yaml")["spec"]  # the HPA owns the count
    assert not (with_keys / "keda-scaledobject.yaml").exists()  # one autoscaler per Deployment


def test_keda_scales_on_the_same_queue_and_cpu(with_keda):
    scaled = _load(with_keda, "keda-scaledobject.yaml")
    queue, cpu = scaled["spec"]["triggers"]
    assert queue["type"] == "prometheus" and queue["metricType"] == "AverageValue"
    assert queue["metadata"]["query"].startswith(f'sum({METRIC}{{namespace="default",pod=~"llmk-classifier-')
    assert queue["metadata"]["threshold"] == "2.5"
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "80"}}
    assert scaled["spec"]["scaleTargetRef"]["name"] == _load(with_keda, "deployment.yaml")["metadata"]["name"]
    assert not (with_keda / "hpa.yaml").exists()


def test_the_container_runs_a_command_llmk_serve_accepts(with_keys, with_keda):
    for folder in (with_keys, with_keda):
        container = _container(folder)
        assert container["command"] == ["llmk", "serve"]
        parsed = build_parser().parse_args(["serve", *container["args"]])
        serve = config_from_args(ServeConfig, parsed, "serve")
        assert (serve.host, serve.port, serve.host_names, serve.public_metrics) == (
            "0.0.0.0",
            8000,
            None,
            True,
        )
        assert serve.model == "/models/classifier" and serve.served_model_name == "classifier"
    assert serve.max_waiting == 32 and serve.requests_per_minute == 600  # --serve_args of with_keda
    assert "persistentVolumeClaim" not in str(_load(with_keda, "deployment.yaml"))
    (claim,) = [
        v
        for v in _load(with_keys, "deployment.yaml")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "model"
    ]
    assert claim["persistentVolumeClaim"] == {"claimName": "llm-models", "readOnly": True}


def test_images_have_a_tag_and_latest_is_pulled_only_when_asked(workspace, with_keys, with_keda):
    assert _container(with_keys)["image"] == DEFAULT_IMAGE and not DEFAULT_IMAGE.endswith(":latest")
    assert _container(with_keda)["imagePullPolicy"] == "IfNotPresent"
    latest = _render(
        workspace, "latest", "--model_source", "image", "--image", "llmk:latest", "--autoscaler", "none"
    )
    assert _container(latest)["imagePullPolicy"] == "Always"
    assert _load(latest, "deployment.yaml")["spec"]["replicas"] == 2  # no autoscaler: a fixed count


def test_the_probes_pass_against_the_real_server_only_with_the_key(workspace, with_keys):
    """The container's arguments run the real app; the exec probe passes with the Secret's key, fails
    without it, and /health needs none (what the liveness probe relies on)."""
    container = _container(with_keys)
    serve = config_from_args(ServeConfig, build_parser().parse_args(["serve", *container["args"]]), "serve")
    serve = dataclasses.replace(
        serve, model=str(workspace / "classifier"), api_keys=str(workspace / "keys.json")
    )
    app = create_app(serve)
    script = container["readinessProbe"]["exec"]["command"]
    probe_key = (workspace / "probe.key").read_text()
    with live_server(app) as url:
        command = [sys.executable, *script[1:]]
        command[-1] = command[-1].replace("http://127.0.0.1:8000", url)
        env = {**os.environ, PROBE_KEY_ENV: probe_key}
        for _ in range(300):  # the startup probe's job: wait for the model
            if subprocess.run(command, env=env, capture_output=True).returncode == 0:
                break
        else:
            pytest.fail("the readiness probe never passed")
        wrong = subprocess.run(
            command, env={**env, PROBE_KEY_ENV: "llmk-wrong"}, capture_output=True, text=True
        )
        assert wrong.returncode != 0 and "401" in wrong.stderr
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 401  # why an HTTP probe cannot be used with keys


def test_run_json_records_the_render(with_keys):
    record = json.loads((with_keys / "run.json").read_text())
    assert record["stage"] == "deploy" and record["config"]["namespace"] == "serving"
    assert record["metrics"]["objects"] == [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Secret",
        "HorizontalPodAutoscaler",
    ]
    assert {o["path"] for o in record["outputs"]} == {p.name for p in with_keys.iterdir()} - {"run.json"}
    assert all(obj["metadata"]["namespace"] == "serving" for obj in _objects(with_keys).values())


# ------------------------------------------------------------------------------- user errors


def _fails(argv: list[str], capsys) -> str:
    """Run `llmk` in process; it must exit 2 with one line on stderr, which is returned."""
    code, error = _exit_code(argv, capsys)
    error = error.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    return error


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model_pvc", "m"], "model folder not found"),  # run with the model "missing"
        (
            ["--model_pvc", "m", "--api_keys", "missing.json", "--probe_key_file", "probe.key"],
            "keys file not found",
        ),
        (["--model_pvc", "m", "--api_keys", "keys.json", "--probe_key_file", "other.key"], "not a key of"),
        (["--model_pvc", "m", "--api_keys", "keys.json"], "probe_key_file: required with --api_keys"),
        (["--model_source", "image", "--serve_args", "--host 127.0.0.1"], "--host is not yours to set"),
        (["--model_source", "image", "--serve_args", "--no_such_flag 1"], "serve_args: unrecognized"),
        (["--model_source", "image", "--target_waiting_per_pod", "64"], "below llmk serve's --max_waiting"),
        ([], "model_pvc: required with --model_source volume"),
        (["--model_source", "image", "--image", "llmk"], "image: name a tag or a digest"),
        (["--model_source", "image", "--memory_limit", "1Gi"], "memory_limit: must be >= --memory_request"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(workspace, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(workspace)
    (workspace / "other.key").write_text("llmk-" + "0" * 43)
    model = "missing" if message == "model folder not found" else "classifier"
    error = _fails(["deploy", "k8s", model, "--out", "failed", *flags], capsys)
    assert error.startswith("llmk deploy: error: ") and message in error
    assert not (workspace / "failed").exists()
