"""`llmk deploy k8s MODEL --out DIR`: Kubernetes manifests that run `llmk serve`, one object per file.

What DIR holds (applied with `kubectl apply -k DIR`; kustomization.yaml lists the objects):

* deployment.yaml: `llmk serve` on 0.0.0.0, rolled out with no pod unavailable (maxUnavailable 0, one
  surge pod). Probes: startup and readiness on `/ready` (503 until the model is loaded and warmed up, and
  while draining), liveness on `/health`. With API keys `/ready` answers 401 without a key and an HTTP
  probe cannot read one from a Secret, so those two probes run a short Python exec that sends the probe
  key; `/health` is open. SIGTERM drains (serve/server.py); a preStop pause lets the endpoints drop the
  pod before it refuses new requests, and the grace period covers the pause and both drain waits.
* service.yaml (ClusterIP), pdb.yaml (at most one pod evicted at a time), secret.yaml (the keys file as
  it is, hashes only, and the probe key; written 0600), mounted as a folder, not a subPath, so an edited
  Secret reaches the pods and the server re-reads it (security.py) without a restart.
* hpa.yaml and prometheus-adapter-values.yaml (--autoscaler hpa), or keda-scaledobject.yaml (--autoscaler
  keda): autoscaling on the queue and CPU (serve/kubernetes_scaling.py).

Nothing here talks to a cluster: tests/deploy/test_kubernetes.py checks every object against the API
schemas (kubernetes-validate, strict) and the ScaledObject against KEDA's CRD schema.
"""

from __future__ import annotations

import argparse
import base64
import math
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from llmkernel import __version__
from llmkernel.config import add_config_arguments, config_from_args, to_dict
from llmkernel.errors import ConfigError, InputError
from llmkernel.runs import Manifest, atomic_write_text, describe_inputs, fingerprint, staging_folder
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.deploy_config import OBJECT_NAME_CHARS, DeployConfig, image_tag
from llmkernel.serve.kubernetes_scaling import CUSTOM_METRIC, adapter_values, autoscaler, scaled_object
from llmkernel.serve.security import KeyStore

CONTAINER = "llmk"
USER_ID = 10001  # the user of deploy/kubernetes/Dockerfile
MODELS_DIR = "/models"
KEYS_DIR = "/etc/llmk/keys"
KEYS_FILE = "keys.json"
PROBE_KEY = "probe-key"
PROBE_KEY_ENV = "LLMK_PROBE_KEY"
# Endpoints drop a terminating pod a moment after it gets SIGTERM; meanwhile a draining server would
# answer new requests 503. The pause before SIGTERM lets them go elsewhere.
PRESTOP_SLEEP_S = 5
# serve/server.py waits up to --drain_timeout_s for HTTP requests, then app.shutdown_model gives the
# engine up to --drain_timeout_s again; the rest is uvicorn's own 2 s and slack.
GRACE_SLACK_S = 10
# flag -> why `--serve_args` may not set it (the manifests own it, or it names a file of this machine)
OWNED_FLAGS = {
    "model": "the model is the pod's --model_pvc or image",
    "host": "the pod listens on 0.0.0.0",
    "port": "use --port",
    "served_model_name": "use --served_model_name",
    "api_keys": "use --api_keys (the keys go into the Secret)",
    "public_metrics": "use --public_metrics",
    "allowed_hosts": "the pod answers any Host name (see the README: probes and Prometheus use the pod IP)",
    "drain_timeout_s": "use --drain_timeout_s (the grace period follows it)",
    "backend": "each pod is one uvicorn server; the autoscaler adds pods (not Ray Serve replicas)",
    "config": "a file on this machine is not in the pod",
    "alerts": "a rules file on this machine is not in the pod",
}


# ----------------------------------------------------------------------------------- inputs


def model_name(model: Path) -> str:
    """The name the server gives a model when none is given: its folder or file name, without .gguf."""
    return model.name.removesuffix(".gguf") or "model"


def object_name(config: DeployConfig, model: Path) -> str:
    """--name, or llmk-<the model's name> made a DNS label (lower case, '-' for anything else)."""
    if config.name:
        return config.name
    name = "llmk-" + re.sub(r"[^a-z0-9]+", "-", model_name(model).lower()).strip("-")
    return name[:OBJECT_NAME_CHARS].rstrip("-")


def check_model(model: Path) -> None:
    """The model must exist here (an HF folder or a .gguf file); it is not copied, only named."""
    if model.is_file() and model.suffix == ".gguf":
        return
    if model.is_dir() and (model / "config.json").is_file():
        return
    if model.is_dir():
        raise InputError(
            f"{model} is not a model folder (no config.json); pass an HF model folder or a .gguf file"
        )
    raise InputError(f"model folder not found: {model}; pass the folder (or .gguf file) the pod will serve")


def read_keys(config: DeployConfig) -> tuple[bytes, str] | None:
    """The keys file as it is and the probe key, checked: a valid keys file that holds the probe key."""
    if not config.api_keys:
        return None
    keys_file, probe_file = Path(config.api_keys), Path(config.probe_key_file)
    store = KeyStore.load(keys_file)  # InputError for a missing, malformed or empty file
    try:
        probe_key = probe_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the probe key file {probe_file}: {error}") from None
    if store.verify(probe_key) is None:
        raise InputError(
            f"{probe_file}: not a key of {keys_file}, so the probes would never see the pod ready; make "
            f"one with: llmk keys create --keys-file {keys_file} --name probe > {probe_file}"
        )
    return keys_file.read_bytes(), probe_key


class _ServeArgs(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"serve_args: {message}")


def serve_arguments(config: DeployConfig, model_path: str, name: str) -> tuple[list[str], ServeConfig]:
    """The `llmk serve` arguments of the container, and the ServeConfig they make (checked here, as
    `llmk serve` will check them in the pod)."""
    try:
        extra = shlex.split(config.serve_args)
    except ValueError as error:  # an unclosed quote
        raise ConfigError(f"serve_args: {error} in {config.serve_args!r}") from None
    for argument in extra:
        flag = argument.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if argument.startswith("--") and flag in OWNED_FLAGS:
            raise ConfigError(f"serve_args: --{flag} is not yours to set here: {OWNED_FLAGS[flag]}")
    argv = [model_path, "--host", "0.0.0.0", "--port", str(config.port), "--served_model_name", name]
    # Any Host name: kubelet probes and Prometheus reach a pod by its IP, which no list can hold ahead;
    # the Host guard (serve/gate.py) is for a server on a loopback address, and a pod is not one.
    argv += ["--allowed_hosts", "*", "--drain_timeout_s", f"{config.drain_timeout_s:g}"]
    if config.api_keys:
        argv += ["--api_keys", f"{KEYS_DIR}/{KEYS_FILE}"]
    if config.public_metrics:
        argv += ["--public_metrics"]
    argv += extra
    parser = _ServeArgs(add_help=False)
    add_config_arguments(parser, ServeConfig)
    serve = config_from_args(ServeConfig, parser.parse_args(argv))
    if serve.max_waiting and config.target_waiting_per_pod >= serve.max_waiting:
        raise ConfigError(
            f"target_waiting_per_pod: {config.target_waiting_per_pod:g} is not below llmk serve's "
            f"--max_waiting {serve.max_waiting} (more are refused with 429, so the queue never reaches it)"
        )
    return argv, serve


# ---------------------------------------------------------------------------------- objects


def _metadata(config: DeployConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": config.namespace, "labels": labels}


def _probes(config: DeployConfig) -> dict[str, Any]:
    """startupProbe, readinessProbe and livenessProbe of the container (module docstring)."""
    if config.api_keys:
        script = (
            "import os, urllib.request as r; "
            f"r.urlopen(r.Request('http://127.0.0.1:{config.port}/ready', headers={{'Authorization': "
            f"'Bearer ' + os.environ['{PROBE_KEY_ENV}'].strip()}}), timeout=4)"
        )  # urlopen raises on 401 and 503: a non-zero exit
        ready: dict[str, Any] = {"exec": {"command": ["python", "-c", script]}}
    else:
        ready = {"httpGet": {"path": "/ready", "port": "http"}}
    period = 5
    return {
        "startupProbe": {
            **ready,
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(config.startup_timeout_s / period),
        },
        "readinessProbe": {**ready, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
    }


def deployment(config: DeployConfig, name: str, labels: dict[str, str], argv: list[str]) -> dict[str, Any]:
    selector = pod_selector(labels)
    resources: dict[str, Any] = {
        "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
        "limits": {"memory": config.memory_limit or config.memory_request},
    }
    if config.cpu_limit:
        resources["limits"]["cpu"] = config.cpu_limit
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only; /tmp is an emptyDir
        {"name": "LLMK_CACHE", "value": "/tmp/llmk-cache"},  # a .gguf model is converted there once
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        # torch's default thread pool (encoders, loading) sized to the CPU request, rounded up, rather
        # than to every core of the node
        {
            "name": "OMP_NUM_THREADS",
            "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}},
        },
    ]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if config.api_keys:
        env.append(
            {
                "name": PROBE_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": f"{name}-keys", "key": PROBE_KEY}},
            }
        )
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "keys",
                # 0440 and the pod's fsGroup: readable by the server's user; the server refuses a keys
                # file that group or others may write
                "secret": {
                    "secretName": f"{name}-keys",
                    "items": [{"key": KEYS_FILE, "path": KEYS_FILE}],
                    "defaultMode": 0o440,
                },
            }
        )
    if config.model_source == "volume":
        mounts.append({"name": "model", "mountPath": MODELS_DIR, "readOnly": True})
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": config.model_pvc, "readOnly": True}}
        )
    container = {
        "name": CONTAINER,
        "image": config.image,
        "imagePullPolicy": "Always" if image_tag(config.image) == "latest" else "IfNotPresent",
        "command": ["llmk", "serve"],
        "args": argv,
        "ports": [{"name": "http", "containerPort": config.port, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        **_probes(config),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    annotations = {}
    if config.public_metrics:  # read by the prometheus-community chart's kubernetes-pods scrape job
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(config.port),
            "prometheus.io/path": "/metrics",
        }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})},
            "spec": {
                "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
                "terminationGracePeriodSeconds": grace_period_s(config),
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": USER_ID,
                    "runAsGroup": USER_ID,
                    "fsGroup": USER_ID,
                    "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a large model claim
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "topologySpreadConstraints": [
                    {
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": selector},
                    }
                ],
                "containers": [container],
                "volumes": volumes,
            },
        },
    }
    if config.autoscaler == "none":
        spec = {"replicas": config.min_replicas, **spec}
    # else no replicas: the autoscaler owns the count, and `kubectl apply` would reset it to the file's
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(config, name, labels),
        "spec": spec,
    }


def grace_period_s(config: DeployConfig) -> int:
    return math.ceil(PRESTOP_SLEEP_S + 2 * config.drain_timeout_s + GRACE_SLACK_S)


def pod_selector(labels: dict[str, str]) -> dict[str, str]:
    """The labels that pick this release's pods (the Service's selector, the PDB's matchLabels)."""
    return {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def service(config: DeployConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    selector = pod_selector(labels)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, name, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": config.service_port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(config: DeployConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    selector = pod_selector(labels)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(config, name, labels),
        # One at a time, not minAvailable: with one replica a minAvailable of 1 would block every drain
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",  # a pod that never got ready does not block drains
        },
    }


def secret(
    config: DeployConfig, name: str, labels: dict[str, str], keys: tuple[bytes, str]
) -> dict[str, Any]:
    keys_bytes, probe_key = keys
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(config, f"{name}-keys", labels),
        "type": "Opaque",
        "data": {
            KEYS_FILE: base64.b64encode(keys_bytes).decode("ascii"),
            PROBE_KEY: base64.b64encode(probe_key.encode("utf-8")).decode("ascii"),
        },
    }


# ------------------------------------------------------------------------------------ stage


def render(config: DeployConfig, keys: tuple[bytes, str] | None) -> dict[str, dict[str, Any]]:
    """File name -> object (or Helm values, for prometheus-adapter-values.yaml), in apply order."""
    model = Path(config.model).expanduser()
    name = object_name(config, model)
    served = config.served_model_name or model_name(model)
    model_path = f"{MODELS_DIR}/{config.model_subpath or model.name}"
    argv, _ = serve_arguments(config, model_path, served)
    labels = {
        "app.kubernetes.io/name": "llmk",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": "llmk-deploy",
    }
    files = {
        "deployment.yaml": deployment(config, name, labels, argv),
        "service.yaml": service(config, name, labels),
    }
    files["pdb.yaml"] = disruption_budget(config, name, labels)
    if keys is not None:
        files["secret.yaml"] = secret(config, name, labels, keys)
    if config.autoscaler == "hpa":
        files["hpa.yaml"] = autoscaler(config, name, _metadata(config, name, labels))
        files["prometheus-adapter-values.yaml"] = adapter_values(config)
    elif config.autoscaler == "keda":
        files["keda-scaledobject.yaml"] = scaled_object(config, name, _metadata(config, name, labels))
    return files


class _Dumper(yaml.SafeDumper):
    """YAML without anchors and aliases: the objects share their label dicts, readers should not see it."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=110)


def kustomization(files: list[str]) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": files}


def deploy(config: DeployConfig) -> dict[str, Any]:
    """`llmk deploy k8s`: the stage entry of stages.py. Returns what run.json records as metrics."""
    manifest_config = to_dict(config)
    model = Path(config.model).expanduser()
    check_model(model)
    keys = read_keys(config)
    files = render(config, keys)
    objects = [f for f, obj in files.items() if "kind" in obj]
    header = f"# rendered by `llmk deploy k8s` (llmkernel {__version__}); render again rather than edit\n"
    inputs = describe_inputs([Path(p) for p in (config.api_keys, config.probe_key_file) if p])
    run = Manifest("deploy", manifest_config, inputs, fingerprint(manifest_config, inputs, ("out",)))
    out = Path(config.out)
    with staging_folder(out) as folder:
        for filename, obj in files.items():
            text = header + to_yaml(obj)
            atomic_write_text(folder / filename, text, mode=0o600 if filename == "secret.yaml" else None)
        atomic_write_text(folder / "kustomization.yaml", header + to_yaml(kustomization(objects)))
        run.metrics = {
            "objects": [files[f]["kind"] for f in objects],
            "files": sorted([*files, "kustomization.yaml"]),
        }
        run.write(folder)
    print(f"wrote {', '.join(run.metrics['objects'])} to {out}; apply with: kubectl apply -k {out}")
    if config.autoscaler == "hpa":
        print(
            f"the HPA reads {CUSTOM_METRIC} from prometheus-adapter: helm install prometheus-adapter "
            f"prometheus-community/prometheus-adapter -f {out / 'prometheus-adapter-values.yaml'}"
        )
    if keys is None:
        print("no --api_keys: anyone who can reach the Service can use the model")
    return run.metrics
