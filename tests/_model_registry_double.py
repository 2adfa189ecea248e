"""A loopback Kubeflow Model Registry for tests: the REST paths the ``model-registry`` client uses.

It serves ``/api/model_registry/v1alpha3`` on ``127.0.0.1`` (a free port) as the
registry's REST server does, from ``../shared/openapi/model-registry.yaml``:
every request is matched to the spec's operation, its body is checked against
the operation's request schema (a body the real server would refuse is answered
400), and every answer against the schema the spec gives for its status before
it is sent. An answer that breaks the spec is recorded in ``violations`` (and
answered 500), so a test can assert the double stayed within the contract.

Names are scoped as the real server scopes them: a version's name within its
registered model, an artifact's within its version. A bearer token, when given,
is required on every request (401 otherwise), as OpenShift's proxy in front of
the registry requires one. ``fail_next`` queues statuses to answer instead of
the next requests (an unavailable registry: 503).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from openapi_schema_validator import OAS30Validator

__all__ = ["RegistryDouble", "model_registry_server", "SPEC", "check_schema"]

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "openapi" / "model-registry.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
_PREFIX = "/api/model_registry/v1alpha3"


def check_schema(schema: dict[str, Any], instance: Any) -> list[str]:
    """Where ``instance`` breaks ``schema`` (a schema of the spec, its ``$ref``s resolved in the spec), one line each."""
    validator = OAS30Validator({**schema, "components": SPEC["components"]})
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}" for e in validator.iter_errors(instance)]


def _operations() -> list[tuple[str, re.Pattern, dict[str, Any]]]:
    ops = []
    for path, item in SPEC["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(path)) + "$")
        for method in ("get", "post", "patch", "put", "delete"):
            if method in item:
                ops.append((method.upper(), pattern, item[method]))
    return ops


_OPERATIONS = _operations()


def _response_schema(operation: dict[str, Any], status: int) -> dict[str, Any] | None:
    response = operation["responses"].get(str(status))
    if response is None:
        return None
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response["content"]["application/json"]["schema"]


def _request_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    body = operation.get("requestBody")
    return body["content"]["application/json"]["schema"] if body else None


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    status: int
    auth: str | None


@dataclass
class RegistryDouble:
    """A running loopback registry: its address, what it holds, and every request it answered."""

    url: str = ""
    token: str | None = None
    registered_models: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: dict[str, list[str]] = field(default_factory=dict)
    """Version id -> the ids of its artifacts."""
    calls: list[Call] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def writes(self) -> list[Call]:
        """The requests that changed something (or tried to)."""
        return [c for c in self.calls if c.method in ("POST", "PATCH", "PUT", "DELETE")]

    def version_named(self, model: str, version: str) -> dict[str, Any] | None:
        rm = next((m for m in self.registered_models.values() if m["name"] == model), None)
        if rm is None:
            return None
        return next((v for v in self.versions.values() if v["registeredModelId"] == rm["id"] and v["name"] == version), None)

    def artifacts_of(self, version_id: str) -> list[dict[str, Any]]:
        return [self.artifacts[a] for a in self.links.get(version_id, [])]

    # ---------------------------------------------------------------- the operations

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        route = path.removeprefix(_PREFIX)
        with self._lock:
            if method == "GET" and route == "/registered_models":
                return 200, self._page(list(self.registered_models.values()), query)
            if method == "GET" and route == "/registered_model":
                return self._find(self.registered_models.values(), query)
            if method == "POST" and route == "/registered_models":
                if any(m["name"] == body["name"] for m in self.registered_models.values()):
                    return 409, _error(409, f"registered model {body['name']!r} exists")
                return 201, self._create(self.registered_models, body, state="LIVE")
            if method == "GET" and route == "/model_version":
                return self._find(self.versions.values(), query, parent="registeredModelId")
            if method == "POST" and route == "/model_versions":
                if body["registeredModelId"] not in self.registered_models:
                    return 404, _error(404, f"no registered model {body['registeredModelId']}")
                if self._named(self.versions.values(), body["name"], registeredModelId=body["registeredModelId"]):
                    return 409, _error(409, f"version {body['name']!r} exists")
                return 201, self._create(self.versions, body, state="LIVE")
            if match := re.fullmatch(r"/model_versions/([^/]+)/artifacts", route):
                return self._version_artifacts(method, match.group(1), query, body)
            if match := re.fullmatch(r"/registered_models/([^/]+)/versions", route):
                mine = [v for v in self.versions.values() if v["registeredModelId"] == match.group(1)]
                return 200, self._page(mine, query)
        return 404, _error(404, f"the double does not implement {method} {path}")

    def _version_artifacts(self, method: str, version_id: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if version_id not in self.versions:
            return 404, _error(404, f"no model version {version_id}")
        if method == "GET":
            return 200, self._page(self.artifacts_of(version_id), query)
        existing = next((a for a in self.artifacts_of(version_id) if body.get("name") and a.get("name") == body["name"]), None)
        if existing is not None:
            existing.update({k: v for k, v in body.items() if k != "id"}, lastUpdateTimeSinceEpoch=_now())
            return 200, existing
        artifact = self._create(self.artifacts, body, state=body.get("state", "UNKNOWN"))
        self.links.setdefault(version_id, []).append(artifact["id"])
        return 201, artifact

    def _create(self, table: dict[str, dict[str, Any]], body: dict[str, Any], **defaults: Any) -> dict[str, Any]:
        now = _now()
        entity = {**defaults, **body, "id": str(next(self._ids)), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}
        table[entity["id"]] = entity
        return entity

    @staticmethod
    def _named(entities, name: str, **where: str) -> dict[str, Any] | None:
        return next((e for e in entities if e.get("name") == name and all(e.get(k) == v for k, v in where.items())), None)

    def _find(self, entities, query: dict[str, str], parent: str | None = None) -> tuple[int, Any]:
        where = {}
        if parent and query.get("parentResourceId"):
            where[parent] = query["parentResourceId"]
        if query.get("externalId"):
            found = next((e for e in entities if e.get("externalId") == query["externalId"]), None)
        elif query.get("name"):
            found = self._named(entities, query["name"], **where)
        else:
            return 400, _error(400, "give name or externalId")
        return (200, found) if found is not None else (404, _error(404, "no such entity"))

    @staticmethod
    def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        size = int(query.get("pageSize") or 100)
        shown = items[:size]
        return {"items": shown, "nextPageToken": "", "pageSize": size, "size": len(shown)}


def _now() -> str:
    return str(int(time.time() * 1000))


def _error(status: int, message: str) -> dict[str, str]:
    return {"code": str(status), "message": message}


class _Handler(BaseHTTPRequestHandler):
    double: RegistryDouble

    def log_message(self, *args: Any) -> None:  # quiet: the calls are recorded instead
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization")
        try:
            status, answer = self._respond(self.command, parts.path, query, raw, auth)
        except ConnectionResetError:  # a test's stand-in for a registry that goes away mid-request: no answer
            self.close_connection = True
            return
        self.double.calls.append(Call(self.command, parts.path, query, status, auth.split()[0] if auth else None))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _respond(self, method: str, path: str, query: dict[str, str], raw: bytes, auth: str | None) -> tuple[int, Any]:
        double = self.double
        operation = next((op for m, pattern, op in _OPERATIONS if m == method and pattern.match(path)), None)
        if operation is None:
            return 404, _error(404, f"{method} {path} is not in the Model Registry API")
        if double.token is not None and auth != f"Bearer {double.token}":
            return self._checked(operation, 401, _error(401, "a valid bearer token is required"))
        if double.fail_next:
            status = double.fail_next.pop(0)
            return self._checked(operation, status, _error(status, "the registry is unavailable"))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._checked(operation, 400, _error(400, "the body is not JSON"))
        schema = _request_schema(operation)
        if schema is not None:
            problems = check_schema(schema, body)
            if problems:
                return self._checked(operation, 400, _error(400, "; ".join(problems)))
        status, answer = double.answer(method, path, query, body)
        return self._checked(operation, status, answer)

    def _checked(self, operation: dict[str, Any], status: int, answer: Any) -> tuple[int, Any]:
        schema = _response_schema(operation, status)
        problems = ["no response for this status in the spec"] if schema is None else check_schema(schema, answer)
        if problems:
            self.double.violations.append(f"{operation['operationId']} {status}: {'; '.join(problems)}")
            return 500, _error(500, "the double's answer broke the spec")
        return status, answer

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve


@contextlib.contextmanager
def model_registry_server(token: str | None = None) -> Iterator[RegistryDouble]:
    """A registry on ``127.0.0.1`` (a free port) for the duration of the block."""
    double = RegistryDouble(token=token)
    handler = type("Handler", (_Handler,), {"double": double})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    double.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="model-registry-double", daemon=True)
    thread.start()
    try:
        yield double
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
