"""The ``trainjob`` engine: each workload runs as a Kubeflow Trainer v2 TrainJob on a ClusterTrainingRuntime.

OpenShift AI 3.4 trains with Kubeflow Trainer v2: a TrainJob
(trainer.kubeflow.org/v1alpha1) names a ClusterTrainingRuntime (``torch-distributed``)
and overrides its trainer's image, command, nodes and resources per node. Any
trainer's workload runs this way: the node containers run
:mod:`aiplane.plugins.trainjob.task` in the target's image, the workload and where
its result goes travel in their environment (secrets only as ``secretKeyRef``), the
result comes back through ``results_dir`` as on the ``k8s-job`` engine.

Which client, and why. The TrainJob is built as a dict and passed through the
typed models of ``kubeflow-trainer-api`` (the Trainer's own OpenAPI models, which
the Kubeflow SDK uses too): a field the Trainer API does not know fails here,
before anything is sent. It is sent, watched and deleted with the ``kubernetes``
client's ``CustomObjectsApi``, and the pods' state and log read with its
``CoreV1Api``, not through the Kubeflow SDK's ``TrainerClient``: the SDK's trainers
set only plain environment values (no ``secretKeyRef``, so no credentials by
reference) and no command for a container trainer; it polls the TrainJob every
couple of seconds where a watch sees the change at once; it turns every API error
into a ``RuntimeError`` (a 403 to say which verb the Role lacks reads like a
blip); and it finds pods with a set-based selector and reads a control-plane
ConfigMap on connect. The clients come in through the constructor
(``api_client``), as on the ``k8s-job`` engine.

This process watches the TrainJob, follows the log of node 0 (the primary, rank
0; each line an event for ``on_event``), reports the nodes' phases and the
Kubernetes events about the TrainJob and its pods, and deletes the TrainJob
(its JobSet, Jobs and pods go with it) when the workload ends, fails, is
cancelled or this call is interrupted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from aiplane.core.config import Target
from aiplane.core.engines import EngineRun, PodEngine
from aiplane.core.errors import ConfigError, unknown_name
from aiplane.core.workload import Event, Workload

from .cluster import GROUP, VERSION, Apis, delete, wait
from .manifest import NAME_LIMITS, describe, trainjob_manifest
from .settings import TrainJobSettings

__all__ = ["TrainJobEngine"]


class TrainJobEngine(PodEngine[TrainJobSettings]):
    """Runs each workload as a TrainJob on the target's ClusterTrainingRuntime, in its namespace and image.

    ``api_client``: a ``kubernetes.client.ApiClient``; by default one is built from
    the settings (kubeconfig, in-cluster service account) when the first workload runs.
    """

    name = "trainjob"
    Settings = TrainJobSettings
    kind, kubectl = "TrainJob", "trainjob"
    name_limits, describe = NAME_LIMITS, staticmethod(describe)

    def build(self, workload: Workload, target: Target, name: str, result_uri: str) -> dict[str, Any]:
        return _typed(trainjob_manifest(workload, target, self.settings, name, result_uri))

    def create(self, manifest: dict[str, Any], run: EngineRun) -> Apis:
        s, apis = self.settings, Apis(self.api_client())
        _check_runtime(apis, s.runtime, run.on_event)
        apis.custom.create_namespaced_custom_object(GROUP, VERSION, s.namespace, "trainjobs", manifest)
        return apis

    def wait(self, cluster: Any, name: str, run: EngineRun, stop: threading.Event) -> dict[str, Any]:
        return wait(cluster, self.settings, name, run.on_event, run.cancel, stop)

    def delete(self, cluster: Any, name: str) -> None:
        delete(cluster, self.settings, name)

    def keep(self, outcome: dict[str, Any]) -> bool:
        return self.settings.keep_finished and outcome["succeeded"]

    def facts(self, name: str, run: EngineRun) -> dict[str, Any]:
        s = self.settings
        return {"region": run.target.region, "trainjob": name, "runtime": s.runtime, "num_nodes": s.num_nodes}


def _typed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` through the Trainer API's typed models: a field they do not know is a ConfigError, before any call."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    typed = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    if json.dumps(typed, sort_keys=True) != json.dumps(manifest, sort_keys=True):
        raise ConfigError(
            "trainjob: the TrainJob aiplane built has fields the Trainer API (kubeflow-trainer-api) does not know; "
            "install the kubeflow-trainer-api version of the trainjob extra"
        )
    return typed


def _check_runtime(apis: Apis, runtime: str, on_event: Callable[[Event], None]) -> None:
    """ConfigError, before the TrainJob is sent, when the cluster has no ClusterTrainingRuntime of that name."""
    from kubernetes.client.rest import ApiException

    try:
        apis.custom.get_cluster_custom_object(GROUP, VERSION, "clustertrainingruntimes", runtime)
        return
    except ApiException as exc:
        if exc.status in (401, 403):
            # Reading cluster-scoped runtimes takes a ClusterRole some namespaces' users lack: the Trainer decides.
            on_event(Event(type="log", message=f"ClusterTrainingRuntime {runtime}: not checked ({exc.status} {exc.reason})"))
            return
        if exc.status != 404:
            raise
    try:
        known = [r["metadata"]["name"] for r in
                 apis.custom.list_cluster_custom_object(GROUP, VERSION, "clustertrainingruntimes").get("items", [])]
    except ApiException:
        known = []
    raise ConfigError(
        unknown_name("ClusterTrainingRuntime", runtime, known, known_as="the cluster's",
                     hint="Set the trainjob target's `runtime` to one of them.")
    )
