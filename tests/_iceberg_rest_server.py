"""A loopback Iceberg REST catalog for tests, shaped like watsonx.data's metadata service (MDS).

pyiceberg's ``RestCatalog`` runs against it unmodified. The server speaks the
routes of the Iceberg REST OpenAPI spec that ``RestCatalog`` calls (config,
namespaces, tables, commit, rename, register) under ``/mds/iceberg`` as
watsonx.data does, and keeps its state in a real catalog: pyiceberg's
``SqlCatalog`` on a SQLite file, whose ``commit_table`` checks the commit's
requirements (``assert-create``, ``assert-table-uuid``, ``assert-ref-snapshot-id``,
``assert-current-schema-id``, ...) and applies its updates with pyiceberg's own
``update_table_metadata``. Nothing here interprets Iceberg metadata itself. Table
data and metadata files go to ``warehouse``: a local directory, or ``s3://bucket/path``
on an S3 endpoint such as ``tests/_s3.py``'s moto server (pass its ``file_io``).

Auth, as the real deployments do it:

* ``None``: anything goes (pyiceberg then sends ``Authorization: Bearer None``).
* :class:`IamAuth` (IBM Cloud): the same server answers IAM's ``POST /identity/token``
  (form ``grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=...``) with a JWT
  access token that expires after ``token_ttl_s`` seconds; the catalog answers 401,
  with an Iceberg error body, to a missing, unknown or expired bearer token.
* :class:`CpdAuth` (Cloud Pak for Data / IBM Software Hub): the catalog accepts
  ``Authorization: ZenApiKey <base64(username:apikey)>``, or a bearer token from
  ``POST /icp4d-api/v1/authorize`` (JSON ``{"username", "api_key"}``).

Use::

    with iceberg_rest_server(warehouse, auth=IamAuth(api_keys=("k",))) as server:
        catalog = RestCatalog("wxd", uri=server.url, ...)   # server.iam_url for the token endpoint
        server.fail_next_commits("ns.table", 2)              # the next two commits answer 409
        server.expire_tokens()                               # every token issued so far is now expired
        server.requests                                      # what was asked, with which credential
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["CpdAuth", "IamAuth", "IcebergRestServer", "RecordedRequest", "iceberg_rest_server"]

IAM_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
TOKEN_PATH = "/identity/token"
CPD_AUTHORIZE_PATH = "/icp4d-api/v1/authorize"
_NAMESPACE_SEPARATOR = "\x1f"

# The routes this server implements, in the spec's notation. Sent as the config's
# `endpoints`, so pyiceberg uses HEAD for the exists checks, as against a current server.
_ENDPOINTS = (
    "GET /v1/{prefix}/namespaces",
    "POST /v1/{prefix}/namespaces",
    "GET /v1/{prefix}/namespaces/{namespace}",
    "HEAD /v1/{prefix}/namespaces/{namespace}",
    "DELETE /v1/{prefix}/namespaces/{namespace}",
    "POST /v1/{prefix}/namespaces/{namespace}/properties",
    "GET /v1/{prefix}/namespaces/{namespace}/tables",
    "POST /v1/{prefix}/namespaces/{namespace}/tables",
    "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "POST /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "DELETE /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "POST /v1/{prefix}/namespaces/{namespace}/register",
    "POST /v1/{prefix}/tables/rename",
)


@dataclass(frozen=True)
class IamAuth:
    """IBM Cloud IAM: API keys exchanged at ``/identity/token`` for bearer tokens that expire."""

    api_keys: tuple[str, ...] = ("aiplane-test-apikey",)
    token_ttl_s: float = 3600.0
    """Lifetime of each issued token; ``expires_in`` in the token answer is this, rounded up."""


@dataclass(frozen=True)
class CpdAuth:
    """Cloud Pak for Data: ``ZenApiKey base64(user:apikey)``, or a bearer token from ``/icp4d-api/v1/authorize``."""

    users: Mapping[str, str] = field(default_factory=lambda: {"admin": "aiplane-test-cpd-apikey"})
    """Username to API key."""
    token_ttl_s: float = 3600.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered."""

    method: str
    path: str
    """The path without the query, e.g. ``/mds/iceberg/v1/namespaces/aiplane/tables/t``."""
    query: Mapping[str, str]
    auth: str
    """Kind of ``Authorization`` header: ``none``, ``bearer``, ``zenapikey``, ``basic`` or ``other``."""
    credential: str | None
    """What followed the scheme in the header (the bearer token itself, for instance)."""
    status: int


class IcebergRestServer:
    """A running :func:`iceberg_rest_server`: its URLs, what it was asked, and knobs for failure tests."""

    def __init__(
        self,
        catalog: Any,
        auth: IamAuth | CpdAuth | None,
        table_config: Mapping[str, str],
        catalog_name: str | None,
        base_path: str,
    ) -> None:
        self.catalog = catalog
        """The backing pyiceberg ``SqlCatalog``: what a committed change really did."""
        self.auth = auth
        self.token_ttl_s: float = auth.token_ttl_s if auth is not None else 0.0
        """Lifetime of tokens issued from now on; change it mid-test to make the next token short-lived."""
        self.catalog_name = catalog_name
        self._table_config = dict(table_config)
        self._base_path = base_path
        self._lock = threading.RLock()
        self._log: list[RecordedRequest] = []
        self._tokens: dict[str, float] = {}  # token -> wall-clock expiry
        self._failures: dict[tuple[str, ...], int] = {}
        self._signing_key = secrets.token_bytes(32)
        self._connections: set[socket.socket] = set()
        self._http = _Server(("127.0.0.1", 0), _Handler)
        self._http.owner = self
        host, port = self._http.server_address[:2]
        self.root_url = f"http://{host}:{port}"
        self.url = self.root_url + base_path
        """The catalog's base URL: the ``uri`` of a ``RestCatalog`` (``.../mds/iceberg``)."""
        self.iam_url = self.root_url
        """IAM's base URL (the token endpoint is ``iam_url + "/identity/token"``), as ``https://iam.cloud.ibm.com``."""
        self.cpd_url = self.root_url + "/icp4d-api"
        """Cloud Pak for Data's auth base URL (``cpd_url + "/v1/authorize"``)."""
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="iceberg-rest-double", daemon=True
        )

    # ------------------------------------------------------------ what tests use

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def calls(self, method: str | None = None, path_suffix: str = "") -> list[RecordedRequest]:
        """The recorded requests with this method (any when ``None``) whose path ends with ``path_suffix``."""
        return [r for r in self.requests if (method is None or r.method == method) and r.path.endswith(path_suffix)]

    def client_properties(self, **extra: Any) -> dict[str, Any]:
        """``RestCatalog`` properties that reach this server (no auth); ``extra`` is added on top."""
        properties: dict[str, Any] = {"uri": self.url}
        if self.catalog_name is not None:
            properties["warehouse"] = self.catalog_name
        properties.update(extra)
        return properties

    def fail_next_commits(self, table: str | tuple[str, ...], count: int = 1) -> None:
        """Answer the next ``count`` commits to ``table`` (``"ns.table"``) with 409 CommitFailedException."""
        identifier = tuple(table.split(".")) if isinstance(table, str) else tuple(table)
        with self._lock:
            self._failures[identifier] = self._failures.get(identifier, 0) + count

    def expire_tokens(self) -> None:
        """Every token issued so far expires now, as if its lifetime had run out."""
        with self._lock:
            self._tokens = dict.fromkeys(self._tokens, 0.0)

    # ------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        self._thread.start()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Idle keep-alive connections from clients still open would hold their handler threads.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._http.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ auth

    def _issue_token(self, subject: str, claims: Mapping[str, Any]) -> tuple[str, int, int]:
        """A signed JWT for ``subject`` that this server accepts until it expires: (token, expires_in, expiration)."""
        now = time.time()
        ttl = self.token_ttl_s
        expires_in = max(1, math.ceil(ttl))
        payload = {"sub": subject, "iat": int(now), "exp": int(now) + expires_in, "jti": uuid.uuid4().hex, **claims}
        token = _jwt(payload, self._signing_key)
        with self._lock:
            self._tokens[token] = now + ttl
        return token, expires_in, int(now) + expires_in

    def _authenticate(self, header: str | None) -> str | None:
        """``None`` when ``header`` may use the catalog, else why not."""
        if self.auth is None:
            return None
        if not header:
            return "Authorization header is missing; send 'Authorization: Bearer <token>'"
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            with self._lock:
                expiry = self._tokens.get(value.strip())
            if expiry is None:
                return "The bearer token is not valid (unknown or malformed)"
            if time.time() >= expiry:
                return "The bearer token has expired; obtain a new one"
            return None
        if scheme == "zenapikey" and isinstance(self.auth, CpdAuth):
            try:
                user, _, key = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return "The ZenApiKey is not base64 of 'username:apikey'"
            if not user or self.auth.users.get(user) != key:
                return "The ZenApiKey's username or API key is not valid"
            return None
        return f"Authorization scheme {scheme!r} is not accepted here"


def _kind(header: str | None) -> tuple[str, str | None]:
    if not header:
        return "none", None
    scheme, _, value = header.partition(" ")
    kind = scheme.lower()
    return (kind if kind in ("bearer", "zenapikey", "basic") else "other"), value.strip() or None


def _jwt(payload: Mapping[str, Any], key: bytes) -> str:
    """An HS256 JWT. IAM signs RS256; clients (ibm-cloud-sdk-core included) only decode the claims."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "aiplane-test"}).encode())
    body = b64(json.dumps(payload, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: IcebergRestServer


class _Reply(Exception):
    """Raised by a route to answer with ``status`` and a JSON ``body`` (``None``: no body)."""

    def __init__(self, status: int, body: Any = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, error_type: str, message: str) -> _Reply:
    return _Reply(status, {"error": {"message": message, "type": error_type, "code": status}})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as pyiceberg's requests session expects of a real server
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.owner._lock:
            self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.owner._lock:
            self.server.owner._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.server.owner
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        header = self.headers.get("Authorization")
        try:
            reply = _route(owner, self.command, split.path, query, body, self.headers)
        except _Reply as r:
            reply = r
        except Exception as exc:  # a defect of the double or of pyiceberg: say so, as a real server would
            reply = _error(500, type(exc).__name__, f"{type(exc).__name__}: {exc}")
        kind, credential = _kind(header)
        with owner._lock:
            owner._log.append(RecordedRequest(self.command, split.path, query, kind, credential, reply.status))
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        # HEAD answers and 204s carry no body (the spec's exists checks answer 204 or 404).
        data = b"" if reply.body is None or self.command == "HEAD" else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        if data:
            self.send_header("Content-Type", "application/json")
        if reply.status != 204 and self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)


# ---------------------------------------------------------------- routes


def _route(
    owner: IcebergRestServer, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
) -> _Reply:
    if path == TOKEN_PATH:
        return _iam_token(owner, method, body, headers)
    if path == CPD_AUTHORIZE_PATH:
        return _cpd_authorize(owner, method, body)
    base = owner._base_path
    if not path.startswith(base + "/v1/"):
        raise _error(404, "NotFoundException", f"No route for {method} {path}; the catalog lives under {base}/v1/")
    why = owner._authenticate(headers.get("Authorization"))
    if why is not None:
        raise _error(401, "NotAuthorizedException", why)
    segments = [unquote(s) for s in path[len(base) + len("/v1/") :].split("/")]
    if segments == ["config"]:
        _only(method, "GET")
        return _config(owner, query)
    if owner.catalog_name is not None:
        if not segments or segments[0] != owner.catalog_name:
            asked = segments[0] if segments else ""
            message = f"No catalog {asked!r}; this server serves {owner.catalog_name!r}"
            raise _error(404, "NoSuchWarehouseException", message)
        segments = segments[1:]
    with owner._lock:
        return _catalog_route(owner, method, segments, query, body)


def _only(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _error(405, "MethodNotAllowedException", f"{method} is not allowed here; use {' or '.join(allowed)}")


def _config(owner: IcebergRestServer, query: dict[str, str]) -> _Reply:
    overrides: dict[str, str] = {}
    if owner.catalog_name is not None:
        warehouse = query.get("warehouse")
        if warehouse not in (None, "", owner.catalog_name):
            message = f"Catalog {warehouse!r} does not exist; this server serves {owner.catalog_name!r}"
            raise _error(404, "NoSuchWarehouseException", message)
        overrides["prefix"] = owner.catalog_name
    return _Reply(200, {"defaults": {}, "overrides": overrides, "endpoints": list(_ENDPOINTS)})


def _catalog_route(
    owner: IcebergRestServer, method: str, segments: list[str], query: dict[str, str], body: bytes
) -> _Reply:
    from pyiceberg.exceptions import (
        CommitFailedException,
        NamespaceAlreadyExistsError,
        NamespaceNotEmptyError,
        NoSuchNamespaceError,
        NoSuchTableError,
        TableAlreadyExistsError,
        ValidationError,
        ValidationException,
    )
    from pydantic import ValidationError as PydanticValidationError

    try:
        return _catalog_operation(owner, method, segments, query, body)
    except NoSuchNamespaceError as exc:
        raise _error(404, "NoSuchNamespaceException", str(exc)) from exc
    except NoSuchTableError as exc:
        raise _error(404, "NoSuchTableException", str(exc)) from exc
    except (NamespaceAlreadyExistsError, TableAlreadyExistsError) as exc:
        raise _error(409, "AlreadyExistsException", str(exc)) from exc
    except NamespaceNotEmptyError as exc:
        raise _error(409, "NamespaceNotEmptyException", str(exc)) from exc
    except CommitFailedException as exc:
        raise _error(409, "CommitFailedException", str(exc)) from exc
    except (PydanticValidationError, ValidationError, ValidationException, ValueError) as exc:
        raise _error(400, "BadRequestException", f"Malformed request: {exc}") from exc


def _catalog_operation(
    owner: IcebergRestServer, method: str, segments: list[str], query: dict[str, str], body: bytes
) -> _Reply:
    catalog = owner.catalog
    match segments:
        case ["namespaces"]:
            _only(method, "GET", "POST")
            if method == "POST":
                request = _json(body)
                namespace = tuple(request["namespace"])
                catalog.create_namespace(namespace, request.get("properties") or {})
                properties = catalog.load_namespace_properties(namespace)
                return _Reply(200, {"namespace": list(namespace), "properties": properties})
            parent = _namespace(query["parent"]) if query.get("parent") else ()
            found = sorted(catalog.list_namespaces(parent))
            page, token = _page(found, query)
            return _Reply(200, {"namespaces": [list(ns) for ns in page], "next-page-token": token})
        case ["namespaces", ns]:
            namespace = _namespace(ns)
            _only(method, "GET", "HEAD", "DELETE")
            if method == "HEAD":
                return _Reply(204 if catalog.namespace_exists(namespace) else 404)
            if method == "DELETE":
                catalog.drop_namespace(namespace)
                return _Reply(204)
            properties = catalog.load_namespace_properties(namespace)
            return _Reply(200, {"namespace": list(namespace), "properties": properties})
        case ["namespaces", ns, "properties"]:
            _only(method, "POST")
            request = _json(body)
            summary = catalog.update_namespace_properties(
                _namespace(ns), set(request.get("removals") or ()), request.get("updates") or {}
            )
            return _Reply(200, {"removed": summary.removed, "updated": summary.updated, "missing": summary.missing})
        case ["namespaces", ns, "tables"]:
            namespace = _namespace(ns)
            _only(method, "GET", "POST")
            if method == "POST":
                return _create_table(owner, namespace, body)
            found = sorted(catalog.list_tables(namespace))
            page, token = _page(found, query)
            identifiers = [{"namespace": list(i[:-1]), "name": i[-1]} for i in page]
            return _Reply(200, {"identifiers": identifiers, "next-page-token": token})
        case ["namespaces", ns, "register"]:
            _only(method, "POST")
            request = _json(body)
            identifier = (*_namespace(ns), request["name"])
            table = catalog.register_table(identifier, request["metadata-location"], bool(request.get("overwrite")))
            return _Reply(200, _load_result(owner, table.metadata, table.metadata_location))
        case ["namespaces", ns, "tables", name]:
            identifier = (*_namespace(ns), name)
            _only(method, "GET", "HEAD", "POST", "DELETE")
            if method == "HEAD":
                return _Reply(204 if catalog.table_exists(identifier) else 404)
            if method == "POST":
                return _commit(owner, identifier, body)
            if method == "DELETE":
                if query.get("purgeRequested", "false").lower() == "true":
                    catalog.purge_table(identifier)
                else:
                    catalog.drop_table(identifier)
                return _Reply(204)
            table = catalog.load_table(identifier)
            return _Reply(200, _load_result(owner, table.metadata, table.metadata_location))
        case ["tables", "rename"]:
            _only(method, "POST")
            request = _json(body)
            source, destination = request["source"], request["destination"]
            catalog.rename_table(
                (*source["namespace"], source["name"]), (*destination["namespace"], destination["name"])
            )
            return _Reply(204)
    raise _error(404, "NotFoundException", f"No route for {method} /v1/.../{'/'.join(segments)}")


def _create_table(owner: IcebergRestServer, namespace: tuple[str, ...], body: bytes) -> _Reply:
    from pyiceberg.catalog.rest import CreateTableRequest
    from pyiceberg.exceptions import NoSuchNamespaceError, TableAlreadyExistsError
    from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC
    from pyiceberg.table.sorting import UNSORTED_SORT_ORDER

    catalog = owner.catalog
    # pyiceberg's model requires keys its own client leaves out when they are null.
    fields = {"location": None, "partition-spec": None, "write-order": None, **_json(body)}
    request = CreateTableRequest.model_validate(fields)
    identifier = (*namespace, request.name)
    arguments = {
        "schema": request.table_schema,
        "location": request.location,
        "partition_spec": request.partition_spec or UNPARTITIONED_PARTITION_SPEC,
        "sort_order": request.write_order or UNSORTED_SORT_ORDER,
        "properties": request.properties,
    }
    if not request.stage_create:
        table = catalog.create_table(identifier, **arguments)
        return _Reply(200, _load_result(owner, table.metadata, table.metadata_location))
    # A create transaction: the metadata the table would start with, committed later
    # through the commit route with `assert-create` (pyiceberg's own staging code).
    if not catalog.namespace_exists(namespace):
        raise NoSuchNamespaceError(f"Namespace does not exist: {'.'.join(namespace)}")
    if catalog.table_exists(identifier):
        raise TableAlreadyExistsError(f"Table already exists: {'.'.join(identifier)}")
    staged = catalog._create_staged_table(identifier, **arguments)
    return _Reply(200, _load_result(owner, staged.metadata, None))


def _commit(owner: IcebergRestServer, identifier: tuple[str, ...], body: bytes) -> _Reply:
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError
    from pyiceberg.table import CommitTableRequest
    from pyiceberg.table.update import AssertCreate

    catalog = owner.catalog
    request = CommitTableRequest.model_validate_json(body)
    creates = any(isinstance(r, AssertCreate) for r in request.requirements)
    if not creates and not catalog.table_exists(identifier):
        raise NoSuchTableError(f"Table does not exist: {'.'.join(identifier)}")
    if owner._failures.get(identifier):
        owner._failures[identifier] -= 1
        message = f"Commit to {'.'.join(identifier)} failed: injected by the test (fail_next_commits)"
        raise _error(409, "CommitFailedException", message)
    try:
        # SqlCatalog validates every requirement against the current metadata (409 when stale)
        # and applies the updates with pyiceberg's update_table_metadata.
        response = catalog.commit_table(_Named(identifier), request.requirements, request.updates)
    except TableAlreadyExistsError as exc:
        raise _error(409, "CommitFailedException", f"Requirement failed: table already exists ({exc})") from exc
    metadata = json.loads(response.metadata.model_dump_json())
    return _Reply(200, {"metadata-location": response.metadata_location, "metadata": metadata})


@dataclass(frozen=True)
class _Named:
    """What ``SqlCatalog.commit_table`` needs of a table: its identifier."""

    identifier: tuple[str, ...]

    def name(self) -> tuple[str, ...]:
        return self.identifier


def _load_result(owner: IcebergRestServer, metadata: Any, metadata_location: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {"metadata": json.loads(metadata.model_dump_json()), "config": dict(owner._table_config)}
    if metadata_location is not None:
        result["metadata-location"] = metadata_location
    return result


def _namespace(encoded: str) -> tuple[str, ...]:
    return tuple(encoded.split(_NAMESPACE_SEPARATOR))


def _page(items: list[Any], query: dict[str, str]) -> tuple[list[Any], str | None]:
    if not query.get("pageSize"):
        return items, None
    start = int(query.get("pageToken") or 0)
    end = start + int(query["pageSize"])
    return items[start:end], (str(end) if end < len(items) else None)


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise _error(400, "BadRequestException", f"The request body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _error(400, "BadRequestException", "The request body must be a JSON object")
    return value


# ---------------------------------------------------------------- IBM Cloud IAM and Cloud Pak for Data


def _iam_error(status: int, code: str, message: str) -> _Reply:
    # IAM's error shape. BXNIM0415E is the code IAM gives an unknown API key; the others are stand-ins.
    context = {"requestId": uuid.uuid4().hex, "requestType": "incoming.Identity_Token"}
    return _Reply(status, {"errorCode": code, "errorMessage": message, "context": context})


def _iam_token(owner: IcebergRestServer, method: str, body: bytes, headers: Any) -> _Reply:
    if not isinstance(owner.auth, IamAuth):
        raise _error(404, "NotFoundException", "This server was not started with IamAuth: no IAM token endpoint")
    if method != "POST":
        raise _iam_error(405, "BXNIM0405E", f"{method} is not supported; POST the form to {TOKEN_PATH}")
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _iam_error(
            400, "BXNIM0109E", f"Content-Type must be application/x-www-form-urlencoded, not {content_type!r}"
        )
    form = {k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    if form.get("grant_type") != IAM_GRANT_TYPE:
        raise _iam_error(400, "BXNIM0103E", f"Unsupported grant_type {form.get('grant_type')!r}; use {IAM_GRANT_TYPE}")
    apikey = form.get("apikey")
    if not apikey:
        raise _iam_error(400, "BXNIM0109E", "Property missing or empty. Property name: 'apikey'")
    if apikey not in owner.auth.api_keys:
        raise _iam_error(400, "BXNIM0415E", "Provided API key could not be found.")
    iam_id = "iam-ServiceId-" + hashlib.sha256(apikey.encode()).hexdigest()[:32]
    claims = {
        "iam_id": iam_id,
        "id": iam_id,
        "sub_type": "ServiceId",
        "grant_type": IAM_GRANT_TYPE,
        "scope": "ibm openid",
        "client_id": "default",
        "iss": owner.iam_url + "/identity",
    }
    token, expires_in, expiration = owner._issue_token(iam_id, claims)
    return _Reply(200, {
        "access_token": token,
        "refresh_token": "not_supported",
        "ims_user_id": 1234567,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "expiration": expiration,
        "scope": "ibm openid",
    })


def _cpd_authorize(owner: IcebergRestServer, method: str, body: bytes) -> _Reply:
    if not isinstance(owner.auth, CpdAuth):
        raise _error(404, "NotFoundException", "This server was not started with CpdAuth: no authorize endpoint")
    if method != "POST":
        message = f"{method} is not supported; POST JSON to {CPD_AUTHORIZE_PATH}"
        raise _Reply(405, {"_messageCode_": "405", "message": message})
    try:
        request = json.loads(body or b"{}")
    except json.JSONDecodeError:
        request = None
    if not isinstance(request, dict) or not request.get("username") or not request.get("api_key"):
        # Passwords are a CPD option this double does not offer: API keys only.
        raise _Reply(400, {"_messageCode_": "400", "message": "Send JSON with username and api_key"})
    user = request["username"]
    if owner.auth.users.get(user) != request["api_key"]:
        raise _Reply(401, {"_messageCode_": "401", "message": "Invalid user credentials"})
    token, _, _ = owner._issue_token(user, {"username": user, "role": "User"})
    return _Reply(200, {"_messageCode_": "200", "message": "Success", "token": token})


# ---------------------------------------------------------------- the context manager


@contextlib.contextmanager
def iceberg_rest_server(
    warehouse: str,
    auth: IamAuth | CpdAuth | None = None,
    *,
    file_io: Mapping[str, str] | None = None,
    vend_file_io: bool = True,
    catalog_name: str | None = None,
    base_path: str = "/mds/iceberg",
) -> Iterator[IcebergRestServer]:
    """Serve an Iceberg REST catalog on ``127.0.0.1`` (a free port) until the block ends.

    ``warehouse``: where table files go, a local directory or ``s3://bucket/path``.
    ``file_io``: the FileIO properties the server's own catalog writes metadata with
    (for S3, ``S3Server.pyiceberg_properties()``); with ``vend_file_io`` (the default)
    they are also handed to clients in each load-table ``config``, as catalogs that
    vend storage credentials do; without it a client must bring its own.
    ``catalog_name``: as watsonx.data, clients name the catalog as their ``warehouse``
    and the server answers it as the route ``prefix``; ``None`` serves unprefixed routes.
    ``base_path``: ``/mds/iceberg`` as watsonx.data; ``""`` for a plain ``/v1/...`` server.
    """
    from pyiceberg.catalog.sql import SqlCatalog

    if "://" not in warehouse:
        Path(warehouse).mkdir(parents=True, exist_ok=True)
        warehouse = Path(warehouse).resolve().as_uri()
    state = tempfile.mkdtemp(prefix="iceberg-rest-double-")
    catalog = None
    server = None
    try:
        properties = dict(file_io or {})
        catalog = SqlCatalog("rest_double", uri=f"sqlite:///{state}/catalog.db", warehouse=warehouse, **properties)
        vended = properties if vend_file_io else {}
        server = IcebergRestServer(catalog, auth, vended, catalog_name, base_path.rstrip("/"))
        server._start()
        yield server
    finally:
        if server is not None:
            server._stop()
        if catalog is not None:
            catalog.close()
        shutil.rmtree(state, ignore_errors=True)
