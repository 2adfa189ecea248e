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

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiplane.core.components import Engine
from aiplane.core.config import Deployment, S3Settings, Target
from aiplane.core.errors import ConfigError, WorkloadCancelled, WorkloadError, unknown_name
from aiplane.core.kube import default_api_client, follow_pod_log, read_pod_result
from aiplane.core.storage import normalize_uri
from aiplane.core.workload import Event, Workload, WorkloadResult

from .manifest import NODE, describe, trainjob_manifest, trainjob_name
from .settings import TrainJobSettings

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["TrainJobEngine"]

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
# The labels JobSet puts on every pod of a TrainJob (the TrainJob's JobSet has its name).
_JOBSET = "jobset.sigs.k8s.io/jobset-name"
_INDEX = "batch.kubernetes.io/job-completion-index"
_FATAL_WAITING = {"CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "ErrImageNeverPull", "ImagePullBackOff"}
_LOG_GRACE_S = 10.0
_API_RETRIES = 5


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

    def _apis(self) -> "_Apis":
        with self._client_lock:
            if self._api_client is None:
                self._api_client = default_api_client(self.settings, self.name)
        return _Apis(self._api_client)

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
            outcome = _wait(apis, s, name, on_event, cancel, stop)
        finally:
            stop.set()
            if outcome is None or not (s.keep_finished and outcome["succeeded"]):
                _delete(apis, s, name, on_event)
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


class _Apis:
    """The two APIs a TrainJob is driven through, on one client."""

    def __init__(self, api_client: "kubernetes.client.ApiClient"):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def pods(self, namespace: str, name: str, index: int | None = None) -> list:
        selector = f"{_JOBSET}={name}" + (f",{_INDEX}={index}" if index is not None else "")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: (int((p.metadata.labels or {}).get(_INDEX, 0)), p.metadata.name))


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


def _check_runtime(apis: _Apis, runtime: str, on_event: Callable[[Event], None]) -> None:
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


def _wait(
    apis: _Apis,
    s: TrainJobSettings,
    name: str,
    on_event: Callable[[Event], None],
    cancel: threading.Event,
    stop: threading.Event,
) -> dict[str, Any]:
    """Watch the TrainJob and follow node 0's log on two threads; hand their events to ``on_event`` in this thread.

    Every ``on_event`` call, and so every exception it raises (a Dagster run
    termination), happens in the caller's thread, and a cancel is seen at once.
    """
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    def post_event(event: Event) -> None:
        inbox.put(("event", event))

    def watch() -> None:
        try:
            inbox.put(("done", _TrainJobWatcher(apis, s, name, post_event).wait(stop)))
        except BaseException as exc:  # raised again in the caller's thread
            inbox.put(("error", exc))

    def primary_pod() -> str | None:
        pods = [p for p in apis.pods(s.namespace, name, index=0)
                if p.status is not None and p.status.phase in ("Running", "Succeeded", "Failed")]
        return pods[0].metadata.name if pods else None

    def logs() -> None:
        try:
            follow_pod_log(apis.core, s.namespace, primary_pod, NODE, post_event, stop)
        finally:
            inbox.put(("logs-done", None))

    for target, label in ((watch, "watch"), (logs, "log")):
        threading.Thread(target=target, name=f"trainjob-{label}-{name}", daemon=True).start()
    outcome: dict[str, Any] | None = None
    logs_done = False
    deadline = None
    while True:
        if cancel.is_set():
            on_event(Event(type="log", message=f"TrainJob {s.namespace}/{name}: cancelled, deleting it and its pods"))
            raise WorkloadCancelled(f"TrainJob {s.namespace}/{name} was cancelled; it was deleted with its pods.")
        try:
            kind, value = inbox.get(timeout=0.2)
        except queue.Empty:
            if deadline is not None and time.monotonic() > deadline:
                return outcome  # type: ignore[return-value]  # the log did not end in time: do not wait for it
            continue
        if kind == "event":
            on_event(value)
        elif kind == "error":
            raise value
        elif kind == "logs-done":
            logs_done = True
        elif kind == "done":
            outcome = value
            if not outcome.get("ran", True):
                stop.set()  # a container never started: there is no log to wait for
            deadline = time.monotonic() + _LOG_GRACE_S  # the log's last lines may still be on the way
        if outcome is not None and logs_done:
            while not inbox.empty():
                kind, value = inbox.get_nowait()
                if kind == "event":
                    on_event(value)
            return outcome


class _TrainJobWatcher:
    """Watches one TrainJob to its end, reporting its nodes' phases and the Kubernetes events about them."""

    def __init__(self, apis: _Apis, settings: TrainJobSettings, name: str, emit: Callable[[Event], None]):
        self.apis, self.s, self.name, self.emit = apis, settings, name, emit
        self._seen_events: set[str] = set()
        self._pod_state: dict[str, str] = {}

    def wait(self, stop: threading.Event) -> dict[str, Any]:
        """``{"succeeded": bool, "message": str, "pod": name}`` once the TrainJob ends (or ``stop`` is set)."""
        from kubernetes.client.rest import ApiException

        ns, failures = self.s.namespace, 0
        while True:
            if stop.is_set():
                return {"succeeded": False, "pod": None, "message": "stopped"}
            try:
                outcome = self._once(stop)
                failures = 0
            except ApiException as exc:
                if exc.status in (401, 403):
                    raise WorkloadError(
                        f"Kubernetes API refused to show TrainJob {ns}/{self.name} ({exc.status} {exc.reason}): the "
                        "service account needs get, list and watch on trainjobs (trainer.kubeflow.org), pods, pods/log "
                        "and events in that namespace."
                    ) from None
                failures += 1
                reason = f"{exc.status} {exc.reason}"
            except (OSError, ValueError) as exc:  # connection reset, a truncated stream: an API server blip
                failures += 1
                reason = type(exc).__name__
            else:
                if outcome is not None:
                    return outcome
                continue
            if failures >= _API_RETRIES:
                raise WorkloadError(f"Kubernetes API: watching TrainJob {ns}/{self.name} failed {failures} times in a row: {reason}")
            self.emit(Event(type="log", message=f"Kubernetes API: watching failed ({reason}); retrying"))
            stop.wait(min(0.5 * 2.0**failures, 30.0))

    def _once(self, stop: threading.Event) -> dict[str, Any] | None:
        """One watch request (up to ``watch_timeout_s``) and a look at the pods; the outcome once the TrainJob ended."""
        from kubernetes import watch

        ns = self.s.namespace
        w = watch.Watch()
        job = None
        for event in w.stream(
            self.apis.custom.list_namespaced_custom_object, GROUP, VERSION, ns, "trainjobs",
            field_selector=f"metadata.name={self.name}", timeout_seconds=self.s.watch_timeout_s,
        ):
            if event["type"] == "DELETED":
                w.stop()
                return {"succeeded": False, "pod": None,
                        "message": f"TrainJob {ns}/{self.name} was deleted by someone else before it finished"}
            job = event["object"]
            if _finished(job) or stop.is_set():
                w.stop()
                break
        pods = self.apis.pods(ns, self.name)
        self._report(pods)
        if stop.is_set():
            return None
        fatal = _fatal_waiting(pods)
        if fatal:
            return {"succeeded": False, "pod": pods[0].metadata.name, "message": fatal, "ran": False}
        if job is None or not _finished(job):
            return None
        # The nodes' last states (their termination messages) may land after the TrainJob's condition.
        pods = self.apis.pods(ns, self.name)
        self._report(pods)
        succeeded = _finished(job) == "Complete"
        return {
            "succeeded": succeeded,
            "pod": pods[0].metadata.name if pods else None,
            "message": "" if succeeded else _failure(ns, self.name, job, pods),
        }

    def _report(self, pods: list) -> None:
        for pod in pods:
            state = _pod_state(pod)
            if self._pod_state.get(pod.metadata.name) != state:
                self._pod_state[pod.metadata.name] = state
                self.emit(Event(type="log", message=f"pod {pod.metadata.name}: {state}"))
        events = []
        for involved in (self.name, *(p.metadata.name for p in pods)):
            try:
                events += self.apis.core.list_namespaced_event(
                    self.s.namespace, field_selector=f"involvedObject.name={involved}"
                ).items
            except Exception:
                return  # events are a courtesy; a Role without them must not fail the workload
        for e in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or e.first_timestamp or "")):
            if e.metadata.uid in self._seen_events:
                continue
            self._seen_events.add(e.metadata.uid)
            self.emit(Event(
                type="log",
                message=f"k8s event {e.type or 'Normal'} {e.reason} ({e.involved_object.kind} {e.involved_object.name}): {e.message}",
            ))


def _finished(job: dict) -> str | None:
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def _container(pod):
    for status in (pod.status.container_statuses if pod.status else None) or ():
        if status.name == NODE:
            return status
    return None


def _pod_state(pod) -> str:
    phase = (pod.status.phase if pod.status else None) or "Pending"
    status = _container(pod)
    if status is not None and status.state is not None:
        if status.state.waiting is not None and status.state.waiting.reason:
            return f"{phase} ({status.state.waiting.reason})"
        if status.state.terminated is not None:
            return f"{phase} (exit code {status.state.terminated.exit_code})"
    return phase


def _fatal_waiting(pods: list) -> str | None:
    for pod in pods:
        status = _container(pod)
        waiting = status.state.waiting if status is not None and status.state is not None else None
        if waiting is not None and waiting.reason in _FATAL_WAITING:
            return f"pod {pod.metadata.name} cannot start: {waiting.reason}: {waiting.message or 'no message'}"
    return None


def _failure(namespace: str, name: str, job: dict, pods: list) -> str:
    """What the cluster says went wrong: the TrainJob's Failed condition, then each failed node's termination message."""
    parts = [f"TrainJob {namespace}/{name} failed"]
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            parts.append(f"{condition.get('reason') or 'Failed'}: {condition.get('message') or ''}".rstrip(": "))
    for pod in pods:
        status = _container(pod)
        terminated = status.state.terminated if status is not None and status.state is not None else None
        if terminated is not None and terminated.exit_code != 0:
            detail = f"pod {pod.metadata.name}: container exited {terminated.exit_code} ({terminated.reason})"
            parts.append(f"{detail}: {terminated.message.strip()}" if terminated.message else detail)
    return "; ".join(parts)


def _delete(apis: _Apis, s: TrainJobSettings, name: str, emit: Callable[[Event], None]) -> None:
    """Delete the TrainJob with its pods; best effort, never raises (we may be on the way out with an error)."""
    from kubernetes.client.rest import ApiException

    try:
        try:
            apis.custom.delete_namespaced_custom_object(
                GROUP, VERSION, s.namespace, "trainjobs", name, propagation_policy=s.propagation_policy
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        # The garbage collector deletes the JobSet's pods in the background; do it now, so nothing outlives the call.
        for pod in apis.pods(s.namespace, name):
            with contextlib.suppress(ApiException):
                apis.core.delete_namespaced_pod(pod.metadata.name, s.namespace)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            emit(Event(type="log", message=f"TrainJob {s.namespace}/{name}: delete failed ({type(exc).__name__}); "
                                           f"delete it with kubectl delete trainjob {name} -n {s.namespace}"))
