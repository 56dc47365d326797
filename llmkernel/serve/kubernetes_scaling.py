"""Autoscaling of `llmk deploy k8s` on the server's queue: a HorizontalPodAutoscaler through
prometheus-adapter (with the adapter's rule, as Helm values) or the equivalent KEDA ScaledObject.

Both scale on `llmk:num_requests_waiting` (serve/metrics.py: requests queued for the model, not yet
running) averaged over the pods, and on CPU as a fallback: with several metrics the HPA takes the
largest proposal, and when the queue metric is missing it still scales up on CPU (it scales down only
when every metric is there). CPU comes from metrics-server, the queue from Prometheus, which must scrape
the pods with `namespace` and `pod` labels (the prometheus-community chart's kubernetes-pods job does,
from the pods' prometheus.io annotations). KEDA makes an HPA of its own: apply one of the two, never both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from llmkernel.serve.deploy_config import DeployConfig

METRIC = "llmk:num_requests_waiting"  # the gauge of serve/metrics.py, as Prometheus stores it
CUSTOM_METRIC = "llmk_num_requests_waiting"  # its name in the custom metrics API (the adapter's rule)


def _quantity_text(value: float) -> str:
    """A float as a Kubernetes quantity: 4.0 -> "4", 2.5 -> "2500m"."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


# The scale-down that both autoscalers use: the default 5-minute window, then one pod a minute, since
# each leaving pod drains its requests first. Scale-up keeps Kubernetes' default (fast).
SCALE_DOWN = {
    "stabilizationWindowSeconds": 300,
    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
}


def autoscaler(config: DeployConfig, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The HorizontalPodAutoscaler: the queue per pod through prometheus-adapter, and CPU."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": config.min_replicas,
            "maxReplicas": config.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": CUSTOM_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": _quantity_text(config.target_waiting_per_pod),
                        },
                    },
                },
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": config.target_cpu_utilization,
                        },
                    },
                },
            ],
            "behavior": {"scaleDown": SCALE_DOWN},
        },
    }


def adapter_values(config: DeployConfig) -> dict[str, Any]:
    """Helm values of the prometheus-community/prometheus-adapter chart with the rule the HPA needs
    (`rules.custom` is also the `rules:` list of the adapter's own config file)."""
    url = urlsplit(config.prometheus_url)
    return {
        "prometheus": {
            "url": f"{url.scheme}://{url.hostname}",
            "port": url.port or (443 if url.scheme == "https" else 80),
            "path": url.path.rstrip("/"),
        },
        "rules": {
            "default": False,
            "custom": [
                {
                    # the scrape job's namespace and pod labels tie each series to its pod
                    "seriesQuery": f'{METRIC}{{namespace!="",pod!=""}}',
                    "resources": {
                        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
                    },
                    "name": {"matches": f"^{METRIC}$", "as": CUSTOM_METRIC},
                    "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
                }
            ],
        },
    }


def scaled_object(config: DeployConfig, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The KEDA ScaledObject with the same two triggers (KEDA makes the HPA from it)."""
    # Pods of the Deployment are NAME-<ReplicaSet hash>-<suffix> (deploy_config.py keeps NAME short
    # enough that they are never truncated).
    query = f'sum({METRIC}{{namespace="{config.namespace}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}})'
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": config.min_replicas,
            "maxReplicaCount": config.max_replicas,
            "pollingInterval": 15,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": SCALE_DOWN}}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",  # KEDA divides the query's sum by the pods
                    "metadata": {
                        "serverAddress": config.prometheus_url,
                        "query": query,
                        "threshold": f"{config.target_waiting_per_pod:g}",
                    },
                },
                {
                    "type": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": str(config.target_cpu_utilization)},
                },
            ],
        },
    }
