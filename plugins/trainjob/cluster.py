"""How the ``trainjob`` engine follows a TrainJob it created: watch, node 0's log, the nodes' states, delete.

Through the ``kubernetes`` client's ``CustomObjectsApi`` (the TrainJob) and
``CoreV1Api`` (its pods, their log, the events), both on the client the engine was given.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiplane.core.errors import WorkloadCancelled, WorkloadError
from aiplane.core.kube import follow_pod_log
from aiplane.core.workload import Event

from .manifest import NODE
from .settings import TrainJobSettings

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["Apis", "GROUP", "VERSION", "delete", "wait"]

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
# The labels JobSet puts on every pod of a TrainJob (the TrainJob's JobSet has its name).
_JOBSET = "jobset.sigs.k8s.io/jobset-name"
_INDEX = "batch.kubernetes.io/job-completion-index"
_FATAL_WAITING = {"CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "ErrImageNeverPull", "ImagePullBackOff"}
_LOG_GRACE_S = 10.0
_API_RETRIES = 5


class Apis:
    """The two APIs a TrainJob is driven through, on one client."""

    def __init__(self, api_client: "kubernetes.client.ApiClient"):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def pods(self, namespace: str, name: str, index: int | None = None) -> list:
        selector = f"{_JOBSET}={name}" + (f",{_INDEX}={index}" if index is not None else "")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: (int((p.metadata.labels or {}).get(_INDEX, 0)), p.metadata.name))


def wait(
    apis: Apis,
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

    def __init__(self, apis: Apis, settings: TrainJobSettings, name: str, emit: Callable[[Event], None]):
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


def delete(apis: Apis, s: TrainJobSettings, name: str, emit: Callable[[Event], None]) -> None:
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
