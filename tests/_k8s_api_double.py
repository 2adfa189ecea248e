"""A loopback double of the Kubernetes API server, for the real ``kubernetes`` client.

The unmodified ``kubernetes`` Python client (and what is built on it: dagster-k8s's
``DagsterKubernetesClient``, the kserve SDK's ``KServeClient``) talks to it over HTTP
on 127.0.0.1, an ephemeral port::

    from _k8s_api_double import KubernetesApiDouble, job_controller
    from conftest import CRDS

    with KubernetesApiDouble(crds=[CRDS / "serving.kserve.io_inferenceservices.yaml"]) as api:
        core = kubernetes.client.CoreV1Api(api.api_client())   # or api.configuration()
        ...
        assert [r.method for r in api.requests] == [...]

- ``api.api_client()``: a fresh ``kubernetes.client.ApiClient`` for the double (inject
  it into the code under test); ``api.configuration()``, ``api.host``;
  ``api.kubeconfig(namespace)`` for clients that load a kubeconfig
  (``KServeClient(config_dict=api.kubeconfig(ns))``, which replaces the process-wide
  default configuration: save and restore ``Configuration.get_default_copy()``).
- ``api.register_crd(path_or_dict)``: serve and validate one more custom resource.
- ``api.add_controller(kind, fn)``: play the operator (see Controllers below).
- ``api.get / list / create / update / set_status / delete / append_log / event``:
  read and change the store directly, as a controller or a test's setup would.
- ``api.wait_for(predicate, timeout)``: wait until the store makes it true.
- ``api.fail(method, path_regex, code, times)``: the next matching requests fail.
- ``api.requests``: every request answered (``RecordedRequest``).

What it serves (namespaced, and cluster-wide lists):

- create / get / list / replace / patch / delete of Pods, Secrets, ConfigMaps,
  Services, Events, ServiceAccounts (``/api/v1``), Jobs (``batch/v1``),
  Deployments (``apps/v1``), Namespaces, and of every custom resource whose CRD
  was registered (``crds=`` or :meth:`KubernetesApiDouble.register_crd`), each
  version of it, with the ``status`` subresource where the CRD declares one;
- patches as the client sends them: JSON patch (a list body),
  ``merge-patch+json``, and ``strategic-merge-patch+json`` / ``apply-patch+yaml``
  applied as a merge patch (lists replaced whole; the real server merges some
  lists by key), which custom resources refuse with 415 as the real server does;
- ``GET .../pods/<name>/log`` (``follow=true`` streams until the pod ends), and
  ``?watch=true`` on every list: newline-delimited watch events in a chunked
  response, from ``resourceVersion`` on (or ADDED for what exists, without one),
  ending after ``timeoutSeconds``; ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``, ``status.phase``, and an Event's ``involvedObject.name``,
  ``involvedObject.kind``, ``involvedObject.uid``, ``type``, ``reason``) and ``labelSelector`` (``k=v``,
  ``k!=v``, ``k``, ``!k``) on lists and watches;
- discovery (``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>[/<version>]``);
- errors as ``Status`` bodies (kind Status, reason, code, details): 404 NotFound,
  409 AlreadyExists / Conflict (a stale ``resourceVersion`` on replace),
  422 Invalid, 415 UnsupportedMediaType;
- deletion with ``propagationPolicy`` (query or body): ``Background`` and
  ``Foreground`` delete the dependents (``ownerReferences`` by uid) at once;
  ``Orphan`` leaves them, and so does no policy for a Job (the API's default for
  ``batch/v1`` Jobs, which is why a client must ask for one); ``dryRun=All``.

Validation, before anything is stored: a custom resource against its CRD's
``openAPIV3Schema`` (jsonschema; ``nullable``, ``x-kubernetes-int-or-string`` and
``x-kubernetes-preserve-unknown-fields`` honoured, nulls of non-nullable fields
pruned first as the server does) and core kinds against Kubernetes' own schemas
(``kubernetes-validate``, strict); names must be DNS-1123 (a Job's at most 63
characters). An invalid object gets a 422 ``Invalid`` Status whose message and
``details.causes[].field`` name the field, as the server's do. Unknown fields
are rejected too, like the server under ``fieldValidation=Strict`` (kubectl's
default); ``unknown_fields="prune"`` drops them silently instead.

Everything is recorded in :attr:`KubernetesApiDouble.requests` (method, path,
query, content type, body, status code). :meth:`KubernetesApiDouble.fail` makes
the next matching requests fail with a given code (a 503 blip, a 403 Role gap).

Controllers: the double has no kubelet and no operators; a test plays them.
``api.add_controller(kind, fn)`` calls ``fn(api, event, obj)`` after every
create / replace / patch / delete a *client* makes of that kind (``event`` is
``"ADDED"``, ``"MODIFIED"`` or ``"DELETED"``; ``obj`` a copy of the stored object,
its last state for DELETED), each call on its own thread, so a controller may
take its time (run a workload) while the client watches. ``kind`` is a kind
(``"Job"``), a plural (``"inferenceservices"``) or ``"<Kind>.<group>"``.
A controller moves things along with the double's own methods, which change the
store, bump ``resourceVersion`` and wake watches but call no controller:
:meth:`~KubernetesApiDouble.get`, :meth:`~KubernetesApiDouble.list`,
:meth:`~KubernetesApiDouble.create`, :meth:`~KubernetesApiDouble.update`,
:meth:`~KubernetesApiDouble.set_status`, :meth:`~KubernetesApiDouble.delete`,
:meth:`~KubernetesApiDouble.append_log` and :meth:`~KubernetesApiDouble.event`.
An exception in a controller is kept in ``api.controller_errors`` and raised
again by :meth:`~KubernetesApiDouble.stop`, so a broken controller fails the test.

An InferenceService that becomes Ready, for example::

    def isvc(api, event, obj):
        if event == "DELETED":
            return
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        api.set_status("InferenceService", ns, name, {
            "url": f"http://{name}.{ns}.example.com",
            "conditions": [{"type": "Ready", "status": "True"}],
        })

    api.add_controller("InferenceService", isvc)

A failing one sets ``{"type": "Ready", "status": "False", "reason": ..., "message": ...}``;
a canary rollout sets ``status.components.predictor.traffic`` (``[{"revisionName": ...,
"percent": 10, "tag": "candidate"}, ...]``) first and calls ``set_status`` again, later
(a thread, or the next event), with 100 % on the new revision to promote it.

:func:`job_controller` is the Job controller (a Job makes one Pod, which runs,
then ends Succeeded or Failed with its message; the Job's status and conditions
follow); the test supplies what "running the container" means.
:func:`trainjob_controller` plays Kubeflow Trainer v2 for TrainJobs on a
ClusterTrainingRuntime (register both CRDs): one pod per node, run the same way.
:class:`LLMInferenceServiceController` plays KServe's LLMInferenceService controller
(its workload Deployment rolled out, stuck past its progress deadline, or nothing)
and the vLLM behind its gateway, which answers only the models the rolled-out
generation serves.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

__all__ = ["KubernetesApiDouble", "RecordedRequest", "PodRun", "job_controller", "trainjob_controller",
           "LLMInferenceServiceController"]

Controller = Callable[["KubernetesApiDouble", str, dict], None]

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TERMINAL_PHASES = {"Succeeded", "Failed"}


@dataclass
class _Kind:
    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool = True
    schemas: dict[str, dict] = field(default_factory=dict)
    """openAPIV3Schema by version (custom resources only)."""
    status_subresource: bool = False
    custom: bool = False
    short_names: tuple[str, ...] = ()

    @property
    def storage_version(self) -> str:
        return self.versions[0]

    def api_version(self, version: str | None = None) -> str:
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version

    @property
    def qualified(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


_CORE_KINDS = [
    _Kind("", ("v1",), "pods", "Pod", status_subresource=True),
    _Kind("", ("v1",), "secrets", "Secret"),
    _Kind("", ("v1",), "configmaps", "ConfigMap"),
    _Kind("", ("v1",), "services", "Service", status_subresource=True),
    _Kind("", ("v1",), "events", "Event"),
    _Kind("", ("v1",), "serviceaccounts", "ServiceAccount"),
    _Kind("", ("v1",), "namespaces", "Namespace", namespaced=False, status_subresource=True),
    _Kind("batch", ("v1",), "jobs", "Job", status_subresource=True),
    _Kind("apps", ("v1",), "deployments", "Deployment", status_subresource=True),
]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the double answered."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    status: int


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


@functools.lru_cache(maxsize=32)
def _parse_yaml(path: Path, mtime_ns: int) -> list:
    # CRDs run to megabytes of YAML: parse each once per session, with libyaml when there is one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


def _load_yaml(path: Path) -> list:
    return _parse_yaml(path.resolve(), path.stat().st_mtime_ns)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- patches ------------------------------------------------------------------------------------


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _ApiError(422, "Invalid", f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise _ApiError(422, "Invalid", "JSON patch cannot replace the whole object")
        node = doc
        for part in parts[:-1]:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError):
                raise _ApiError(422, "Invalid", f"JSON patch path {path!r}: {part!r} does not exist") from None
        return node, parts[-1]

    def get(path: str) -> Any:
        node, last = parent(path)
        try:
            return node[int(last)] if isinstance(node, list) else node[last]
        except (KeyError, IndexError, ValueError):
            raise _ApiError(422, "Invalid", f"JSON patch path {path!r} does not exist") from None

    def remove(path: str) -> Any:
        node, last = parent(path)
        try:
            return node.pop(int(last)) if isinstance(node, list) else node.pop(last)
        except (KeyError, IndexError, ValueError):
            raise _ApiError(422, "Invalid", f"JSON patch: cannot remove {path!r}: it does not exist") from None

    def add(path: str, value: Any) -> None:
        node, last = parent(path)
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            add(path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            remove(path)
            add(path, copy.deepcopy(op["value"]))
        elif kind == "move":
            add(path, remove(op["from"]))
        elif kind == "copy":
            add(path, copy.deepcopy(get(op["from"])))
        elif kind == "test":
            if get(path) != op.get("value"):
                raise _ApiError(422, "Invalid", f"JSON patch test failed at {path!r}")
        else:
            raise _ApiError(422, "Invalid", f"JSON patch operation {kind!r} is not one of add, remove, replace, move, copy, test")
    return doc


# -- validation ---------------------------------------------------------------------------------


def _field_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (as CRDs write it) to JSON Schema: ``nullable`` and int-or-string made explicit."""
    if isinstance(node, list):
        return [_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


def _prune(value: Any, schema: Mapping | None, path: list, unknown: list[list]) -> Any:
    """Drop nulls the schema does not allow and collect unknown fields, as the API server's pruning does."""
    if schema is None:
        return value
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-embedded-resource")
        out = {}
        for key, item in value.items():
            if not path and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
                continue
            if props is not None and key in props:
                sub = props[key]
            elif isinstance(extra, dict):
                sub = extra
            elif extra is True or keep_unknown or props is None:
                out[key] = item
                continue
            else:
                unknown.append(path + [key])
                continue
            if item is None and not sub.get("nullable"):
                continue
            out[key] = _prune(item, sub, path + [key], unknown)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(item, schema["items"], path + [i], unknown) for i, item in enumerate(value)]
    return value


def _schema_causes(err) -> list[tuple[str, str]]:
    """A jsonschema error as the API server words it: ``(field, "Required value")`` and the like."""
    path = _field_path(err.absolute_path)
    instance = err.instance
    if err.validator == "required" and isinstance(instance, dict):
        return [
            (_field_path([*err.absolute_path, name]), "Required value")
            for name in err.validator_value if name not in instance
        ]
    if err.validator == "enum":
        supported = ", ".join(json.dumps(v) for v in err.validator_value)
        return [(path, f"Unsupported value: {json.dumps(instance)}: supported values: {supported}")]
    if err.validator == "type":
        kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
            type(instance), "null"
        )
        expected = err.validator_value if isinstance(err.validator_value, str) else err.validator_value[0]
        return [(path, f'Invalid value: "{kind}": {path} in body must be of type {expected}: {json.dumps(instance)}')]
    shown = json.dumps(instance) if not isinstance(instance, (dict, list)) else type(instance).__name__
    return [(path, f"Invalid value: {shown}: {path or 'body'} in body {err.message}")]


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _invalid(kind: _Kind, name: str, causes: list[tuple[str, str]]) -> _ApiError:
    """422 Invalid, worded as the API server words it: ``Kind.group "name" is invalid: field: message``."""
    text = ", ".join(f"{f}: {m}" if f else m for f, m in causes)
    return _ApiError(
        422,
        "Invalid",
        f'{kind.qualified} "{name}" is invalid: {text}',
        {
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes],
        },
    )


# -- the server ---------------------------------------------------------------------------------


class KubernetesApiDouble:
    """An in-memory Kubernetes API server on 127.0.0.1 (an ephemeral port), in a thread.

    ``crds``: CRD YAML files (or parsed CRD dicts) to serve and validate against.
    ``unknown_fields``: ``"reject"`` (422, like ``fieldValidation=Strict``) or ``"prune"``.
    ``validate_core``: check core kinds with ``kubernetes-validate`` when it is installed.
    """

    def __init__(
        self,
        crds: Iterable[Path | str | Mapping] = (),
        *,
        unknown_fields: str = "reject",
        validate_core: bool = True,
        kubernetes_version: str | None = None,
    ):
        if unknown_fields not in ("reject", "prune"):
            raise ValueError(f"unknown_fields must be 'reject' or 'prune', not {unknown_fields!r}")
        self.unknown_fields = unknown_fields
        self._kinds: list[_Kind] = list(copy.deepcopy(_CORE_KINDS))
        self._store: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self._logs: dict[tuple[str, str], list[str]] = {}
        self._log_times: dict[tuple[str, str], list[str]] = {}  # the kubelet's timestamp of each line
        self._log_drops = 0  # bumped by drop_log_streams: following reads end mid-chunk
        self._history: list[tuple[int, tuple[str, str], str, dict]] = []
        self._rv = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._controllers: dict[tuple[str, str], list[Controller]] = {}
        self._validators: dict[tuple[str, str, str], Any] = {}
        self._faults: list[list] = []
        self._controller_threads: list[threading.Thread] = []
        self.controller_errors: list[BaseException] = []
        self.requests: list[RecordedRequest] = []
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._core_validate = None
        if validate_core:
            try:
                import kubernetes_validate
            except ImportError:
                pass
            else:
                version = kubernetes_version or kubernetes_validate.latest_version()
                self._core_validate = lambda obj: kubernetes_validate.validate(obj, version, strict=True)
        for crd in crds:
            self.register_crd(crd)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "KubernetesApiDouble":
        handler = type("_Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="k8s-api-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end open watches and log streams, wait for controllers; raise a controller's error."""
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in list(self._controller_threads):
            thread.join(timeout=30)
        if self.controller_errors:
            first = self.controller_errors[0]
            raise AssertionError(f"a controller of the Kubernetes API double failed: {first!r}") from first

    def __enter__(self) -> "KubernetesApiDouble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``http://127.0.0.1:<port>``, what a ``kubernetes.client.Configuration`` takes as ``host``."""
        if self._server is None:
            raise RuntimeError("start the double first (use it as a context manager, or call start())")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` began: a long controller should give up."""
        return self._stopping

    def configuration(self):
        """A ``kubernetes.client.Configuration`` pointing at this double (no auth, no TLS)."""
        import kubernetes.client

        config = kubernetes.client.Configuration(host=self.host)
        config.verify_ssl = False
        return config

    def api_client(self):
        """A fresh ``kubernetes.client.ApiClient`` for this double; close it (or use ``with``) when done."""
        import kubernetes.client

        return kubernetes.client.ApiClient(self.configuration())

    def kubeconfig(self, namespace: str = "default") -> dict:
        """A kubeconfig (as a dict) for this double, for clients that load one (``KServeClient(config_dict=...)``).

        Loading it with ``kubernetes.config`` and no ``client_configuration`` replaces the
        process-wide default configuration: restore it after the test.
        """
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.host}}],
            "users": [{"name": "double", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double", "namespace": namespace}}],
            "current-context": "double",
        }

    # -- kinds ------------------------------------------------------------------------------------

    def register_crd(self, crd: Path | str | Mapping) -> str:
        """Serve the custom resource a CRD defines (every version); returns its ``<plural>.<group>``."""
        if not isinstance(crd, Mapping):
            docs = copy.deepcopy(_load_yaml(Path(crd)))
            if len(docs) != 1:
                for doc in docs:
                    self.register_crd(doc)
                return ",".join(f"{d['spec']['names']['plural']}.{d['spec']['group']}" for d in docs)
            crd = docs[0]
        spec = crd["spec"]
        versions = [v for v in spec["versions"] if v.get("served", True)]
        # Storage version first: what get/list answer with when asked for none in particular.
        versions.sort(key=lambda v: not v.get("storage", False))
        kind = _Kind(
            group=spec["group"],
            versions=tuple(v["name"] for v in versions),
            plural=spec["names"]["plural"],
            kind=spec["names"]["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            schemas={v["name"]: v["schema"]["openAPIV3Schema"] for v in versions if v.get("schema")},
            status_subresource=any("status" in (v.get("subresources") or {}) for v in versions),
            custom=True,
            short_names=tuple(spec["names"].get("shortNames") or ()),
        )
        with self._lock:
            self._kinds = [k for k in self._kinds if (k.group, k.plural) != (kind.group, kind.plural)] + [kind]
            self._validators = {key: v for key, v in self._validators.items() if key[:2] != (kind.group, kind.plural)}
        return f"{kind.plural}.{kind.group}"

    def _kind(self, name: str) -> _Kind:
        """A kind by ``Kind``, plural, or either with ``.<group>``."""
        base, _, group = name.partition(".")
        found = [
            k for k in self._kinds
            if base in (k.kind, k.plural, k.kind.lower()) and (not group or group == k.group)
        ]
        if len(found) != 1:
            known = ", ".join(sorted(k.qualified for k in self._kinds))
            what = "is ambiguous; add the group" if found else "is not served"
            raise KeyError(f"kind {name!r} {what}; the double serves: {known}")
        return found[0]

    def _route_kind(self, group: str, version: str, plural: str) -> _Kind:
        for k in self._kinds:
            if k.group == group and k.plural == plural:
                if version not in k.versions:
                    break
                return k
        raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({plural}.{group or 'core'} {version})")

    # -- store, for tests and controllers ------------------------------------------------------------

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        """A copy of the stored object, or ``None``."""
        k = self._kind(kind)
        with self._lock:
            obj = self._store.get((k.group, k.plural), {}).get((namespace or "" if k.namespaced else "", name))
            return copy.deepcopy(obj)

    def list(self, kind: str, namespace: str | None = None, labels: Mapping[str, str] | None = None) -> list[dict]:
        """Copies of the stored objects of ``kind`` (in ``namespace``, with ``labels``), by name."""
        k = self._kind(kind)
        with self._lock:
            out = [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self._store.get((k.group, k.plural), {}).items())
                if (namespace is None or ns == namespace)
                and all((o["metadata"].get("labels") or {}).get(lk) == lv for lk, lv in (labels or {}).items())
            ]
        return out

    def create(self, obj: Mapping, namespace: str | None = None) -> dict:
        """Store a new object as a controller would (no validation, no controllers called)."""
        k = self._kind_of(obj)
        return self._create(k, namespace or obj.get("metadata", {}).get("namespace") or "", dict(obj), notify=False)

    def update(self, kind: str, namespace: str | None, name: str, change: Callable[[dict], Any] | Mapping) -> dict:
        """Change a stored object: a merge patch, or a function that edits it in place."""
        k = self._kind(kind)
        with self._lock:
            current = self._get_or_404(k, namespace or "", name)
            if callable(change):
                updated = copy.deepcopy(current)
                change(updated)
            else:
                updated = _merge_patch(current, change)
            return self._put(k, namespace or "", name, updated, "MODIFIED")

    def set_status(self, kind: str, namespace: str | None, name: str, status: Mapping, *, merge: bool = True) -> dict:
        """Set (merge into, by default) the object's ``status``, as its controller would."""
        def apply(obj: dict) -> None:
            obj["status"] = _merge_patch(obj.get("status") or {}, dict(status)) if merge else dict(status)

        return self.update(kind, namespace, name, apply)

    def delete(self, kind: str, namespace: str | None, name: str, propagation: str = "Background") -> dict | None:
        """Delete an object (and its dependents, unless ``Orphan``); ``None`` if it was not there."""
        k = self._kind(kind)
        ns = (namespace or "") if k.namespaced else ""
        with self._lock:
            if (ns, name) not in self._store.get((k.group, k.plural), {}):
                return None
            return self._delete(k, ns, name, propagation, notify=False)

    def append_log(self, namespace: str, pod: str, *lines: str) -> None:
        """Add lines to a pod's log (what ``read_namespaced_pod_log`` returns and ``follow`` streams)."""
        with self._lock:
            self._logs.setdefault((namespace, pod), []).extend(line.rstrip("\n") for line in lines)
            self._log_times.setdefault((namespace, pod), []).extend(_rfc3339_nano(time.time_ns()) for _ in lines)
            self._changed.notify_all()

    def drop_log_streams(self) -> None:
        """Cut every following log read now, mid-chunk, as a proxy or a restarted API server does."""
        with self._lock:
            self._log_drops += 1
            self._changed.notify_all()

    def log(self, namespace: str, pod: str) -> list[str]:
        with self._lock:
            return list(self._logs.get((namespace, pod), []))

    def event(self, involved: Mapping, reason: str, message: str, type: str = "Normal") -> dict:
        """Record a core/v1 Event about ``involved`` (a stored object), as a controller would."""
        meta = involved["metadata"]
        return self.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace", "")},
                "involvedObject": {
                    "apiVersion": involved.get("apiVersion"),
                    "kind": involved.get("kind"),
                    "name": meta["name"],
                    "namespace": meta.get("namespace"),
                    "uid": meta.get("uid"),
                },
                "reason": reason,
                "message": message,
                "type": type,
                "firstTimestamp": _now(),
                "lastTimestamp": _now(),
                "count": 1,
                "source": {"component": "k8s-api-double"},
            }
        )

    def fail(self, method: str, path: str, code: int = 500, times: int = 1, reason: str | None = None) -> None:
        """Answer the next ``times`` requests of ``method`` whose path matches the regex ``path`` with a ``code`` Status.

        For a test of what a client does when the API server has a blip (500, 503), or
        its service account lacks a verb (403).
        """
        reasons = {403: "Forbidden", 404: "NotFound", 409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                   503: "ServiceUnavailable"}
        with self._lock:
            self._faults.append([method.upper(), re.compile(path), code, times, reason or reasons.get(code, "Unknown")])

    def _fault(self, method: str, path: str) -> _ApiError | None:
        with self._lock:
            for fault in self._faults:
                if fault[0] == method and fault[1].search(path) and fault[3] > 0:
                    fault[3] -= 1
                    return _ApiError(fault[2], fault[4], f"injected by the test: {method} {path} -> {fault[2]}")
        return None

    def add_controller(self, kind: str, controller: Controller) -> None:
        """Call ``controller(api, event, obj)`` after each client write of ``kind``; see the module docstring."""
        k = self._kind(kind)
        with self._lock:
            self._controllers.setdefault((k.group, k.plural), []).append(controller)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every change); its value, or AssertionError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the Kubernetes API double: condition not met within {timeout:g} s")
                self._changed.wait(min(left, 0.2))

    # -- internals ----------------------------------------------------------------------------------

    def _kind_of(self, obj: Mapping) -> _Kind:
        group, _, _ = obj.get("apiVersion", "").rpartition("/")
        for k in self._kinds:
            if k.kind == obj.get("kind") and k.group == group:
                return k
        raise KeyError(f"kind {obj.get('kind')!r} of {obj.get('apiVersion')!r} is not served by the double")

    def _get_or_404(self, k: _Kind, namespace: str, name: str) -> dict:
        obj = self._store.get((k.group, k.plural), {}).get((namespace if k.namespaced else "", name))
        if obj is None:
            raise _ApiError(
                404, "NotFound", f'{k.plural}{"." + k.group if k.group else ""} "{name}" not found',
                {"name": name, "group": k.group, "kind": k.plural},
            )
        return obj

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, k: _Kind, event: str, obj: dict) -> None:
        self._history.append((self._rv, (k.group, k.plural), event, copy.deepcopy(obj)))
        self._changed.notify_all()

    def _create(self, k: _Kind, namespace: str, obj: dict, *, notify: bool, dry_run: bool = False) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        with self._lock:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = meta.get("name")
            if not name:
                raise _invalid(k, "", [("metadata.name", "Required value: name or generateName is required")])
            ns = namespace if k.namespaced else ""
            bucket = self._store.setdefault((k.group, k.plural), {})
            if (ns, name) in bucket:
                raise _ApiError(
                    409, "AlreadyExists", f'{k.plural}{"." + k.group if k.group else ""} "{name}" already exists',
                    {"name": name, "group": k.group, "kind": k.plural},
                )
            if k.namespaced:
                meta["namespace"] = ns
            obj.setdefault("apiVersion", k.api_version())
            obj.setdefault("kind", k.kind)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if dry_run:
                meta["resourceVersion"] = str(self._rv)
                return obj
            meta["resourceVersion"] = self._next_rv()
            bucket[(ns, name)] = obj
            self._record(k, "ADDED", obj)
            if notify:
                self._notify(k, "ADDED", obj)
            return copy.deepcopy(obj)

    def _put(self, k: _Kind, namespace: str, name: str, obj: dict, event: str, *, notify: bool = False) -> dict:
        ns = namespace if k.namespaced else ""
        current = self._store[(k.group, k.plural)][(ns, name)]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "namespace", "name"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        if {k2: v for k2, v in obj.items() if k2 not in ("metadata", "status")} != {
            k2: v for k2, v in current.items() if k2 not in ("metadata", "status")
        }:
            meta["generation"] = current["metadata"].get("generation", 1) + 1
        else:
            meta["generation"] = current["metadata"].get("generation", 1)
        meta["resourceVersion"] = self._next_rv()
        self._store[(k.group, k.plural)][(ns, name)] = obj
        self._record(k, event, obj)
        if notify:
            self._notify(k, event, obj)
        return copy.deepcopy(obj)

    def _delete(self, k: _Kind, namespace: str, name: str, propagation: str | None, *, notify: bool) -> dict:
        ns = namespace if k.namespaced else ""
        obj = self._get_or_404(k, ns, name)
        if propagation is None:
            # batch/v1 Jobs orphan their pods unless told otherwise: the API's default, kept for compatibility.
            propagation = "Orphan" if (k.group, k.plural) == ("batch", "jobs") else "Background"
        if propagation not in ("Orphan", "Background", "Foreground"):
            raise _ApiError(400, "BadRequest", f"propagationPolicy {propagation!r} is not one of Orphan, Background, Foreground")
        uid = obj["metadata"]["uid"]
        if propagation != "Orphan":
            for dk in self._kinds:
                for (dns, dname), dep in list(self._store.get((dk.group, dk.plural), {}).items()):
                    if any(ref.get("uid") == uid for ref in dep["metadata"].get("ownerReferences") or ()):
                        self._delete(dk, dns, dname, propagation, notify=False)
        del self._store[(k.group, k.plural)][(ns, name)]
        self._next_rv()
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._record(k, "DELETED", obj)
        if notify:
            self._notify(k, "DELETED", obj)
        return obj

    def _notify(self, k: _Kind, event: str, obj: dict) -> None:
        for controller in self._controllers.get((k.group, k.plural), ()):
            thread = threading.Thread(
                target=self._run_controller, args=(controller, event, copy.deepcopy(obj)),
                name=f"k8s-double-controller-{k.plural}", daemon=True,
            )
            self._controller_threads.append(thread)
            thread.start()

    def _run_controller(self, controller: Controller, event: str, obj: dict) -> None:
        try:
            controller(self, event, obj)
        except BaseException as exc:  # kept, and raised again from stop()
            traceback.print_exc()
            self.controller_errors.append(exc)

    def _validate(self, k: _Kind, version: str, obj: dict) -> dict:
        """The object as it would be stored, or a 422 naming every bad field."""
        name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName") or ""
        expected = k.api_version(version)
        if obj.get("apiVersion") not in (None, expected) or obj.get("kind") not in (None, k.kind):
            raise _ApiError(
                400, "BadRequest",
                f"the API version in the data ({obj.get('apiVersion')}) and kind ({obj.get('kind')}) do not match "
                f"the request's ({expected}, {k.kind})",
            )
        obj = {**obj, "apiVersion": expected, "kind": k.kind}
        causes: list[tuple[str, str]] = []
        meta_name = (obj.get("metadata") or {}).get("name")
        if meta_name:
            if len(meta_name) > 253 or not _DNS1123_SUBDOMAIN.match(meta_name):
                causes.append((
                    "metadata.name",
                    f'Invalid value: "{meta_name}": a lowercase RFC 1123 subdomain must consist of lower case '
                    "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                ))
            elif k.kind == "Job" and len(meta_name) > 63:
                causes.append(("metadata.name", f'Invalid value: "{meta_name}": must be no more than 63 characters'))
        schema = k.schemas.get(version)
        if k.custom and schema is not None:
            unknown: list[list] = []
            obj = _prune(obj, schema, [], unknown)
            if self.unknown_fields == "reject":
                causes += [(_field_path(p), f'Invalid value: unknown field "{_field_path(p)}"') for p in unknown]
            validator = self._schema_validator(k, version)
            for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
                causes += _schema_causes(err)
        elif not k.custom and self._core_validate is not None:
            obj = _drop_nulls(obj)
            import jsonschema

            try:
                self._core_validate({**obj, "metadata": {"name": name or "x", **(obj.get("metadata") or {})}})
            except jsonschema.ValidationError as err:
                path = _field_path(err.absolute_path)
                causes.append((path, f"Invalid value: {err.message}"))
        if causes:
            raise _invalid(k, name, causes)
        return obj

    def _schema_validator(self, k: _Kind, version: str):
        # Built once per kind and version: a CRD's schema runs to thousands of nodes.
        key = (k.group, k.plural, version)
        if key not in self._validators:
            import jsonschema

            self._validators[key] = jsonschema.Draft202012Validator(_to_jsonschema(k.schemas[version]))
        return self._validators[key]

    def _list_body(self, k: _Kind, version: str, items: list[dict]) -> dict:
        return {
            "kind": f"{k.kind}List",
            "apiVersion": k.api_version(version),
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [self._as_version(k, version, o) for o in items],
        }

    @staticmethod
    def _as_version(k: _Kind, version: str, obj: dict) -> dict:
        return {**obj, "apiVersion": k.api_version(version)}

    # -- discovery ------------------------------------------------------------------------------------

    def _resources(self, group: str, version: str) -> dict:
        resources = []
        for k in self._kinds:
            if k.group == group and version in k.versions:
                verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
                resources.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": verbs, "shortNames": list(k.short_names)})
                if k.status_subresource:
                    resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                                      "kind": k.kind, "verbs": ["get", "patch", "update"]})
                if k.plural == "pods":
                    resources.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]})
        if not resources:
            raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({group}/{version})")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    def _groups(self) -> dict:
        groups: dict[str, list[str]] = {}
        for k in self._kinds:
            if k.group:
                for v in k.versions:
                    if v not in groups.setdefault(k.group, []):
                        groups[k.group].append(v)
        return {
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [self._group(g, vs) for g, vs in sorted(groups.items())],
        }

    @staticmethod
    def _group(name: str, versions: list[str]) -> dict:
        gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": gvs, "preferredVersion": gvs[0]}


def _rfc3339_nano(ns: int) -> str:
    # As Go's time.RFC3339Nano writes it (what the kubelet's timestamps=true prefixes): trailing zeros dropped.
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def _flag(value: str | None) -> bool:
    # The Python client writes booleans as Python does ("True"); the server parses either.
    return (value or "").lower() in ("true", "1")


# -- selectors ----------------------------------------------------------------------------------


def _matches(obj: dict, fields: str | None, labels: str | None) -> bool:
    meta = obj.get("metadata") or {}
    for term in filter(None, (fields or "").split(",")):
        key, op, value = re.match(r"^([^!=]+)(==|!=|=)(.*)$", term).groups()
        involved = obj.get("involvedObject") or {}
        actual = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "status.phase": (obj.get("status") or {}).get("phase"),
            "involvedObject.name": involved.get("name"),
            "involvedObject.kind": involved.get("kind"),
            "involvedObject.uid": involved.get("uid"),
            "type": obj.get("type"),
            "reason": obj.get("reason"),
        }.get(key.strip())
        if (actual == value) != (op != "!="):
            return False
    have = meta.get("labels") or {}
    for term in filter(None, (labels or "").split(",")):
        term = term.strip()
        m = re.match(r"^([^!=]+)(==|!=|=)(.*)$", term)
        if m:
            key, op, value = m.groups()
            if (have.get(key.strip()) == value.strip()) != (op != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in have:
                return False
        elif term not in have:
            return False
    return True


# -- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    api: KubernetesApiDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the test output is not the place for an access log
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    # -- plumbing -----------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip() or None
        body: Any = None
        status = 200
        self._request = (method, url.path, query, content_type)
        self._body = None
        self._recorded = False
        try:
            if raw:
                try:
                    body = yaml.safe_load(raw) if content_type == "application/apply-patch+yaml" else json.loads(raw)
                except ValueError as exc:
                    raise _ApiError(400, "BadRequest", f"the request body is not valid JSON: {exc}") from None
            self._body = body
            fault = self.api._fault(method, url.path)
            if fault is not None:
                raise fault
            status = self._dispatch(method, url.path, query, body, content_type)
        except _ApiError as err:
            status = err.code
            self._send_json(err.code, err.status())
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away mid-stream (a watch it stopped)
        except Exception as exc:  # a bug in the double: say so as a Status, not a hang
            traceback.print_exc()
            status = 500
            self._send_json(500, _ApiError(500, "InternalError", f"the double failed: {exc!r}").status())
        finally:
            self._record(status)

    def _record(self, status: int) -> None:
        # Once per request; a stream is recorded when it starts, not when the client lets it go.
        if not self._recorded:
            self._recorded = True
            with self.api._lock:
                self.api.requests.append(RecordedRequest(*self._request, self._body, status))

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        # Recorded before the answer leaves: a client that got it must find the request in `requests`.
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routing ------------------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, query: dict, body: Any, content_type: str | None) -> int:
        api = self.api
        parts = [p for p in path.split("/") if p]
        if parts == ["version"]:
            self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-double", "platform": "linux/amd64"})
            return 200
        if parts == ["api"]:
            self._send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            return 200
        if parts == ["apis"]:
            self._send_json(200, api._groups())
            return 200
        if parts and parts[0] == "apis" and len(parts) == 2:
            groups = {g["name"]: g for g in api._groups()["groups"]}
            if parts[1] not in groups:
                raise _ApiError(404, "NotFound", f"the server could not find the requested resource (group {parts[1]})")
            self._send_json(200, groups[parts[1]])
            return 200
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if not rest:
            self._send_json(200, api._resources(group, version))
            return 200
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, plural, name, sub = rest[1], rest[2], (rest[3:4] or [None])[0], (rest[4:5] or [None])[0]
        else:
            namespace, plural, name, sub = None, rest[0], (rest[1:2] or [None])[0], (rest[2:3] or [None])[0]
        k = api._route_kind(group, version, plural)
        if k.namespaced is False:
            namespace = ""
        elif namespace is None and method != "GET":
            raise _ApiError(405, "MethodNotAllowed", f"{plural} are namespaced: use /namespaces/<namespace>/{plural}")
        if sub not in (None, "status", "log") or (sub == "status" and not k.status_subresource) or (
            sub == "log" and k.plural != "pods"
        ):
            raise _ApiError(404, "NotFound", f"the server could not find the requested resource ({plural}/{sub})")
        dry_run = query.get("dryRun") == "All"

        if method == "GET" and name is None:
            return self._list(k, version, namespace, query)
        if method == "GET" and sub == "log":
            return self._log(namespace, name, query)
        if method == "GET":
            with api._lock:
                obj = api._get_or_404(k, namespace, name)
                self._send_json(200, api._as_version(k, version, obj))
            return 200
        if method == "POST" and name is None:
            if not isinstance(body, dict):
                raise _ApiError(400, "BadRequest", "the request body must be an object")
            body_ns = (body.get("metadata") or {}).get("namespace")
            if k.namespaced and body_ns and body_ns != namespace:
                raise _ApiError(
                    400, "BadRequest", f"the namespace of the object ({body_ns}) does not match the namespace on the request ({namespace})"
                )
            if k.status_subresource:
                body = {key: v for key, v in body.items() if key != "status"}  # a client cannot create a status
            obj = api._validate(k, version, body)
            created = api._create(k, namespace, obj, notify=not dry_run, dry_run=dry_run)
            self._send_json(201, api._as_version(k, version, created))
            return 201
        if method in ("PUT", "PATCH") and name is not None:
            return self._update(k, version, namespace, name, sub, body, content_type, method, dry_run)
        if method == "DELETE" and name is not None:
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
            if (body or {}).get("orphanDependents") is True:
                policy = "Orphan"
            with api._lock:
                if dry_run:
                    gone = copy.deepcopy(api._get_or_404(k, namespace, name))
                else:
                    gone = api._delete(k, namespace, name, policy, notify=True)
            if k.plural == "pods" or k.custom:
                self._send_json(200, api._as_version(k, version, gone))
            else:
                self._send_json(200, {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": k.group, "kind": k.plural, "uid": gone["metadata"]["uid"]},
                })
            return 200
        raise _ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _update(self, k: _Kind, version: str, namespace: str, name: str, sub: str | None, body: Any,
                content_type: str | None, method: str, dry_run: bool) -> int:
        api = self.api
        with api._lock:
            current = copy.deepcopy(api._get_or_404(k, namespace, name))
            current = api._as_version(k, version, current)
            if method == "PUT":
                if not isinstance(body, dict):
                    raise _ApiError(400, "BadRequest", "the request body must be an object")
                sent_rv = (body.get("metadata") or {}).get("resourceVersion")
                if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                    raise _ApiError(
                        409, "Conflict",
                        f'Operation cannot be fulfilled on {k.plural}{"." + k.group if k.group else ""} "{name}": '
                        "the object has been modified; please apply your changes to the latest version and try again",
                        {"name": name, "group": k.group, "kind": k.plural},
                    )
                updated = copy.deepcopy(body)
            elif isinstance(body, list) or content_type == "application/json-patch+json":
                if not isinstance(body, list):
                    raise _ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                updated = _json_patch(current, body)
            elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                                  "application/apply-patch+yaml"):
                if k.custom and content_type == "application/strategic-merge-patch+json":
                    raise _ApiError(
                        415, "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    )
                updated = _merge_patch(current, body)
            else:
                raise _ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
            # The main resource ignores status changes, the status subresource everything else (when it exists).
            if k.status_subresource:
                if sub == "status":
                    updated = {**current, "status": updated.get("status"), "metadata": {**current["metadata"], **{
                        key: v for key, v in (updated.get("metadata") or {}).items() if key in ("labels", "annotations")
                    }}}
                elif "status" in current:
                    updated["status"] = current["status"]
                else:
                    updated.pop("status", None)
            updated = api._validate(k, version, updated)
            if dry_run:
                self._send_json(200, updated)
                return 200
            stored = api._put(k, namespace, name, updated, "MODIFIED", notify=sub is None)
            self._send_json(200, api._as_version(k, version, stored))
        return 200

    def _list(self, k: _Kind, version: str, namespace: str | None, query: dict) -> int:
        api = self.api
        fields, labels = query.get("fieldSelector"), query.get("labelSelector")

        def selected(obj: dict) -> bool:
            ns = obj["metadata"].get("namespace", "")
            return (namespace in (None, "") or ns == namespace) and _matches(obj, fields, labels)

        if not _flag(query.get("watch")):
            with api._lock:
                items = [o for _, o in sorted(api._store.get((k.group, k.plural), {}).items()) if selected(o)]
                self._send_json(200, api._list_body(k, version, items))
            return 200

        timeout = float(query.get("timeoutSeconds") or 3600)
        deadline = time.monotonic() + timeout
        since = query.get("resourceVersion") or ""
        self._start_stream("application/json")
        with api._lock:
            if since in ("", "0"):
                pending = [("ADDED", o) for _, o in sorted(api._store.get((k.group, k.plural), {}).items()) if selected(o)]
                cursor = len(api._history)
            else:
                cursor = next((i for i, h in enumerate(api._history) if h[0] > int(since)), len(api._history))
                pending = []
        while True:
            for event, obj in pending:
                line = json.dumps({"type": event, "object": api._as_version(k, version, obj)}).encode() + b"\n"
                self._chunk(line)
            with api._changed:
                pending = []
                while not pending:
                    if api._stopping or time.monotonic() >= deadline:
                        break
                    new = api._history[cursor:]
                    cursor = len(api._history)
                    pending = [(ev, o) for _, key, ev, o in new if key == (k.group, k.plural) and selected(o)]
                    if not pending:
                        api._changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if not pending:
                break
        self._end_stream()
        return 200

    def _log(self, namespace: str, name: str, query: dict) -> int:
        api = self.api
        pods = api._kind("Pod")
        stamped = _flag(query.get("timestamps"))

        def text(lines: list[str], first: int) -> bytes:
            times = api._log_times.get((namespace, name), [])[first:]
            return "".join((f"{t} " if stamped else "") + line + "\n" for t, line in zip(times, lines, strict=True)).encode()

        with api._lock:
            api._get_or_404(pods, namespace, name)
            lines = list(api._logs.get((namespace, name), []))
            drops, total = api._log_drops, len(lines)
        if not _flag(query.get("follow")):
            tail = query.get("tailLines")
            if tail is not None:
                lines = lines[-int(tail):] if int(tail) else []
            data = text(lines, total - len(lines))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return 200
        self._start_stream("text/plain")
        sent = 0
        while True:
            with api._changed:
                lines = api._logs.get((namespace, name), [])
                new = lines[sent:]
                pod = api._store.get(("", "pods"), {}).get((namespace, name))
                done = api._stopping or pod is None or (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES
                if api._log_drops != drops:
                    self.wfile.write(b"ff\r\ncut")  # a chunk that never ends, then the connection goes
                    self.wfile.flush()
                    return 200
                if not new and not done:
                    api._changed.wait(0.5)
                    continue
                data = text(new, sent)
            if new:
                sent += len(new)
                self._chunk(data)
            elif done:
                break
        self._end_stream()
        return 200


# -- the Job controller ---------------------------------------------------------------------------


@dataclass
class PodRun:
    """What a Job's pod runs, handed to the test's ``run`` function by :func:`job_controller`."""

    api: KubernetesApiDouble
    pod: dict
    """The Pod as stored (its spec is the Job's template)."""
    command: list[str]
    """The first container's ``command`` + ``args``."""
    env: dict[str, str]
    """The first container's environment, ``secretKeyRef`` / ``configMapKeyRef`` resolved from the double's store."""
    stopped: threading.Event
    """Set when the pod (or its Job) is deleted: stop the work and return."""

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    def log(self, *lines: str) -> None:
        """Append lines to the pod's log."""
        self.api.append_log(self.namespace, self.name, *lines)


def _resolve_env(api: KubernetesApiDouble, namespace: str, container: dict) -> dict[str, str]:
    """The container's env as the kubelet builds it; a missing Secret or key fails like it does."""
    env: dict[str, str] = {}
    for item in container.get("env") or ():
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            ref = source.get(ref_key)
            if ref is None:
                continue
            obj = api.get(kind, namespace, ref["name"])
            data = (obj or {}).get("data") or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    break
                what = "not found" if obj is None else f"has no key {ref['key']!r}"
                raise RuntimeError(f'{kind.lower()} "{ref["name"]}" {what}')
            value = data[ref["key"]]
            if kind == "Secret":
                import base64

                value = base64.b64decode(value).decode()
            env[item["name"]] = value
    return env


def job_controller(run: Callable[[PodRun], int | tuple[int, str]]) -> Controller:
    """The Job controller and kubelet, with ``run`` standing in for the container.

    On a new Job: one Pod (``<job>-<suffix>``, labels ``job-name`` and
    ``controller-uid``, owned by the Job) goes Pending, then Running, and
    ``run(PodRun)`` is called; it returns the container's exit code, or
    ``(exit_code, termination_message)``. Exit 0: the Pod Succeeded and the Job
    gets ``succeeded: 1`` and a ``Complete`` condition. Otherwise the Pod Failed
    (its container terminated with reason ``Error`` and the message) and the Job
    gets ``failed: 1`` and a ``Failed`` condition (reason ``BackoffLimitExceeded``);
    one pod only, whatever ``backoffLimit`` says. A missing Secret behind a
    ``secretKeyRef`` leaves the Pod Pending with ``CreateContainerConfigError``
    until it is deleted. Deleting the Job or the Pod sets ``PodRun.stopped``.
    """

    def controller(api: KubernetesApiDouble, event: str, job: dict) -> None:
        if event != "ADDED":
            return
        try:
            _run_job(api, job, run)
        except _ApiError as err:
            if err.code != 404:  # the Job or its Pod was deleted while it ran: nothing left to report
                raise

    return controller


def _run_job(api: KubernetesApiDouble, job: dict, run: Callable[[PodRun], int | tuple[int, str]]) -> None:
    meta = job["metadata"]
    ns, job_name, uid = meta["namespace"], meta["name"], meta["uid"]
    template = copy.deepcopy(job["spec"]["template"])
    labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": job_name,
              "batch.kubernetes.io/job-name": job_name, "controller-uid": uid}
    pod = api.create({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{uuid.uuid4().hex[:5]}",
            "namespace": ns,
            "labels": labels,
            "annotations": (template.get("metadata") or {}).get("annotations", {}),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": template["spec"],
        "status": {"phase": "Pending"},
    })
    pod_name = pod["metadata"]["name"]
    api.event(job, "SuccessfulCreate", f"Created pod: {pod_name}")
    api.set_status("Job", ns, job_name, {"active": 1, "startTime": _now(), "ready": 0})
    container = template["spec"]["containers"][0]
    stopped = threading.Event()

    def gone() -> bool:
        return api.get("Pod", ns, pod_name) is None or api.get("Job", ns, job_name) is None

    watcher = threading.Thread(target=lambda: api.wait_for(lambda: gone() or api.stopping, 3600) and stopped.set(),
                               daemon=True)
    watcher.start()
    try:
        env = _resolve_env(api, ns, container)
    except RuntimeError as exc:
        status = {"name": container["name"], "ready": False, "restartCount": 0, "image": container.get("image", ""), "imageID": "",
                  "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}
        api.set_status("Pod", ns, pod_name, {"phase": "Pending", "containerStatuses": [status]})
        api.event(pod, "Failed", f"Error: {exc}", type="Warning")
        return
    api.event(pod, "Started", f"Started container {container['name']}")
    api.set_status("Pod", ns, pod_name, {
        "phase": "Running", "startTime": _now(),
        "containerStatuses": [{"name": container["name"], "ready": True, "restartCount": 0,
                               "image": container.get("image", ""), "imageID": "", "state": {"running": {"startedAt": _now()}}}],
    })
    outcome = run(PodRun(api, pod, [*container.get("command", []), *container.get("args", [])], env, stopped))
    code, message = outcome if isinstance(outcome, tuple) else (outcome, "")
    if gone():
        return
    phase = "Succeeded" if code == 0 else "Failed"
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": _now()}
    if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        # The kubelet's fallback: the log's last 80 lines (at most 2048 bytes) stand in for the message.
        message = "\n".join(api.log(ns, pod_name)[-80:])[-2048:]
    if message:
        terminated["message"] = message
    api.set_status("Pod", ns, pod_name, {
        "phase": phase,
        "containerStatuses": [{"name": container["name"], "ready": False, "restartCount": 0,
                               "image": container.get("image", ""), "imageID": "", "state": {"terminated": terminated}}],
    }, merge=False)
    condition = (
        {"type": "Complete", "status": "True", "lastTransitionTime": _now()}
        if code == 0
        else {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit", "lastTransitionTime": _now()}
    )
    api.set_status("Job", ns, job_name, {
        "active": 0, "ready": 0, "completionTime" if code == 0 else "failedAt": _now(),
        "succeeded" if code == 0 else "failed": 1, "conditions": [condition],
    })
    if code != 0:
        api.event(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit", type="Warning")


# -- the TrainJob controller (Kubeflow Trainer v2: trainer.kubeflow.org) ---------------------------------
# The trainjob engine's block: TrainJob and ClusterTrainingRuntime are served from their CRDs
# (shared/crds/trainer.kubeflow.org_*.yaml, registered by the test); this plays the Trainer's controller,
# JobSet and the kubelet for them.

_TRAINER_STEP = "trainer.kubeflow.org/trainjob-ancestor-step"
_JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
_JOBSET_RJOB = "jobset.sigs.k8s.io/replicatedjob-name"
_JOB_INDEX = "batch.kubernetes.io/job-completion-index"


def trainjob_controller(run: Callable[[PodRun], int | tuple[int, str]]) -> Controller:
    """The Trainer v2 controller, JobSet and kubelet for TrainJobs, with ``run`` standing in for each node's container.

    On a new TrainJob: its ClusterTrainingRuntime (``spec.runtimeRef.name``) gives
    the pod template of the replicated job labelled ``trainjob-ancestor-step:
    trainer``; the TrainJob's ``spec.trainer`` overrides its container's image,
    command, args, env (merged by name) and resources, and each ``runtimePatches``
    entry is applied to it (pod labels and annotations, service account, node
    selector, tolerations, pull secrets, volumes; the container's env, security
    context and mounts). ``numNodes`` (the trainer's, else the runtime's
    ``mlPolicy``) pods are created, owned by the TrainJob, labelled as JobSet labels
    them (``jobset-name``, ``replicatedjob-name``, ``job-completion-index``). With a
    torch ``mlPolicy`` each gets the torch plugin's ``PET_NNODES``,
    ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
    ``PET_MASTER_PORT`` (every node runs on this machine: 127.0.0.1 and a free port).
    Each node runs as :func:`job_controller`'s pod does (``run(PodRun)``; a missing
    Secret leaves it Pending with ``CreateContainerConfigError``); when one fails,
    the others are stopped, as JobSet's failure policy does. The TrainJob then gets
    ``Complete`` (reason ``AllJobsCompleted``) or ``Failed`` (reason ``FailedJobs``),
    the JobSet's reasons the Trainer copies, and ``jobsStatus``. A TrainJob whose
    runtime does not exist gets ``Failed`` (``TrainingRuntimeNotSupported``). Deleting
    the TrainJob deletes its pods (owner references), which stops them.
    """

    def controller(api: KubernetesApiDouble, event: str, trainjob: dict) -> None:
        if event != "ADDED":
            return
        try:
            _run_trainjob(api, trainjob, run)
        except _ApiError as err:
            if err.code != 404:  # the TrainJob was deleted while it ran: nothing left to report
                raise

    return controller


def _trainjob_condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()}


def _node_template(api: KubernetesApiDouble, trainjob: dict) -> tuple[dict, dict, str] | None:
    """``(pod template, mlPolicy, replicated job name)`` of the trainer step, the TrainJob's overrides and patches applied."""
    spec = trainjob["spec"]
    runtime = api.get("ClusterTrainingRuntime", None, spec["runtimeRef"]["name"])
    if runtime is None:
        return None
    rjobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    rjob = next((r for r in rjobs if (r["template"].get("metadata") or {}).get("labels", {}).get(_TRAINER_STEP) == "trainer"),
                next(r for r in rjobs if r["name"] == "node"))
    template = copy.deepcopy(rjob["template"]["spec"]["template"])
    template.setdefault("metadata", {})
    pod = template["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "node")
    trainer = spec.get("trainer") or {}
    for field_name, key in (("image", "image"), ("command", "command"), ("args", "args"), ("resourcesPerNode", "resources")):
        if field_name in trainer:
            container[key] = copy.deepcopy(trainer[field_name])
    _merge_named(container, "env", trainer.get("env"))
    for patch in spec.get("runtimePatches") or ():
        for rpatch in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get("replicatedJobs") or ():
            if rpatch["name"] != rjob["name"]:
                continue
            ptemplate = ((rpatch.get("template") or {}).get("spec") or {}).get("template") or {}
            for key in ("labels", "annotations"):
                template["metadata"].setdefault(key, {}).update((ptemplate.get("metadata") or {}).get(key) or {})
            pspec = ptemplate.get("spec") or {}
            for key in ("serviceAccountName", "securityContext", "affinity"):
                if key in pspec:
                    pod[key] = copy.deepcopy(pspec[key])
            pod.setdefault("nodeSelector", {}).update(pspec.get("nodeSelector") or {})
            for key in ("tolerations", "imagePullSecrets", "volumes"):
                pod[key] = [*pod.get(key, []), *copy.deepcopy(pspec.get(key) or [])]
            for cpatch in pspec.get("containers") or ():
                target = next((c for c in pod["containers"] if c["name"] == cpatch["name"]), None)
                if target is None:
                    continue
                _merge_named(target, "env", cpatch.get("env"))
                _merge_named(target, "volumeMounts", cpatch.get("volumeMounts"))
                if "securityContext" in cpatch:
                    target["securityContext"] = copy.deepcopy(cpatch["securityContext"])
    for key in ("nodeSelector", "tolerations", "imagePullSecrets", "volumes"):
        if not pod.get(key):
            pod.pop(key, None)
    return template, runtime["spec"].get("mlPolicy") or {}, rjob["name"]


def _merge_named(holder: dict, key: str, items: list | None) -> None:
    """Merge ``items`` into ``holder[key]`` by ``name`` (a later item replaces one of the same name)."""
    if not items:
        return
    merged = {i["name"]: i for i in holder.get(key) or ()}
    merged.update({i["name"]: copy.deepcopy(i) for i in items})
    holder[key] = list(merged.values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_trainjob(api: KubernetesApiDouble, trainjob: dict, run: Callable[[PodRun], int | tuple[int, str]]) -> None:
    meta = trainjob["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    resolved = _node_template(api, trainjob)
    if resolved is None:
        api.set_status("TrainJob", ns, name, {"conditions": [_trainjob_condition(
            "Failed", "TrainingRuntimeNotSupported",
            f"ClusterTrainingRuntime {trainjob['spec']['runtimeRef']['name']!r} was not found")]})
        return
    template, ml_policy, rjob = resolved
    trainer = trainjob["spec"].get("trainer") or {}
    nodes = int(trainer.get("numNodes") or ml_policy.get("numNodes") or 1)
    torch_policy = ml_policy.get("torch")
    procs = trainer.get("numProcPerNode") or (torch_policy or {}).get("numProcPerNode") or 1
    port = _free_port()
    pods = []
    for index in range(nodes):
        pod_template = copy.deepcopy(template)
        if torch_policy is not None:
            container = next(c for c in pod_template["spec"]["containers"] if c["name"] == "node")
            _merge_named(container, "env", [
                {"name": "PET_NNODES", "value": str(nodes)}, {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
                {"name": "PET_NODE_RANK", "value": str(index)}, {"name": "PET_MASTER_ADDR", "value": "127.0.0.1"},
                {"name": "PET_MASTER_PORT", "value": str(port)},
            ])
        labels = {**pod_template["metadata"].get("labels", {}), _JOBSET_NAME: name, _JOBSET_RJOB: rjob,
                  _JOB_INDEX: str(index), _TRAINER_STEP: "trainer"}
        pods.append(api.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{name}-{rjob}-0-{index}-{uuid.uuid4().hex[:5]}", "namespace": ns, "labels": labels,
                "annotations": pod_template["metadata"].get("annotations", {}),
                "ownerReferences": [{"apiVersion": trainjob["apiVersion"], "kind": "TrainJob", "name": name, "uid": uid,
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": pod_template["spec"],
            "status": {"phase": "Pending"},
        }))
    api.event(trainjob, "Created", f"Created JobSet {ns}/{name} with {nodes} node(s) on {trainjob['spec']['runtimeRef']['name']}")
    api.set_status("TrainJob", ns, name, {"jobsStatus": [
        {"name": rjob, "active": nodes, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]})
    stop_all = threading.Event()
    codes: list[int | None] = [None] * nodes
    threads = [threading.Thread(target=lambda i=i, p=p: codes.__setitem__(i, _run_node(api, name, p, run, stop_all)),
                                daemon=True) for i, p in enumerate(pods)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if api.get("TrainJob", ns, name) is None or any(c is None for c in codes):
        return
    failed = sum(c != 0 for c in codes)
    condition = (_trainjob_condition("Failed", "FailedJobs", "jobset failed due to one or more job failures") if failed
                 else _trainjob_condition("Complete", "AllJobsCompleted", "jobset completed successfully"))
    api.set_status("TrainJob", ns, name, {
        "conditions": [condition],
        "jobsStatus": [{"name": rjob, "active": 0, "ready": 0, "succeeded": 0 if failed else 1, "failed": 1 if failed else 0,
                        "suspended": 0}],
    })
    if failed:
        api.event(trainjob, "Failed", "jobset failed due to one or more job failures", type="Warning")


def _run_node(api: KubernetesApiDouble, trainjob: str, pod: dict, run: Callable[[PodRun], int | tuple[int, str]],
              stop_all: threading.Event) -> int | None:
    """One node's pod to its end, as the kubelet runs it: its exit code, ``None`` if it was deleted or never started."""
    ns, pod_name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
    stopped = threading.Event()

    def gone() -> bool:
        return api.get("Pod", ns, pod_name) is None or api.get("TrainJob", ns, trainjob) is None

    threading.Thread(target=lambda: api.wait_for(lambda: gone() or api.stopping or stop_all.is_set(), 3600) and stopped.set(),
                     daemon=True).start()
    status = {"name": "node", "ready": False, "restartCount": 0, "image": container.get("image", ""), "imageID": ""}
    try:
        env = _resolve_env(api, ns, container)
    except RuntimeError as exc:
        api.set_status("Pod", ns, pod_name, {"phase": "Pending", "containerStatuses": [
            {**status, "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]})
        api.event(pod, "Failed", f"Error: {exc}", type="Warning")
        return None
    api.event(pod, "Started", "Started container node")
    api.set_status("Pod", ns, pod_name, {"phase": "Running", "startTime": _now(), "containerStatuses": [
        {**status, "ready": True, "state": {"running": {"startedAt": _now()}}}]})
    outcome = run(PodRun(api, pod, [*container.get("command", []), *container.get("args", [])], env, stopped))
    code, message = outcome if isinstance(outcome, tuple) else (outcome, "")
    if code != 0:
        stop_all.set()  # JobSet's failure policy: one failed node fails the set, the others are stopped
    if gone():
        return None
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": _now()}
    if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = "\n".join(api.log(ns, pod_name)[-80:])[-2048:]
    if message:
        terminated["message"] = message
    api.set_status("Pod", ns, pod_name, {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
        {**status, "state": {"terminated": terminated}}]}, merge=False)
    return code


# -- LLMInferenceService (KServe's LLM controller) -------------------------------------------------
# Own block: what plays KServe's LLMInferenceService controller and the vLLM pods behind its gateway.


class LLMInferenceServiceController:
    """Plays KServe's LLMInferenceService controller (``serving.kserve.io/v1alpha2``) and the vLLM behind it.

    Register it with ``api.add_controller("LLMInferenceService", controller)``. For
    each generation a client writes it does what KServe's controller does: the
    workload Deployment ``<name>-kserve`` (owned by the service, so a Foreground
    delete takes it along) gets the pod template, then its status and the
    service's follow ``outcome``:

    - ``"ready"``: the Deployment rolled out (every replica updated and available,
      ``Progressing`` ``NewReplicaSetAvailable``); the service's conditions
      ``PresetsCombined``, ``MainWorkloadReady``, ``WorkloadsReady``, ``RouterReady``
      (and the scheduler's) and ``Ready`` True, ``status.url`` and ``addresses``
      this object's loopback OpenAI server, which from then on serves the
      generation's models: ``spec.model.name`` and every ``spec.model.lora.adapters``
      name;
    - ``"fail"``: the new pods never become available and the Deployment's
      ``Progressing`` turns False with ``ProgressDeadlineExceeded``. As on a cluster,
      an update leaves the old pods serving, so the service stays ``Ready`` (its
      ``MainWorkloadReady`` mirrors the Deployment's ``Available``), and the old
      models keep answering; a first deploy is ``Ready`` False with
      ``MinimumReplicasUnavailable``;
    - ``"never"``: nothing happens (a controller that is down, a rollout that hangs).

    The OpenAI server answers ``POST /v1/completions`` for a served model (404 with
    vLLM's error body for any other; 500 while ``failing``) and ``GET /v1/models``;
    ``requests`` lists the model each completion named. Use it as a context manager,
    or call :meth:`close`.
    """

    PRESET_IMAGE = "registry.redhat.io/rhoai/odh-vllm-cuda-rhel9:v3.4.0"
    """The image the platform's preset gives the ``main`` container when the template names none."""

    def __init__(self, outcome: str = "ready"):
        self.outcome = outcome
        self.failing = False
        self.requests: list[str] = []
        self.served: dict[tuple[str, str], list[str]] = {}
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._http.serve_forever, daemon=True, name="llmisvc-openai").start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def __enter__(self) -> "LLMInferenceServiceController":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def models(self) -> list[str]:
        return sorted({m for names in self.served.values() for m in names})

    def __call__(self, api: KubernetesApiDouble, event: str, obj: dict) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if event == "DELETED":
            self.served.pop(key, None)
            return
        if self.outcome == "never":
            return
        deployment = self._deployment(api, obj)
        if api.get("LLMInferenceService", *key)["metadata"]["generation"] != meta["generation"]:
            return  # a newer generation was written meanwhile: its own call reconciles it
        if self.outcome == "fail":
            self._fail(api, obj, deployment, had_pods=key in self.served)
        else:
            self._ready(api, obj, deployment)
            model = obj["spec"]["model"]
            self.served[key] = [model.get("name") or meta["name"]] + [
                a["name"] for a in (model.get("lora") or {}).get("adapters") or []
            ]

    def _deployment(self, api: KubernetesApiDouble, svc: dict) -> dict:
        meta, spec = svc["metadata"], svc["spec"]
        name, ns = f"{meta['name']}-kserve", meta["namespace"]
        labels = {"app.kubernetes.io/component": "llminferenceservice-workload", "app.kubernetes.io/name": meta["name"],
                  "app.kubernetes.io/part-of": "llminferenceservice"}  # fmt: skip
        template = copy.deepcopy(spec.get("template") or {"containers": [{"name": "main"}]})
        for container in template.get("containers") or []:
            container.setdefault("image", self.PRESET_IMAGE)
        body = {"replicas": spec.get("replicas", 1), "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": template}}  # fmt: skip
        if api.get("Deployment", ns, name) is None:
            return api.create({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [{
                    "apiVersion": svc["apiVersion"], "kind": "LLMInferenceService", "name": meta["name"],
                    "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
                "spec": body,
            })  # fmt: skip
        return api.update("Deployment", ns, name, {"spec": body})

    def _ready(self, api: KubernetesApiDouble, svc: dict, deployment: dict) -> None:
        meta, n = svc["metadata"], deployment["spec"]["replicas"]
        api.set_status("Deployment", meta["namespace"], deployment["metadata"]["name"], {
            "observedGeneration": deployment["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
            "readyReplicas": n, "availableReplicas": n,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability."},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": f'ReplicaSet "{deployment["metadata"]["name"]}-{meta["generation"]:x}" has successfully progressed.'},
            ],
        }, merge=False)  # fmt: skip
        scheduler = "scheduler" in (svc["spec"].get("router") or {})
        types = ["PresetsCombined", "MainWorkloadReady", "WorkloadsReady", "HTTPRoutesReady", "GatewaysReady",
                 *(["InferencePoolReady", "SchedulerWorkloadReady"] if scheduler else []), "RouterReady", "Ready"]  # fmt: skip
        api.set_status("LLMInferenceService", meta["namespace"], meta["name"], {
            "observedGeneration": meta["generation"], "url": self.url,
            "addresses": [{"url": self.url}],
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()} for t in types],
        }, merge=False)  # fmt: skip

    def _fail(self, api: KubernetesApiDouble, svc: dict, deployment: dict, had_pods: bool) -> None:
        meta, n = svc["metadata"], deployment["spec"]["replicas"]
        rs = f'{deployment["metadata"]["name"]}-{meta["generation"]:x}'
        available = {"type": "Available", "status": "True" if had_pods else "False",
                     "reason": "MinimumReplicasAvailable" if had_pods else "MinimumReplicasUnavailable",
                     "message": "Deployment has minimum availability." if had_pods
                     else "Deployment does not have minimum availability."}  # fmt: skip
        api.set_status("Deployment", meta["namespace"], deployment["metadata"]["name"], {
            "observedGeneration": deployment["metadata"]["generation"], "replicas": n + (n if had_pods else 0),
            "updatedReplicas": n, "readyReplicas": n if had_pods else 0, "availableReplicas": n if had_pods else 0,
            "unavailableReplicas": n,
            "conditions": [available, {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                       "message": f'ReplicaSet "{rs}" has timed out progressing.'}],
        }, merge=False)  # fmt: skip
        main = {"type": "MainWorkloadReady", "status": available["status"], "lastTransitionTime": _now()}
        if not had_pods:
            main.update(reason=available["reason"], message=available["message"])
        ready = {**main, "type": "Ready"}
        api.set_status("LLMInferenceService", meta["namespace"], meta["name"], {
            "observedGeneration": meta["generation"],
            **({"url": self.url, "addresses": [{"url": self.url}]} if had_pods else {}),
            "conditions": [{"type": "PresetsCombined", "status": "True"}, main, {**main, "type": "WorkloadsReady"},
                           {"type": "RouterReady", "status": "True"}, ready],
        }, merge=False)  # fmt: skip

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._answer(404, {"detail": "Not Found"})
                self._answer(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models()]})

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/completions":
                    return self._answer(404, {"detail": "Not Found"})
                model = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}").get("model")
                outer.requests.append(model)
                if outer.failing:
                    return self._answer(500, {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}})
                if model not in outer.models():
                    return self._answer(404, {"error": {"message": f"The model `{model}` does not exist.",
                                                        "type": "NotFoundError", "code": 404}})  # fmt: skip
                self._answer(200, {"object": "text_completion", "model": model,
                                   "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}]})  # fmt: skip

        return Handler
