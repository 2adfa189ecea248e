"""What the plugins that run workloads in Kubernetes pods share: settings, the pod's env and resources, the task.

Quantities, tolerations, GPUs per pod and :class:`PodSettings` are pure functions
and pydantic models: a deployment's settings are checked against the API server's
grammars when it loads, before any call. The few helpers that talk to a cluster
(:func:`default_api_client`, :func:`follow_pod_log`) import ``kubernetes`` when
called, so importing this module never does. :func:`run_pod_task` is what a
workload pod's container runs, on any engine that starts one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import ConfigError

if TYPE_CHECKING:
    import kubernetes.client

    from .config import Deployment, SecretRef, Target
    from .workload import Event, Workload, WorkloadResult

__all__ = [
    "FATAL_WAITING", "PodSettings", "SecretKey", "Toleration", "WorkloadWatcher", "await_workload", "check_cpu",
    "check_dns_label", "check_memory", "container_status", "cpu_quantity", "default_api_client", "fatal_waiting",
    "follow_pod_log", "memory_quantity", "pod_env", "pod_gpus", "pod_resources", "pod_secret_refs", "pod_state",
    "pod_parts", "pod_spec", "pod_storage_problems", "PodParts", "PodResources",
    "pvc_volumes", "read_pod_result", "restricted_security_context", "run_pod_task", "workload_metadata",
    "workload_object_name", "RESULT_ENV", "TERMINATION_ENV", "WORKLOAD_ENV",
]

# The API server's quantity grammars (what kfp's PipelineTask applies too).
_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")


class Toleration(BaseModel):
    """A Kubernetes toleration for a workload's pod."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def manifest(self) -> dict[str, str | int]:
        """As a pod spec writes it: camelCase, unset fields left out."""
        fields = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
                  "tolerationSeconds": self.toleration_seconds}  # fmt: skip
        return {k: v for k, v in fields.items() if v is not None}


def check_cpu(value: str | None, field: str) -> str | None:
    """``value`` if it is a CPU quantity; for a settings validator (ValueError names ``field``)."""
    if value is not None and not _CPU.match(value):
        raise ValueError(f"{field} {value!r} is not a CPU quantity; write e.g. '2', '0.5' or '500m'")
    return value


def check_memory(value: str | None, field: str) -> str | None:
    """``value`` if it is a memory quantity; for a settings validator (ValueError names ``field``)."""
    if value is not None and not _MEMORY.match(value):
        raise ValueError(f"{field} {value!r} is not a memory quantity; write an integer with a unit, e.g. '8Gi'")
    return value


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def memory_quantity(gb: float) -> str:
    return f"{int(gb)}G" if float(gb).is_integer() else f"{round(gb * 1024)}Mi"


def pod_gpus(workload: "Workload", target: "Target") -> int:
    """GPUs for the workload's pod on ``target``; ConfigError if it asks for more than the target has."""
    wanted = workload.resources.gpus
    if wanted > target.gpus:
        raise ConfigError(
            f"Workload {workload.name} asks for {wanted} GPU(s) but target {target.name!r} has {target.gpus}; "
            "raise the target's gpus or run the workload on a GPU target."
        )
    # A trainer placed on a GPU target by the deployment's `gpus:` gets the target's GPUs.
    return wanted or target.gpus


# -- what every engine that runs a workload in a pod shares -------------------------------------

WORKLOAD_ENV = "AIPLANE_WORKLOAD"
"""The pod's environment variable holding the workload's JSON."""
RESULT_ENV = "AIPLANE_RESULT"
"""The pod's environment variable naming where the result goes (object storage, or a shared volume)."""
TERMINATION_ENV = "AIPLANE_TERMINATION_MESSAGE_PATH"
"""Where the termination message goes; the pod spec's ``terminationMessagePath`` (default ``/dev/termination-log``)."""
_TERMINATION_LIMIT = 4096  # what the kubelet keeps of a termination message
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def check_dns_label(value: str | None, field: str) -> str | None:
    """``value`` if it is a Kubernetes name (a namespace, a service account); for a settings validator."""
    if value is not None and (len(value) > 63 or not _DNS_LABEL.match(value)):
        raise ValueError(
            f"{field} {value!r} is not a Kubernetes name: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


class SecretKey(BaseModel):
    """One key of a Kubernetes Secret in the pod's namespace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str
    key: str


class PodResources(BaseModel):
    """Where and how big a workload's pod is: service account, CPU, memory, GPUs, placement, volumes.

    Every engine that runs a workload in a pod takes these (``k8s-job``,
    ``trainjob``, and ``kfp`` for its pipeline task), checked when the deployment loads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_account: str | None = None
    """The service account the pod runs as (its Role decides what the workload may touch)."""
    cpu_request: str | None = None
    """Defaults to the workload's ``resources.cpus``."""
    cpu_limit: str | None = None
    memory_request: str | None = None
    """Defaults to the workload's ``resources.memory_gb``."""
    memory_limit: str | None = None
    """``k8s-job`` and ``trainjob`` default it to ``memory_request``: a pod that outgrows its request is killed,
    not the node."""
    accelerator_type: str = "nvidia.com/gpu"
    """Kubernetes resource name of the GPUs; the count comes from the workload or the target."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    pvc_mounts: dict[str, str] = Field(default_factory=dict)
    """PersistentVolumeClaims to mount, claim name -> mount path (the volume of the artifact store
    and of a path ``results_dir``, mounted at the same path as in this process)."""

    @field_validator("cpu_request", "cpu_limit")
    @classmethod
    def _cpu(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_cpu(v, str(info.field_name))

    @field_validator("memory_request", "memory_limit")
    @classmethod
    def _memory(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_memory(v, str(info.field_name))

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, v: str | None) -> str | None:
        return check_dns_label(v, "service_account")


class PodSettings(PodResources):
    """What an engine that runs each workload in a Kubernetes pod needs to know: image, namespace, resources, secrets.

    The pod's container runs the engine's task module in ``image`` (which must hold
    the installed aiplane and what the workload imports) and writes the result to
    ``results_dir``, where this process reads it back. Engines extend it with what
    is their own (a Job's TTL, a TrainJob's runtime). Its size and placement are
    :class:`PodResources`.
    """

    image: str
    """The container image: it must hold the installed ``aiplane`` (with the workload's extras)."""
    namespace: str = "default"
    results_dir: str
    """Where the pod writes each result and this process reads it: object storage (``s3://bucket/prefix``,
    reached with the deployment's storage settings), or a volume mounted at the same path here and in
    the pod (``pvc_mounts``)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: tuple[str, ...] = ()
    python: str = "python"
    """The interpreter in ``image``."""
    gpu_type_label: str = "nvidia.com/gpu.product"
    """Node label that must equal the workload's (or the target's) ``gpu_type``, when one is given."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on the engine's object and its pods."""
    env: dict[str, str] = Field(default_factory=dict)
    """Plain environment variables for the pod; never secrets (see ``secret_env``)."""
    secret_env: dict[str, SecretKey] = Field(default_factory=dict)
    """Environment variables the pod reads from Secrets (``secretKeyRef``), by name:
    ``{HF_TOKEN: {secret: hf, key: token}}``. Storage credentials given as Secret references
    are added on their own."""
    timeout_s: float | None = Field(default=None, gt=0)
    """``activeDeadlineSeconds``: the cluster stops the workload after this long."""
    run_as_non_root: bool = True
    """Refuse to start the container as root, as OpenShift's restricted SCC does; set false for an image
    that needs root (the other restricted settings stay)."""
    watch_timeout_s: int = Field(default=2, ge=1)
    """How long one watch request waits for a change; also how soon a cancel is noticed."""
    kubeconfig: str | None = None
    """A kubeconfig file; default: the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    context: str | None = None
    """The kubeconfig context to use."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str | None:
        return check_dns_label(v, "namespace")

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        bad = [name for name in v if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"{info.field_name}: {', '.join(map(repr, bad))} are not environment variable names")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"image {v!r} is not an image reference; write e.g. 'quay.io/org/aiplane:1.0'")
        return v

    @field_validator("results_dir")
    @classmethod
    def _results_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("results_dir is empty; give object storage (s3://bucket/prefix) or a shared volume path")
        return v

    @model_validator(mode="after")
    def _no_secret_in_env(self) -> "PodSettings":
        clash = sorted(set(self.env) & set(self.secret_env))
        if clash:
            raise ValueError(f"{', '.join(clash)} given in both env and secret_env; keep it in secret_env only")
        return self


def pod_secret_refs(workload: "Workload", pod: str) -> list["SecretRef"]:
    """The workload's credential references, each a Kubernetes Secret a ``pod`` pod can mount.

    A reference to this process's environment (``{env: VAR}``) would be unset in the
    pod, and copying its value into the manifest would put a secret in it: refused.
    """
    refs = workload.secret_refs()
    local = [repr(r) for r in refs if r.env]
    if local:
        raise ConfigError(
            f"storage: {', '.join(local)} name this process's environment, which a {pod} pod does not see; "
            "reference a Kubernetes Secret instead (in the pod's namespace): {secret: NAME, key: KEY}"
        )
    return refs


def pod_storage_problems(deployment: "Deployment", kind: str) -> list[str]:
    """What :func:`pod_secret_refs` would refuse at run time, found in ``deployment`` before anything runs: each
    storage credential (every region's) that names this process's environment, which a ``kind``'s pods do not see."""
    stores = [("storage.s3", deployment.storage.s3)]
    stores += [(f"storage.regions.{r}.s3", where.s3) for r, where in deployment.storage.regions.items()]
    return [
        f"{where}.{field} is {ref!r}, this process's environment, which a {kind}'s pods do not see; "
        f"reference a Kubernetes Secret in the {kind}'s namespace instead: {{secret: NAME, key: KEY}}"
        for where, s3 in stores
        for field in ("access_key_id", "secret_access_key")
        if (ref := getattr(s3, field, None)) is not None and ref.env
    ]


def pod_env(workload: "Workload", settings: PodSettings, engine: str, result_uri: str) -> list[dict[str, Any]]:
    """The container's ``env``: the workload, where its result goes, the settings' env, secrets as ``secretKeyRef``.

    Storage credentials arrive each as the variable its SecretRef resolves from
    (:func:`pod_secret_refs`).
    """
    refs = pod_secret_refs(workload, engine)
    # The pod has its own cache: the orchestrator's path means nothing there.
    spec = workload.model_copy(update={"cache_dir": None}).model_dump_json()
    env: list[dict[str, Any]] = [
        {"name": WORKLOAD_ENV, "value": spec},
        {"name": RESULT_ENV, "value": result_uri},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # events reach the log as they happen
        *({"name": k, "value": v} for k, v in sorted(settings.env.items())),
        *({"name": r.env_var, "valueFrom": {"secretKeyRef": {"name": r.secret, "key": r.key}}} for r in refs),
        *(
            {"name": k, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for k, ref in sorted(settings.secret_env.items())
        ),
    ]
    names = [e["name"] for e in env]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{engine}: environment variable(s) {', '.join(twice)} set twice; aiplane sets {WORKLOAD_ENV}, "
                          f"{RESULT_ENV} and the storage credentials itself")
    return env


def pod_resources(
    workload: "Workload", target: "Target", settings: PodSettings
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(requests, limits, node_selector)`` of the workload's container on ``target``: CPU, memory, GPUs and their type."""
    s = settings
    gpus = pod_gpus(workload, target)
    gpu_type = workload.resources.gpu_type or target.gpu_type
    if workload.resources.gpu_type and target.gpu_type and workload.resources.gpu_type != target.gpu_type:
        raise ConfigError(
            f"Workload {workload.name} needs {workload.resources.gpu_type} GPUs but target {target.name!r} "
            f"has {target.gpu_type}; place it on a target with that gpu_type."
        )
    requests: dict[str, str] = {"cpu": s.cpu_request or cpu_quantity(workload.resources.cpus)}
    memory = s.memory_request or (memory_quantity(workload.resources.memory_gb) if workload.resources.memory_gb else None)
    if memory:
        requests["memory"] = memory
    limits: dict[str, str] = {}
    if s.cpu_limit:
        limits["cpu"] = s.cpu_limit
    memory_limit = s.memory_limit or memory
    if memory_limit:
        limits["memory"] = memory_limit
    node_selector = dict(s.node_selector)
    if gpus:
        requests[s.accelerator_type] = limits[s.accelerator_type] = str(gpus)
        if gpu_type:
            node_selector[s.gpu_type_label] = gpu_type
    return requests, limits, dict(sorted(node_selector.items()))


def workload_object_name(workload: "Workload", max_len: int, run_id_chars: int) -> str:
    """``aiplane-<workload>-<run id>-<attempt>``: a DNS label of at most ``max_len``, unique per attempt."""
    import uuid

    suffix = f"-{re.sub(r'[^a-z0-9]', '', workload.run_id.lower())[:run_id_chars]}-{uuid.uuid4().hex[:6]}"
    slug = re.sub(r"[^a-z0-9]+", "-", workload.name.lower()).strip("-") or "workload"
    return f"aiplane-{slug[: max_len - len('aiplane-') - len(suffix)].rstrip('-')}{suffix}"


def workload_metadata(workload: "Workload", settings: PodSettings) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations of the object that runs ``workload``: the settings' labels, aiplane's own."""
    labels = {
        **settings.labels,
        "app.kubernetes.io/managed-by": "aiplane",
        "app.kubernetes.io/component": "workload",
        "aiplane.io/run-id": re.sub(r"[^A-Za-z0-9_.-]", "-", workload.run_id)[:63].strip("-_.") or "run",
    }
    return labels, {"aiplane.io/workload": workload.name, "aiplane.io/entrypoint": workload.entrypoint}


class PodParts(NamedTuple):
    """What every workload pod's manifest is made of, whatever object runs it (:func:`pod_parts`)."""

    env: list[dict[str, Any]]
    requests: dict[str, str]
    limits: dict[str, str]
    node_selector: dict[str, str]
    labels: dict[str, str]
    annotations: dict[str, str]


def pod_parts(workload: "Workload", target: "Target", settings: PodSettings, engine: str, result_uri: str) -> PodParts:
    """The container's env (:func:`pod_env`), its resources and node selector (:func:`pod_resources`), and the
    object's labels and annotations (:func:`workload_metadata`); a ConfigError before anything is sent."""
    env = pod_env(workload, settings, engine, result_uri)
    return PodParts(env, *pod_resources(workload, target, settings), *workload_metadata(workload, settings))


def restricted_security_context(settings: PodSettings) -> dict[str, Any]:
    """What the restricted Pod Security Standard and OpenShift's restricted SCC ask of a container."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": settings.run_as_non_root,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pvc_volumes(settings: PodSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(volumes, volumeMounts)`` for the settings' ``pvc_mounts``."""
    named = [(f"pvc-{i}", claim, path) for i, (claim, path) in enumerate(sorted(settings.pvc_mounts.items()))]
    return (
        [{"name": v, "persistentVolumeClaim": {"claimName": claim}} for v, claim, _ in named],
        [{"name": v, "mountPath": path} for v, _, path in named],
    )


def pod_spec(settings: PodSettings, container: dict[str, Any], node_selector: dict[str, str]) -> dict[str, Any]:
    """A pod spec of ``container``, with the settings' volumes (mounted in it), service account, pull secrets,
    tolerations and ``node_selector``."""
    s = settings
    pod: dict[str, Any] = {"containers": [container]}
    if s.pvc_mounts:
        pod["volumes"], container["volumeMounts"] = pvc_volumes(s)
    if s.service_account:
        pod["serviceAccountName"] = s.service_account
    if s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if node_selector:
        pod["nodeSelector"] = node_selector
    if s.tolerations:
        pod["tolerations"] = [t.manifest() for t in s.tolerations]
    return pod


def default_api_client(settings: PodSettings, engine: str) -> "kubernetes.client.ApiClient":
    """The real client: the settings' kubeconfig, else the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``.

    Imports ``kubernetes`` when called, never when this module loads.
    """
    from kubernetes import client, config

    try:
        if settings.kubeconfig or settings.context:
            return config.new_client_from_config(config_file=settings.kubeconfig, context=settings.context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config()
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(
            f"{engine}: no Kubernetes cluster to talk to ({exc}). Run inside the cluster, or set the target's "
            "`kubeconfig` (and `context`), or $KUBECONFIG."
        ) from None


def read_pod_result(
    workload: "Workload", result_uri: str, succeeded: bool, failure: str, what: str, results_dir: str
) -> "WorkloadResult":
    """The result the pod wrote to ``result_uri`` (removed once read); the workload's own error raised as its class.

    ``failure`` is what the cluster said went wrong when ``succeeded`` is false;
    ``what`` names the object that ran (``Kubernetes Job ns/name``).
    """
    from .errors import AiplaneError, WorkloadError
    from .workload import parse_result

    storage = workload.storage()
    try:
        if not succeeded:
            if storage.exists(result_uri):
                # The workload itself failed: raise its own aiplane error, as every engine does.
                parse_result(storage.read_bytes(result_uri).decode(), workload)
            raise WorkloadError(f"Workload {workload.name} ({workload.run_id}): {failure}")
        if not storage.exists(result_uri):
            raise WorkloadError(
                f"{what} succeeded but wrote no result to {result_uri}: results_dir {results_dir!r} must be object "
                "storage the pod can write (s3://...), or a volume mounted at the same path here and in the pod "
                "(pvc_mounts)."
            )
        return parse_result(storage.read_bytes(result_uri).decode(), workload)
    finally:
        with contextlib.suppress(AiplaneError):
            storage.delete(result_uri)


def follow_pod_log(
    core_api: "kubernetes.client.CoreV1Api",
    namespace: str,
    find_pod: Callable[[], str | None],
    container: str,
    emit: Callable[["Event"], None],
    stop: threading.Event,
) -> None:
    """Follow one pod's log to its end, one event per line; ``find_pod`` names it once it runs (``None``: not yet).

    A stream that drops (a proxy's timeout, an API server restart) is opened again and
    resumes after the last line emitted, found by the kubelet's timestamp on each line:
    no line twice, none skipped. Gives up quietly when ``stop`` is set or the pod is gone.
    """
    from kubernetes import watch
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    from .workload import parse_event

    pod, seen = None, _LogPosition()
    while not stop.is_set():
        try:
            pod = pod or find_pod()
            if pod is not None:
                seen.reopen()
                lines = watch.Watch().stream(
                    core_api.read_namespaced_pod_log, pod, namespace, container=container, timestamps=True
                )
                for line in lines:
                    text = seen.new(line)
                    if text is not None:
                        emit(parse_event(text))
                return
        except ApiException as exc:
            if exc.status == 404:
                return  # the pod is gone (deleted, cancelled); any other answer: ask again
        except (HTTPError, OSError):  # a dropped stream: resume, unless told to stop
            pass
        stop.wait(0.5)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$", re.DOTALL)


class _LogPosition:
    """Where a followed log is: the timestamp of the last line emitted, and how many lines emitted had it."""

    def __init__(self) -> None:
        self.last: tuple[str, str] = ("", "")
        self.count = 0
        self._skip = 0

    def reopen(self) -> None:
        """A new stream starts from the log's beginning: what was emitted comes again, to be passed over."""
        self._skip = self.count

    def new(self, line: str) -> str | None:
        """The line without its timestamp if it was not emitted before, else ``None``."""
        match = _STAMP.match(line)
        if match is None:
            return line  # no timestamp (an API that ignores the flag): nothing to resume by
        key = (match[1], (match[2] or "").ljust(9, "0"))  # RFC3339Nano drops trailing zeros: pad to compare
        if key < self.last:
            return None
        if key == self.last:
            if self._skip:
                self._skip -= 1
                return None
            self.count += 1
        else:
            self.last, self.count, self._skip = key, 1, 0
        return match[3]


def run_pod_task(execute_to: Callable[[Path, Path], int] | None = None, *, write_result: bool = True) -> int:
    """What a workload pod's container runs: the workload from its environment, the result to ``AIPLANE_RESULT``.

    ``execute_to(spec_file, result_file)`` runs the workload and writes its result
    file, returning an exit code (default: :func:`aiplane.core.worker.main`, one
    process). On failure the error also goes to the container's termination message,
    so ``kubectl describe`` and the engine show it even when the result cannot be
    written. ``write_result=False``: a worker other than the primary, whose result
    nobody reads.
    """
    from . import worker
    from .storage import is_local, local_path
    from .workload import Workload

    try:
        spec, result_uri = os.environ[WORKLOAD_ENV], os.environ[RESULT_ENV]
    except KeyError as exc:
        return _fail(f"ConfigError: {exc.args[0]} is not set; this module runs inside an aiplane workload pod")
    workload = Workload.model_validate_json(spec)
    run = execute_to or (lambda spec_file, result_file: worker.main([str(spec_file), str(result_file)]))
    with tempfile.TemporaryDirectory(prefix="aiplane-task-") as tmp:
        spec_file, result_file = Path(tmp, "workload.json"), Path(tmp, "result.json")
        spec_file.write_text(spec)
        code = run(spec_file, result_file)
        text = result_file.read_text() if result_file.exists() else json.dumps(
            {"error_type": "WorkloadError", "error": "the worker wrote no result"}
        )
    message = ""
    if code != 0:
        failure = json.loads(text)
        message = f"{failure.get('error_type', 'WorkloadError')}: {failure.get('error', '')}"
    if write_result:
        try:
            if is_local(result_uri):
                local_path(result_uri).parent.mkdir(parents=True, exist_ok=True)
            workload.storage().write_bytes(result_uri, text.encode())
        except Exception as exc:  # the engine then reports the termination message instead
            message = f"{message + '; ' if message else ''}cannot write the result to {result_uri}: {type(exc).__name__}: {exc}"
            code = code or 1
    if message:
        _fail(message)
    return code


def _fail(message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    path = os.environ.get(TERMINATION_ENV, "/dev/termination-log")
    try:
        with open(path, "w") as f:
            f.write(message[-_TERMINATION_LIMIT:])
    except OSError:
        pass  # no termination log outside a pod; stderr (the pod log) has it
    return 1


# Waiting reasons after which a pod never starts by itself: fail now, with the kubelet's message.
FATAL_WAITING = frozenset({
    "CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "ErrImageNeverPull", "ImagePullBackOff",
})
_LOG_GRACE_S = 10.0
_API_RETRIES = 5


def await_workload(
    what: str,
    watch: Callable[[Callable[["Event"], None]], dict[str, Any]],
    follow_log: Callable[[Callable[["Event"], None]], None],
    on_event: Callable[["Event"], None],
    cancel: threading.Event,
    stop: threading.Event,
) -> dict[str, Any]:
    """Run ``watch`` and ``follow_log`` on two threads; hand their events to ``on_event`` here, in this thread.

    ``what`` names the object (``"TrainJob ns/name"``). Every ``on_event`` call, and so
    every exception it raises (a Dagster run termination), happens in the caller's
    thread, and a cancel is seen at once, not when a watch request ends. ``watch``
    returns the outcome; one with ``"ran": False`` (a container that never started)
    stops the log at once.
    """
    import queue
    import time

    from .errors import WorkloadCancelled
    from .workload import Event

    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    def post_event(event: "Event") -> None:
        inbox.put(("event", event))

    def watcher() -> None:
        try:
            inbox.put(("done", watch(post_event)))
        except BaseException as exc:  # raised again in the caller's thread
            inbox.put(("error", exc))

    def logs() -> None:
        try:
            follow_log(post_event)
        finally:
            inbox.put(("logs-done", None))

    for target, label in ((watcher, "watch"), (logs, "log")):
        threading.Thread(target=target, name=f"{label} {what}", daemon=True).start()
    outcome: dict[str, Any] | None = None
    logs_done = False
    deadline = None
    while True:
        if cancel.is_set():
            on_event(Event(type="log", message=f"{what}: cancelled, deleting it and its pods"))
            raise WorkloadCancelled(f"{what} was cancelled; it was deleted with its pods.")
        try:
            kind, value = inbox.get(timeout=0.2)
        except queue.Empty:
            if outcome is not None and deadline is not None and time.monotonic() > deadline:
                return outcome  # the log did not end in time: do not wait for it
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


def container_status(pod: Any, container: str) -> Any:
    """The pod's status of ``container``, or ``None`` while it has none."""
    for status in (pod.status.container_statuses if pod.status else None) or ():
        if status.name == container:
            return status
    return None


def pod_state(pod: Any, container: str) -> str:
    """The pod's phase, with the container's waiting reason or exit code when it has one."""
    phase = (pod.status.phase if pod.status else None) or "Pending"
    status = container_status(pod, container)
    if status is not None and status.state is not None:
        if status.state.waiting is not None and status.state.waiting.reason:
            return f"{phase} ({status.state.waiting.reason})"
        if status.state.terminated is not None:
            return f"{phase} (exit code {status.state.terminated.exit_code})"
    return phase


def fatal_waiting(pods: list[Any], container: str) -> str | None:
    """Why a pod will never start by itself (:data:`FATAL_WAITING`), or ``None``."""
    for pod in pods:
        status = container_status(pod, container)
        waiting = status.state.waiting if status is not None and status.state is not None else None
        if waiting is not None and waiting.reason in FATAL_WAITING:
            return f"pod {pod.metadata.name} cannot start: {waiting.reason}: {waiting.message or 'no message'}"
    return None


class WorkloadWatcher:
    """Watches one object that runs pods (a Job, a TrainJob) to its end, reporting its pods' states and events.

    A subclass names the object (``what``: ``"TrainJob"``; ``kind`` and ``resource`` for
    the permission message) and says how to watch it (:meth:`stream`), list its pods,
    read its end (:meth:`finished`) and what went wrong (:meth:`failure`).
    """

    what = kind = resource = container = ""

    def __init__(self, core_api: "kubernetes.client.CoreV1Api", namespace: str, name: str,
                 watch_timeout_s: int, emit: Callable[["Event"], None]):
        self.core_api, self.namespace, self.name, self.emit = core_api, namespace, name, emit
        self.watch_timeout_s = watch_timeout_s
        self._seen_events: set[str] = set()
        self._pod_state: dict[str, str] = {}

    def stream(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The list call to watch and its positional arguments."""
        raise NotImplementedError

    def pods(self) -> list[Any]:
        raise NotImplementedError

    def finished(self, obj: Any) -> str | None:
        """``"Complete"``, ``"Failed"``, or ``None`` while it runs."""
        raise NotImplementedError

    def failure(self, obj: Any, pods: list[Any]) -> str:
        raise NotImplementedError

    def wait(self, stop: threading.Event) -> dict[str, Any]:
        """``{"succeeded": bool, "message": str, "pod": name}`` once the object ends (or ``stop`` is set)."""
        from kubernetes.client.rest import ApiException

        from .errors import WorkloadError
        from .workload import Event

        ns, failures = self.namespace, 0
        while True:
            if stop.is_set():
                return {"succeeded": False, "pod": None, "message": "stopped"}
            try:
                outcome = self._once(stop)
                failures = 0
            except ApiException as exc:
                if exc.status in (401, 403):
                    raise WorkloadError(
                        f"Kubernetes API refused to show {self.kind} {ns}/{self.name} ({exc.status} {exc.reason}): the "
                        f"service account needs get, list and watch on {self.resource}, pods, pods/log and events in "
                        "that namespace."
                    ) from None
                failures += 1
                reason = detail = f"{exc.status} {exc.reason}"
            except (OSError, ValueError) as exc:  # connection reset, a truncated stream: an API server blip
                failures += 1
                reason, detail = type(exc).__name__, f"{type(exc).__name__}: {exc}"
            else:
                if outcome is not None:
                    return outcome
                continue
            if failures >= _API_RETRIES:
                raise WorkloadError(
                    f"Kubernetes API: watching {self.kind} {ns}/{self.name} failed {failures} times in a row: {detail}"
                ) from None
            self.emit(Event(type="log", message=f"Kubernetes API: watching failed ({reason}); retrying"))
            stop.wait(min(0.5 * 2.0**failures, 30.0))

    def _once(self, stop: threading.Event) -> dict[str, Any] | None:
        """One watch request (up to ``watch_timeout_s``) and a look at the pods; the outcome once the object ended."""
        from kubernetes import watch

        ns = self.namespace
        w = watch.Watch()
        obj = None
        call, args = self.stream()
        for event in w.stream(call, *args, field_selector=f"metadata.name={self.name}",
                              timeout_seconds=self.watch_timeout_s):
            if event["type"] == "DELETED":
                w.stop()
                return {"succeeded": False, "pod": None,
                        "message": f"{self.what} {ns}/{self.name} was deleted by someone else before it finished"}
            obj = event["object"]
            if self.finished(obj) or stop.is_set():
                w.stop()
                break
        pods = self.pods()
        self._report(pods)
        if stop.is_set():
            return None
        fatal = fatal_waiting(pods, self.container)
        if fatal:
            return {"succeeded": False, "pod": pods[0].metadata.name, "message": fatal, "ran": False}
        if obj is None or not self.finished(obj):
            return None
        # The pods' last states (their termination messages) may land after the object's condition.
        pods = self.pods()
        self._report(pods)
        succeeded = self.finished(obj) == "Complete"
        return {
            "succeeded": succeeded,
            "pod": pods[0].metadata.name if pods else None,
            "message": "" if succeeded else self.failure(obj, pods),
        }

    def _report(self, pods: list[Any]) -> None:
        from .workload import Event

        for pod in pods:
            state = pod_state(pod, self.container)
            if self._pod_state.get(pod.metadata.name) != state:
                self._pod_state[pod.metadata.name] = state
                self.emit(Event(type="log", message=f"pod {pod.metadata.name}: {state}"))
        events = []
        for involved in (self.name, *(p.metadata.name for p in pods)):
            try:
                events += self.core_api.list_namespaced_event(
                    self.namespace, field_selector=f"involvedObject.name={involved}"
                ).items
            except Exception:  # events are a courtesy: a Role without them, or a blip, must not fail the workload
                return
        for e in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time or e.first_timestamp or "")):
            if e.metadata.uid in self._seen_events:
                continue
            self._seen_events.add(e.metadata.uid)
            self.emit(Event(
                type="log",
                message=f"k8s event {e.type or 'Normal'} {e.reason} ({e.involved_object.kind} {e.involved_object.name}): {e.message}",
            ))
