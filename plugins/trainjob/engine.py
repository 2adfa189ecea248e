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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiplane.core.components import Engine
from aiplane.core.config import Deployment, S3Settings, Target
from aiplane.core.errors import ConfigError, unknown_name
from aiplane.core.kube import default_api_client, read_pod_result
from aiplane.core.storage import normalize_uri
from aiplane.core.workload import Event, Workload, WorkloadResult

from .cluster import GROUP, VERSION, Apis, delete, wait
from .manifest import describe, trainjob_manifest, trainjob_name
from .settings import TrainJobSettings

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["TrainJobEngine"]

class TrainJobEngine(Engine):
    """Runs each workload as a TrainJob on the target's ClusterTrainingRuntime, in its namespace and image.

    ``api_client``: a ``kubernetes.client.ApiClient``; by default one is built from
    the settings (kubeconfig, in-cluster service account) when the first workload runs.
    """

    name = "trainjob"
    Settings = TrainJobSettings

    def __init__(self, settings: Any = None, *, api_client: "kubernetes.client.ApiClient | None" = None):
        super().__init__(settings)
        self._api_client = api_client
        self._client_lock = threading.Lock()

    def locations(self) -> dict[str, str]:
        return {"results_dir": self.settings.results_dir}

    def check(self, deployment: Deployment) -> list[str]:
        """Storage credentials the TrainJob's pods must get by Secret reference, and the GPUs a node can have."""
        problems = []
        stores: list[tuple[str, S3Settings | None]] = [("storage.s3", deployment.storage.s3)]
        stores += [(f"storage.regions.{r}.s3", where.s3) for r, where in deployment.storage.regions.items()]
        for where, s3 in stores:
            for field in ("access_key_id", "secret_access_key"):
                ref = getattr(s3, field, None)
                if ref is not None and ref.env:
                    problems.append(
                        f"{where}.{field} is {ref!r}, this process's environment, which a TrainJob's pods do not see; "
                        "reference a Kubernetes Secret in the TrainJob's namespace instead: {secret: NAME, key: KEY}"
                    )
        return problems

    def manifest(self, workload: Workload, target: Target) -> dict[str, Any]:
        """The TrainJob this engine would create for ``workload`` (a fresh name each call); sends nothing."""
        name = trainjob_name(workload)
        return _typed(trainjob_manifest(workload, target, self.settings, name, self._result_uri(name)))

    def _result_uri(self, name: str) -> str:
        return f"{normalize_uri(self.settings.results_dir).rstrip('/')}/trainjob-results/{name}.json"

    def _apis(self) -> "Apis":
        with self._client_lock:
            if self._api_client is None:
                self._api_client = default_api_client(self.settings, self.name)
        return Apis(self._api_client)

    def run(
        self,
        workload: Workload,
        target: Target,
        on_event: Callable[[Event], None],
        cancel: threading.Event | None = None,
    ) -> WorkloadResult:
        cancel = cancel or threading.Event()
        s: TrainJobSettings = self.settings  # type: ignore[assignment]
        name = trainjob_name(workload)
        result_uri = self._result_uri(name)
        # ConfigError here: nothing sent yet.
        manifest = _typed(trainjob_manifest(workload, target, s, name, result_uri))
        apis = self._apis()
        _check_runtime(apis, s.runtime, on_event)
        started = time.monotonic()
        apis.custom.create_namespaced_custom_object(GROUP, VERSION, s.namespace, "trainjobs", manifest)
        # From here on the TrainJob exists: whatever happens, it is deleted before this call returns.
        outcome: dict[str, Any] | None = None
        stop = threading.Event()
        try:
            on_event(Event(type="log", message=f"{describe(manifest)} created"))
            outcome = wait(apis, s, name, on_event, cancel, stop)
        finally:
            stop.set()
            if outcome is None or not (s.keep_finished and outcome["succeeded"]):
                delete(apis, s, name, on_event)
        meta = {
            "engine": self.name,
            "target": target.name,
            "region": target.region,
            "namespace": s.namespace,
            "trainjob": name,
            "runtime": s.runtime,
            "num_nodes": s.num_nodes,
            "pod": outcome.get("pod"),
            "image": s.image,
            "duration_s": round(time.monotonic() - started, 3),
        }
        result = read_pod_result(workload, result_uri, outcome["succeeded"], outcome["message"],
                                 f"TrainJob {s.namespace}/{name}", s.results_dir)
        return result.model_copy(update={"engine": meta})


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
