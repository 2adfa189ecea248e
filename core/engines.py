"""What the built-in engines share: one ``run()`` around each engine's own work, and standby pools.

:class:`EngineBase` is :meth:`Engine.run <aiplane.core.components.Engine.run>`
written once: it defaults ``cancel``, times the run, and stamps the result with
the facts every engine records (``engine``, ``target``, ``duration_s``, then the
engine's own). An engine built on it writes only :meth:`EngineBase.execute`.

:class:`PodEngine` is the rest of ``execute`` for an engine that runs each workload as one Kubernetes
object whose pods write the result back (``k8s-job``, ``trainjob``).

:class:`StandbyPool` keeps the processes an engine starts ahead of its next run
(:meth:`Engine.prestart`): one per key, replaced when the environment or working
directory changed, handed to the run that would have started the same one, and
discarded when this process exits.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel

from .components import Engine
from .kube import default_api_client, pod_storage_problems, read_pod_result, workload_object_name
from .processes import Standby, start_process
from .storage import normalize_uri

if TYPE_CHECKING:
    import kubernetes.client

    from .config import Deployment, Target
    from .kube import PodSettings
    from .workload import Event, Workload, WorkloadResult

__all__ = ["EngineBase", "EngineRun", "OnEvent", "PodEngine", "StandbyPool", "hand_over", "start_standby"]

OnEvent = Callable[["Event"], None]
"""Where an engine sends each event of a workload, as it happens."""

S = TypeVar("S", bound=BaseModel)
T = TypeVar("T", bound=Standby)


@dataclass
class EngineRun:
    """One call of :meth:`EngineBase.run`: what it was given, and when it started."""

    workload: Workload
    target: Target
    on_event: OnEvent
    cancel: threading.Event
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        """Tell the run's log ``message`` (an event of type ``log``), as the workload's own lines are."""
        from .workload import Event

        self.on_event(Event(type="log", message=message))


class EngineBase(Engine[S]):
    """An engine whose :meth:`run` is written once: an engine built on it writes :meth:`execute`."""

    def run(self, workload: Workload, target: Target, on_event: OnEvent,
            cancel: threading.Event | None = None) -> WorkloadResult:
        run = EngineRun(workload, target, on_event, cancel or threading.Event())
        outcome, facts = self.execute(run)
        stamped = {"engine": self.name, "target": target.name, **facts,
                   "duration_s": round(time.monotonic() - run.started, 3)}
        return outcome.model_copy(update={"engine": stamped})

    @abc.abstractmethod
    def execute(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        """Run ``run.workload`` as :meth:`Engine.run` promises; its result and this engine's facts about the run.

        The facts (JSON values: where it ran, the pod, the job id) land in the
        result's ``engine`` after ``engine`` and ``target``; :meth:`run` adds the
        duration. ``run.cancel`` is always an event here.
        """


def start_standby(cmd: Callable[[int], Sequence[str]], env: Mapping[str, str]) -> tuple[subprocess.Popen[str], int]:
    """Start a standby's process, ``cmd(fd)`` naming the pipe it closes once prepared; the process and that
    pipe's read end (for :class:`~aiplane.core.processes.Standby`'s ``ready``)."""
    ready, ready_w = os.pipe()
    try:
        proc = start_process(cmd(ready_w), env=env, stdin=subprocess.PIPE, pass_fds=(ready_w,))
    except BaseException:  # interrupted too: the read end is closed before re-raising
        os.close(ready)
        raise
    finally:
        os.close(ready_w)
    return proc, ready


def hand_over(standby: Standby, line: str) -> bool:
    """Give ``standby`` its workload, one line on its stdin, then EOF; whether it could be written
    (it cannot when the process died: following it then reports its exit and last output)."""
    try:
        assert standby.proc.stdin is not None, "a standby is started with a stdin pipe"
        standby.proc.stdin.write(line + "\n")
        standby.proc.stdin.close()
    except (OSError, ValueError):
        return False
    finally:
        standby.close_ready()
    return True


class StandbyPool(dict[Any, T]):
    """The standbys one engine started, by key (what a run must share with one to take it over).

    A mapping, so a test can look in; all changes go through its lock. Every one
    left is discarded when this process exits: none outlives its starter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        atexit.register(self.discard_all)

    def prestart(self, key: Any, env: Mapping[str, str], cwd: str, start: Callable[[], T], wait_s: float) -> bool:
        """Start the standby for ``key`` unless a usable one is there (one that is not replaces it); whether it
        is prepared within ``wait_s`` seconds (0: do not wait)."""
        with self.lock:
            standby = self.get(key)
            if standby is not None and standby.unusable(env, cwd):
                del self[key]
                standby.discard()
                standby = None
            if standby is None:
                standby = self[key] = start()
            ready = os.dup(standby.ready)  # a run may take the standby (and close its pipe) while this waits
        try:
            prepared = bool(select.select([ready], [], [], max(0.0, wait_s))[0])
        finally:
            os.close(ready)
        return prepared and standby.proc.poll() is None

    def take(self, key: Any, env: Mapping[str, str], cwd: str, line: str | None = None) -> tuple[T | None, str]:
        """The standby for ``key``, now the caller's (handed ``line`` if given), or ``None`` and why the one
        there could not be used (empty if there was none); one that cannot is discarded."""
        with self.lock:
            standby = self.pop(key, None)
        if standby is None:
            return None, ""
        why = standby.unusable(env, cwd)
        if not why and line is not None and not hand_over(standby, line):
            why = "it could not be handed the workload"
        if why:
            standby.discard()
            return None, why
        return standby, ""

    def discard_all(self) -> None:
        """Discard every standby left (registered with ``atexit``)."""
        with self.lock:
            standbys = list(self.values())
            self.clear()
        for standby in standbys:
            standby.discard()


P = TypeVar("P", bound="PodSettings")


class PodEngine(EngineBase[P]):
    """An engine that runs each workload as one Kubernetes object (a Job, a TrainJob) whose pods write the
    result to ``results_dir``: built, created, watched, read back, and deleted whatever happens.

    ``api_client``: a ``kubernetes.client.ApiClient``; by default one is built from the
    settings (kubeconfig, in-cluster service account) when the first workload runs.
    """

    kind: ClassVar[str]
    """How logs and errors name the object (``Kubernetes Job``)."""
    kubectl: ClassVar[str]
    """Its resource name for ``kubectl delete`` (``job``)."""
    name_limits: ClassVar[tuple[int, int]]
    """The object's name: at most how many characters, with up to how many of the run id (:meth:`object_name`)."""

    def __init__(self, settings: Any = None, *, api_client: kubernetes.client.ApiClient | None = None):
        super().__init__(settings)
        self._api_client = api_client
        self._client_lock = threading.Lock()

    def locations(self) -> dict[str, str]:
        return {"results_dir": self.settings.results_dir}

    def check(self, deployment: Deployment) -> list[str]:
        """Storage credentials the pods must get by Secret reference (:func:`~aiplane.core.kube.pod_storage_problems`)."""
        return pod_storage_problems(deployment, self.kind)

    def manifest(self, workload: Workload, target: Target) -> dict[str, Any]:
        """The object this engine would create for ``workload`` (a fresh name each call); sends nothing."""
        name = self.object_name(workload)
        return self.build(workload, target, name, self.result_uri(name))

    def result_uri(self, name: str) -> str:
        return f"{normalize_uri(self.settings.results_dir).rstrip('/')}/{self.name}-results/{name}.json"

    def api_client(self) -> kubernetes.client.ApiClient:
        with self._client_lock:
            if self._api_client is None:
                self._api_client = default_api_client(self.settings, self.name)
            return self._api_client

    def execute(self, run: EngineRun) -> tuple[WorkloadResult, dict[str, Any]]:
        s, workload = self.settings, run.workload
        name = self.object_name(workload)
        result_uri = self.result_uri(name)
        manifest = self.build(workload, run.target, name, result_uri)  # ConfigError here: nothing sent yet
        cluster = self.create(manifest, run)
        # From here on the object exists: whatever happens, it is deleted before this call returns.
        outcome: dict[str, Any] | None = None
        stop = threading.Event()
        try:
            run.log(f"{self.describe(manifest)} created")
            outcome = self.wait(cluster, name, run, stop)
        finally:
            stop.set()
            if outcome is None or not self.keep(outcome):
                self._delete(cluster, name, run)
        where = f"{self.kind} {s.namespace}/{name}"
        result = read_pod_result(workload, result_uri, outcome["succeeded"], outcome["message"], where, s.results_dir)
        return result, {"namespace": s.namespace, **self.facts(name, run), "pod": outcome.get("pod"), "image": s.image}

    def _delete(self, cluster: Any, name: str, run: EngineRun) -> None:
        """:meth:`delete`, best effort: on the way out with the run's own error, a failed delete must not hide it."""
        try:
            self.delete(cluster, name)
        except Exception as exc:  # any API or network failure: said in the log, with the command that finishes it
            ns = self.settings.namespace
            with contextlib.suppress(Exception):  # the log sink failing too: nothing more to tell anyone
                run.log(f"{self.kind} {ns}/{name}: delete failed ({type(exc).__name__}); "
                        f"delete it with kubectl delete {self.kubectl} {name} -n {ns}")

    # -- what each such engine says for itself --------------------------------------------------

    def object_name(self, workload: Workload) -> str:
        """``aiplane-<workload>-<run id>-<attempt>``: a DNS label, unique per attempt (a retried step gets a new one)."""
        return workload_object_name(workload, *self.name_limits)

    @abc.abstractmethod
    def build(self, workload: Workload, target: Target, name: str, result_uri: str) -> dict[str, Any]:
        """The object's manifest; a :class:`~aiplane.core.errors.ConfigError` when it cannot be built."""

    @abc.abstractmethod
    def describe(self, manifest: dict[str, Any]) -> str:
        """One line for the run log: where it runs and with what (never the env values)."""

    @abc.abstractmethod
    def create(self, manifest: dict[str, Any], run: EngineRun) -> Any:
        """Send the object; what :meth:`wait` and :meth:`delete` talk to the cluster through."""

    @abc.abstractmethod
    def wait(self, cluster: Any, name: str, run: EngineRun, stop: threading.Event) -> dict[str, Any]:
        """Follow the object to its end (:func:`~aiplane.core.kube.await_workload`): ``succeeded``, ``message``, ``pod``."""

    @abc.abstractmethod
    def delete(self, cluster: Any, name: str) -> None:
        """Delete the object and its pods now (a 404 is not an error)."""

    def keep(self, outcome: dict[str, Any]) -> bool:
        """Whether to leave the finished object for inspection (default: never)."""
        return False

    def facts(self, name: str, run: EngineRun) -> dict[str, Any]:
        """This engine's facts about the run, besides namespace, pod and image."""
        return {}
