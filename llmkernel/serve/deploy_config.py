"""The `llmk deploy` config: the schema of `llmk deploy k8s MODEL --out DIR` (serve/kubernetes.py renders it).

Only values are checked here (names, quantities, replica counts, which flags go together); the model
folder and the keys files are read when the manifests are rendered, so a recipe or the README can name
them before they exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmkernel import __version__
from llmkernel.config import check, option

DEPLOY_TARGETS = ("k8s",)
MODEL_SOURCES = ("volume", "image")
AUTOSCALERS = ("hpa", "keda", "none")
# The image the Dockerfile in deploy/kubernetes/ builds, tagged with this package's version (a tag must
# not hold the '+' of a source tree's version).
DEFAULT_IMAGE = "llmkernel:" + re.sub(r"[^\w.-]", "-", __version__)
# A DNS-1035 label (what a Service name must be), at most 47 characters: the pods of a Deployment are
# named NAME-<up to 10 characters of ReplicaSet hash>-<5 characters>, which then stays within 63.
OBJECT_NAME_CHARS = 47
_NAME = re.compile(rf"[a-z]([-a-z0-9]{{0,{OBJECT_NAME_CHARS - 2}}}[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label
# A Kubernetes quantity as written in resources (2, 500m, 1.5, 4Gi, 512Mi, 1e9); the factors below
# turn it into one number so that a limit can be compared with its request.
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?")
_FACTORS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_FACTORS |= {f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")}


def quantity(text: str) -> float | None:
    """The value of a Kubernetes quantity ("500m" -> 0.5, "4Gi" -> 4294967296), None if it is not one."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        return None
    number, suffix = float(match.group(1)), match.group(2) or ""
    return number * (10 ** int(suffix[1:]) if suffix.startswith("e") else _FACTORS[suffix])


def image_tag(image: str) -> str | None:
    """The tag of an image reference ("repo/name:1.2" -> "1.2"), "" for a digest (@sha256:...), None
    for a reference with neither (which Kubernetes would pull as :latest)."""
    if "@" in image:
        return ""
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


@dataclass
class DeployConfig:
    """`llmk deploy k8s MODEL --out DIR`: Kubernetes manifests for `llmk serve`: Deployment, Service,
    PodDisruptionBudget, Secret, autoscaling on the queue (HPA through prometheus-adapter, or KEDA)."""

    target: str = option(
        help="what to render: k8s (Kubernetes manifests, applied with kubectl apply -k DIR)",
        positional=True,
        choices=DEPLOY_TARGETS,
    )
    model: str = option(
        "",
        "the model folder (or .gguf file) to serve, as it is on this machine: read for its name only; "
        "the pod finds it in --model_pvc or in the image",
        positional=True,
    )
    out: str = option("runs/deploy", "folder for the manifests, kustomization.yaml and run.json")
    name: str = option("", "name of every object (a DNS label, at most 47 characters); default: llmk-MODEL")
    namespace: str = option("default", "namespace of every object")
    image: str = option(
        DEFAULT_IMAGE,
        "container image with llmk installed (deploy/kubernetes/Dockerfile), with a tag or a digest; "
        "':latest' is pulled on every start",
    )
    model_source: str = option(
        "volume",
        "where the pod finds the model: volume (a PersistentVolumeClaim, --model_pvc) or image (baked "
        "in with deploy/kubernetes/Dockerfile.model, under /models)",
        choices=MODEL_SOURCES,
    )
    model_pvc: str = option("", "PersistentVolumeClaim holding the model folder (--model_source volume)")
    model_subpath: str = option(
        "", "the model's path inside the claim (or under /models in the image); default: its name"
    )
    served_model_name: str | None = option(None, "model id in /v1/models and responses; default: its name")
    port: int = option(8000, "container port of llmk serve")
    service_port: int = option(80, "port of the Service")
    api_keys: str | None = option(
        None, "keys file from `llmk keys create`; goes into the Secret as it is (hashes only)"
    )
    probe_key_file: str | None = option(
        None,
        "a file holding one key of --api_keys (`llmk keys create --keys-file keys.json --name probe > "
        "probe.key`): /ready needs a key, so the startup and readiness probes send this one",
    )
    public_metrics: bool = option(
        True,
        "serve /metrics without a key, so Prometheus can scrape the pods (the scrape annotations cannot "
        "carry a key); false: no scrape annotations, configure the scrape job with a key yourself",
    )
    min_replicas: int = option(2, "fewest pods (the autoscaler's minimum; with --autoscaler none, the count)")
    max_replicas: int = option(8, "most pods the autoscaler may run")
    autoscaler: str = option(
        "hpa",
        "hpa (a HorizontalPodAutoscaler on the queue through prometheus-adapter, CPU as a fallback), keda "
        "(a KEDA ScaledObject with the same two triggers) or none",
        choices=AUTOSCALERS,
    )
    target_waiting_per_pod: float = option(
        4.0, "requests queued for the model (llmk:num_requests_waiting) per pod that the autoscaler aims at"
    )
    target_cpu_utilization: int = option(
        80, "CPU use, in percent of the request, that the autoscaler aims at"
    )
    prometheus_url: str = option(
        "http://prometheus-server.monitoring.svc:80",
        "Prometheus as prometheus-adapter and KEDA query it (the prometheus-community chart's server)",
    )
    cpu_request: str = option("2", "CPU request of the pod (also its torch threads and the HPA's 100%)")
    cpu_limit: str = option("", "CPU limit ('': none, so a busy pod can use idle cores of its node)")
    memory_request: str = option("4Gi", "memory request of the pod")
    memory_limit: str = option("", "memory limit ('': the request)")
    drain_timeout_s: float = option(
        30.0, "llmk serve --drain_timeout_s: how long in-flight requests may take on SIGTERM"
    )
    startup_timeout_s: int = option(600, "how long the model may take to load before the pod is restarted")
    serve_args: str = option(
        "", "more `llmk serve` flags, as one string: --serve_args '--quantize int8 --max_waiting 32'"
    )

    def __post_init__(self) -> None:
        check(self.target in DEPLOY_TARGETS, "target", f"must be one of {', '.join(DEPLOY_TARGETS)}")
        check(bool(self.model), "model", "required: `llmk deploy k8s MODEL --out DIR`")
        check(
            not self.name or _NAME.fullmatch(self.name) is not None,
            "name",
            "must be a DNS label of at most 47 characters: lower-case letters, digits and '-', starting "
            f"with a letter, got {self.name!r}",
        )
        check(
            _NAMESPACE.fullmatch(self.namespace) is not None,
            "namespace",
            f"must be a DNS label (lower-case letters, digits and '-'), got {self.namespace!r}",
        )
        tag = image_tag(self.image)
        check(
            bool(self.image) and tag is not None,
            "image",
            f"name a tag or a digest (e.g. {DEFAULT_IMAGE}), got {self.image!r}; without one Kubernetes "
            "pulls ':latest', a different image on every node (write ':latest' if you mean it)",
        )
        check(
            self.model_source != "volume" or bool(self.model_pvc),
            "model_pvc",
            "required with --model_source volume: the PersistentVolumeClaim holding the model folder "
            "(or bake the model into the image: --model_source image)",
        )
        check(
            self.model_source != "image" or not self.model_pvc,
            "model_pvc",
            "only with --model_source volume (the model is in the image)",
        )
        check(
            not self.model_subpath.startswith("/") and ".." not in self.model_subpath.split("/"),
            "model_subpath",
            "a relative path inside the claim, without '..'",
        )
        for field, value in (("port", self.port), ("service_port", self.service_port)):
            check(1 <= value <= 65535, field, "must be between 1 and 65535")
        check(
            bool(self.api_keys) or not self.probe_key_file,
            "probe_key_file",
            "only with --api_keys (without keys the probes need none)",
        )
        check(
            not self.api_keys or bool(self.probe_key_file),
            "probe_key_file",
            "required with --api_keys: /ready answers 401 without a key, so the probes send one; make it "
            "with: llmk keys create --keys-file KEYS --name probe > probe.key",
        )
        check(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        check(self.max_replicas >= self.min_replicas, "max_replicas", "must be >= --min_replicas")
        check(self.target_waiting_per_pod > 0, "target_waiting_per_pod", "must be > 0")
        check(self.target_cpu_utilization >= 1, "target_cpu_utilization", "must be >= 1 (percent)")
        check(
            self.prometheus_url.startswith(("http://", "https://")),
            "prometheus_url",
            "an http:// or https:// URL",
        )
        for field, value, required in (
            ("cpu_request", self.cpu_request, True),
            ("cpu_limit", self.cpu_limit, False),
            ("memory_request", self.memory_request, True),
            ("memory_limit", self.memory_limit, False),
        ):
            number = quantity(value) if value or required else 1.0
            check(
                number is not None and number > 0,
                field,
                f"a Kubernetes quantity (2, 500m, 4Gi), got {value!r}",
            )
        for limit, request in (("cpu_limit", "cpu_request"), ("memory_limit", "memory_request")):
            text = getattr(self, limit)
            check(
                not text or quantity(text) >= quantity(getattr(self, request)),
                limit,
                f"must be >= --{request}",
            )
        check(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        check(self.startup_timeout_s >= 10, "startup_timeout_s", "must be >= 10")
