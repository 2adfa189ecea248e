"""A loopback double of IBM watsonx.governance's factsheets and AI use case service, for tests.

IBM's ``ibm-aigov-facts-client`` runs against it unmodified. The server answers
the routes the client calls for external models, custom facts, attachments,
AI use cases, approaches and tracking, with bodies shaped like the real
service's (the shapes the client reads: ``metadata.asset_id``, ``entity.*``,
``attachments[].asset_type``, ...), and keeps its state in memory so a second
publish sees what the first one made. Every request is recorded.

Auth, as the real deployments do it:

* Cloud Pak for Data: ``POST /icp4d-api/v1/authorize`` (JSON ``{"username", "api_key"}``)
  answers a JWT; every other route wants ``Authorization: Bearer <that token>``.
* IBM Cloud: the same server answers IAM's ``POST /identity/token`` (form
  ``grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=...``) and
  ``POST /identity/introspect``. The facts client has the IBM Cloud host names
  built in (``api.dataplatform.cloud.ibm.com``, ``iam.cloud.ibm.com``,
  ``resource-controller.cloud.ibm.com``), so for this mode the server is also an
  HTTPS proxy: a ``CONNECT`` to any host is answered by this server itself,
  over TLS with a certificate for that host signed by a throwaway CA
  (:attr:`FactsServiceDouble.ca_bundle`). Point ``HTTPS_PROXY`` at
  :attr:`FactsServiceDouble.proxy_url` and ``REQUESTS_CA_BUNDLE`` at the CA.

Use::

    with factsheets_service(api_keys=("k",), users={"admin": "k"}) as service:
        service.url                      # the CPD base URL
        service.outage(503)              # every request answers 503 until service.outage(None)
        service.requests                 # what was asked: method, path, query, headers, body
        service.models, service.usecases # what is stored
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import re
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["FactsServiceDouble", "RecordedRequest", "factsheets_service"]

IAM_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
_ACCOUNT = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
_INSTANCE = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    host: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class _Asset:
    asset_id: str
    catalog_id: str
    name: str
    asset_type: str
    description: str = ""
    entity: dict[str, Any] = field(default_factory=dict)
    custom_facts: dict[str, Any] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, content_type: str = "application/json") -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def _error(status: int, code: str, message: str) -> _Reply:
    # The shape IBM's platform services (catalog, CAMS, factsheet) answer errors with.
    return _Reply(status, {"trace": uuid.uuid4().hex, "errors": [{"code": code, "message": message}]})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking HS256 JWT: clients (ibm-cloud-sdk-core included) only decode the claims."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(hashlib.sha256((head + body).encode()).digest())}"


class FactsServiceDouble:
    """The service: state, recorded requests, and switches for failures."""

    def __init__(self, api_keys: tuple[str, ...] = (), users: dict[str, str] | None = None) -> None:
        self.api_keys = tuple(api_keys)
        """IBM Cloud API keys IAM accepts."""
        self.users = dict(users or {})
        """Cloud Pak for Data users and their API keys."""
        self.pac_id = str(uuid.uuid4())
        """The Platform Asset Catalog: where external models are saved."""
        self.inventory_id = str(uuid.uuid4())
        """The default AI use case inventory (a catalog)."""
        self.models: dict[str, _Asset] = {}
        self.usecases: dict[str, _Asset] = {}
        self.approaches: dict[str, list[dict[str, Any]]] = {}
        """Use case id -> its approaches."""
        self.tracked: dict[str, dict[str, Any]] = {}
        """Model asset id -> ``{usecase_id, approach_id, version_number, version_comment}``."""
        self.uploads: dict[str, bytes] = {}
        """Attachment id -> the bytes uploaded."""
        self.asset_types: dict[str, dict[str, Any]] = {
            # The platform defines the use case's own custom facts type; model facts start undefined.
            "model_entry_user": {"description": "AI use case custom facts", "fields": [], "relationships": [],
                                 "global_search_searchable": [], "properties": {}, "decorates": [{"asset_type_name": "model_entry"}]},
        }
        """Custom fact definitions by asset type (``modelfacts_user``: a model's custom facts)."""
        self._tokens: set[str] = set()
        self._requests: list[RecordedRequest] = []
        self._outage: int | None = None
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._tls: ssl.SSLContext | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="factsheets-double-"))
        self.url = ""
        """Base URL, ``http://127.0.0.1:<port>`` (the CPD ``service_url``)."""
        self.proxy_url = ""
        """The same server as an HTTPS proxy, for the IBM Cloud mode."""
        self.ca_bundle = ""
        """PEM file of the CA that signs the certificates the proxy presents."""

    # ------------------------------------------------------------ what tests use

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def calls(self, method: str | None = None, path_prefix: str = "") -> list[RecordedRequest]:
        return [r for r in self.requests if (method is None or r.method == method) and r.path.startswith(path_prefix)]

    def outage(self, status: int | None = 503) -> None:
        """Answer every request (auth included) with ``status`` until called with ``None``."""
        with self._lock:
            self._outage = status

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "FactsServiceDouble":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]  # the handler finds its service through its server
        port = self._server.server_address[1]
        self.url = self.proxy_url = f"http://127.0.0.1:{port}"
        threading.Thread(target=self._server.serve_forever, name="factsheets-double", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def enable_tls_proxy(self) -> str:
        """Make the CA and the TLS context the proxy needs; return the CA bundle's path."""
        if self._tls is None:
            cert, key, ca = _certificates(self._tmp)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self._tls = ctx
            self.ca_bundle = str(ca)
        return self.ca_bundle

    # ------------------------------------------------------------ internals

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _issue_token(self, subject: str) -> str:
        now = int(time.time())
        token = _jwt(
            {
                "sub": subject,
                "username": subject,
                "iam_id": f"IBMid-{subject}",
                "account": {"bss": _ACCOUNT},
                "iat": now,
                "exp": now + 3600,
                "jti": secrets.token_hex(8),
            }
        )
        with self._lock:
            self._tokens.add(token)
        return token

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            return header.removeprefix("Bearer ") in self._tokens


_SAN_HOSTS = (
    "iam.cloud.ibm.com",
    "*.cloud.ibm.com",
    "api.dataplatform.cloud.ibm.com",
    "*.dataplatform.cloud.ibm.com",
    "resource-controller.cloud.ibm.com",
    "localhost",
)


def _certificates(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a server certificate it signs for IBM Cloud's host names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiplane test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.dataplatform.cloud.ibm.com")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in _SAN_HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (where / "ca.pem").write_bytes(ca.public_bytes(pem))
    (where / "server.pem").write_bytes(cert.public_bytes(pem))
    (where / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return where / "server.pem", where / "server.key", where / "ca.pem"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_CONNECT(self) -> None:
        """The IBM Cloud mode: a tunnel to 'anywhere' that ends here, in TLS."""
        owner: FactsServiceDouble = self.server.owner
        host = self.path.split(":", 1)[0]
        if owner._tls is None:
            self.send_error(502, "this double was not started with the TLS proxy")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        try:
            tls = owner._tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.close_connection = True
            return
        # Serve the tunnelled requests on the same thread, as if a new connection arrived.
        inner = _Handler.__new__(_Handler)
        inner.server = self.server
        inner.request = inner.connection = tls
        inner.client_address = self.client_address
        inner.tunnel_host = host  # type: ignore[attr-defined]  # what the inner handler reports as the CONNECT target
        inner.rfile = tls.makefile("rb")
        inner.wfile = tls.makefile("wb")
        try:
            inner.close_connection = False
            while not inner.close_connection:
                inner.handle_one_request()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                inner.wfile.flush()
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        owner: FactsServiceDouble = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        host = getattr(self, "tunnel_host", None) or (self.headers.get("Host") or "").split(":")[0]
        request = RecordedRequest(self.command, host, parts.path, query, dict(self.headers.items()), body)
        owner._record(request)
        try:
            if owner._outage is not None:
                raise _error(owner._outage, "service_unavailable", "The service is temporarily unavailable")
            reply = _route(owner, request)
        except _Reply as r:
            reply = r
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        if reply.body is None:
            data = b""
        elif isinstance(reply.body, bytes):
            data = reply.body
        else:
            data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()


def _route(owner: FactsServiceDouble, r: RecordedRequest) -> _Reply:
    path, method = r.path.rstrip("/") or "/", r.method
    if path == "/icp4d-api/v1/authorize" and method == "POST":
        return _cpd_authorize(owner, r)
    if path == "/identity/token" and method == "POST":
        return _iam_token(owner, r)
    if path == "/identity/introspect" and method == "POST":
        key = r.query.get("apikey") or parse_qs(r.body.decode()).get("apikey", [""])[0]
        return _Reply(200, {"active": key in owner.api_keys})
    if not owner._authorized(r.headers.get("Authorization")):
        raise _error(401, "authentication_failed", "Missing or invalid bearer token")
    for pattern, verb, handler in _ROUTES:
        m = re.fullmatch(pattern, path)
        if m and verb == method:
            with owner._lock:
                return handler(owner, r, *m.groups())
    raise _error(404, "not_found", f"{method} {path} is not a route of this double")


# ---------------------------------------------------------------- auth


def _cpd_authorize(owner: FactsServiceDouble, r: RecordedRequest) -> _Reply:
    body = r.json() or {}
    user, key = body.get("username"), body.get("api_key") or body.get("password")
    if not user or owner.users.get(user) != key:
        return _Reply(401, {"_messageCode_": "401", "message": "Invalid username or apikey"})
    return _Reply(200, {"_messageCode_": "200", "message": "Success", "token": owner._issue_token(user)})


def _iam_token(owner: FactsServiceDouble, r: RecordedRequest) -> _Reply:
    form = {k: v[-1] for k, v in parse_qs(r.body.decode()).items()}
    if form.get("grant_type") != IAM_GRANT_TYPE or form.get("apikey") not in owner.api_keys:
        return _Reply(
            400,
            {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found.", "context": {}},
        )
    token = owner._issue_token("iam-user")
    now = int(time.time())
    return _Reply(
        200,
        {
            "access_token": token,
            "refresh_token": "not_supported",
            "token_type": "Bearer",
            "expires_in": 3600,
            "expiration": now + 3600,
            "scope": "ibm openid",
        },
    )


_ROUTES: list[tuple[str, str, Any]] = []


def _on(pattern: str, method: str = "GET"):
    def register(fn):
        _ROUTES.append((pattern, method, fn))
        return fn

    return register


@_on(r"/v1/aigov/factsheet/heartbeat")
def _heartbeat(owner, r):
    return _Reply(200, {"version": "5.2.0", "status": "ok"})


# ---------------------------------------------------------------- IBM Cloud: service instances

_WX_GOV_RESOURCE_ID = "2ad019f3-0fd6-4c25-966d-f3952481a870"  # the catalog id of watsonx.governance


@_on(r"/v1/aigov/factsheet/instances")
def _instances(owner, r):
    return _Reply(200, {"resources": [{"guid": _INSTANCE, "name": "watsonx.governance-test", "isDefaultInstance": True,
                                       "region_id": "us-south", "state": "active"}]})


@_on(r"/v2/resource_instances")
def _resource_instances(owner, r):
    crn = f"crn:v1:bluemix:public:aiopenscale:us-south:a/{_ACCOUNT}:{_INSTANCE}::"
    return _Reply(
        200,
        {
            "rows_count": 1,
            "next_url": None,
            "resources": [
                {"id": crn, "guid": _INSTANCE, "crn": crn, "name": "watsonx.governance-test", "account_id": _ACCOUNT,
                 "resource_id": _WX_GOV_RESOURCE_ID, "region_id": "us-south", "state": "active"}
            ],
        },
    )


@_on(r"/v2/catalogs/ibm-global-catalog")
def _pac(owner, r):
    return _Reply(
        200,
        {
            "metadata": {"guid": owner.pac_id, "url": f"/v2/catalogs/{owner.pac_id}", "creator_id": "admin"},
            "entity": {"name": "Platform assets catalog", "bss_account_id": r.query.get("bss_account_id", "999")},
        },
    )


# ---------------------------------------------------------------- fact definitions (CAMS asset types)


def _definitions(owner: FactsServiceDouble) -> dict[str, dict[str, Any]]:
    return owner.asset_types


@_on(r"/v2/asset_types/([A-Za-z0-9_]+)")
def _get_asset_type(owner, r, type_name):
    found = _definitions(owner).get(type_name)
    if found is None:
        raise _error(404, "not_found", f"Asset type {type_name} was not found")
    return _Reply(200, {"name": type_name, "version": 1, "scope": "BSS", **json.loads(json.dumps(found))})


@_on(r"/v2/asset_types/([A-Za-z0-9_]+)", "PUT")
def _put_asset_type(owner, r, type_name):
    body = r.json() or {}
    if not isinstance(body.get("properties"), dict):
        raise _error(400, "invalid_request", "an asset type needs 'properties'")
    _definitions(owner)[type_name] = {k: v for k, v in body.items() if k not in ("name", "version", "scope")}
    return _Reply(200, {"name": type_name, **body})


# ---------------------------------------------------------------- search (global search)


def _search_terms(query: Any) -> dict[str, str]:
    """The ``term``/``match`` leaves of an Elasticsearch-style query, by field."""
    found: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for kind in ("term", "match"):
                leaf = node.get(kind)
                if isinstance(leaf, dict):
                    for k, v in leaf.items():
                        found[k] = v
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(query)
    return found


def _row(asset: _Asset, artifact_type: str) -> dict[str, Any]:
    return {
        "artifact_id": asset.asset_id,
        "metadata": {"name": asset.name, "artifact_type": artifact_type, "modified_on": asset.created},
        "entity": {"assets": {"catalog_id": asset.catalog_id}},
        "custom_attributes": [
            {"attribute_name": "model_stub.model_id", "attribute_value": asset.entity.get("model_stub", {}).get("model_id")}
        ],
    }


@_on(r"/v3/search", "POST")
def _search(owner, r):
    terms = _search_terms(r.json() or {})
    kind = terms.get("metadata.artifact_type")
    if kind == "model_stub":
        wanted = terms.get("custom_attributes.attribute_value.keyword")
        rows = [_row(m, kind) for m in owner.models.values() if m.entity["model_stub"]["model_id"] == wanted]
    elif kind == "model_entry":
        name = terms.get("metadata.name.keyword") or terms.get("metadata.name")
        inventory = terms.get("entity.assets.catalog_id")
        rows = [
            _row(u, kind)
            for u in sorted(owner.usecases.values(), key=lambda u: u.created, reverse=True)
            if (name is None or u.name == name) and (inventory is None or u.catalog_id == inventory)
        ]
    else:
        rows = []
    return _Reply(200, {"size": len(rows), "limit": 20, "rows": rows, "aggregations": {}})


# ---------------------------------------------------------------- external models and assets


def _asset_json(asset: _Asset) -> dict[str, Any]:
    return {
        "metadata": {
            "asset_id": asset.asset_id,
            "name": asset.name,
            "description": asset.description,
            "asset_type": asset.asset_type,
            "catalog_id": asset.catalog_id,
            "created_at": asset.created,
            "rov": {"mode": 0},
        },
        "entity": json.loads(json.dumps(asset.entity)),
        "attachments": json.loads(json.dumps(asset.attachments)),
        "href": f"/v2/assets/{asset.asset_id}?catalog_id={asset.catalog_id}",
    }


def _asset(owner: FactsServiceDouble, asset_id: str, r: RecordedRequest) -> _Asset:
    asset = owner.models.get(asset_id) or owner.usecases.get(asset_id)
    catalog = r.query.get("catalog_id")
    if asset is None or (catalog and catalog != asset.catalog_id):
        raise _error(404, "not_found", f"Asset {asset_id} was not found in catalog {catalog}")
    return asset


@_on(r"/v1/aigov/model_inventory/model_stub", "PUT")
def _put_model_stub(owner, r):
    body = r.json() or {}
    if not body.get("model_id") or not body.get("name"):
        raise _error(400, "invalid_request", "model_id and name are required")
    catalog = body.get("catalog_id") or owner.pac_id
    model = next((m for m in owner.models.values() if m.entity["model_stub"]["model_id"] == body["model_id"]), None)
    if model is None:
        model = _Asset(
            asset_id=str(uuid.uuid4()), catalog_id=catalog, name=body["name"], asset_type="model_stub", created=_now()
        )
        model.entity = {"modelfacts_system": {}, "model_stub": {}}
        owner.models[model.asset_id] = model
    model.name = body["name"]
    model.description = body.get("description") or ""
    model.entity["model_stub"] = {k: v for k, v in body.items() if k not in ("name", "description", "catalog_id")}
    return _Reply(200, _asset_json(model))


@_on(r"/v2/assets/([0-9a-f-]+)")
def _get_asset(owner, r, asset_id):
    return _Reply(200, _asset_json(_asset(owner, asset_id, r)))


@_on(r"/v2/assets/([0-9a-f-]+)/attributes/([A-Za-z0-9_]+)")
def _get_attribute(owner, r, asset_id, name):
    asset = _asset(owner, asset_id, r)
    if name not in asset.entity:
        raise _error(404, "not_found", f"Attribute {name} was not found on asset {asset_id}")
    return _Reply(200, {name: asset.entity[name]})


@_on(r"/v2/assets/([0-9a-f-]+)/attributes/([A-Za-z0-9_]+)", "PATCH")
def _patch_attribute(owner, r, asset_id, name):
    asset = _asset(owner, asset_id, r)
    if name not in asset.entity:
        raise _error(404, "not_found", f"Attribute {name} was not found on asset {asset_id}")
    _check_facts(owner, name, r.json() or [])
    for op in r.json() or []:
        key = str(op.get("path", "")).lstrip("/")
        if op.get("op") in ("add", "replace"):
            asset.entity[name][key] = op.get("value")
        elif op.get("op") == "remove":
            asset.entity[name].pop(key, None)
    return _Reply(200, {name: asset.entity[name]})


@_on(r"/v2/assets/([0-9a-f-]+)/attributes", "POST")
def _post_attribute(owner, r, asset_id):
    asset = _asset(owner, asset_id, r)
    body = r.json() or {}
    name, value = body.get("name"), body.get("entity")
    if not name or not isinstance(value, dict):
        raise _error(400, "invalid_request", "an attribute needs 'name' and an 'entity' object")
    if name in asset.entity:
        raise _error(409, "conflict", f"Attribute {name} already exists on asset {asset_id}")
    _check_facts(owner, name, [{"op": "add", "path": "/" + k, "value": v} for k, v in value.items()])
    asset.entity[name] = dict(value)
    return _Reply(201, {name: asset.entity[name]})


def _check_facts(owner: FactsServiceDouble, type_name: str, ops: list[dict[str, Any]]) -> None:
    """Custom facts must be defined first, as the real service insists."""
    if not type_name.endswith("_user"):
        return
    defined = (_definitions(owner).get(type_name) or {}).get("properties") or {}
    unknown = sorted({str(op.get("path", "")).lstrip("/") for op in ops} - set(defined))
    if unknown:
        raise _error(400, "invalid_attribute", f"Facts {', '.join(unknown)} are not defined for {type_name}")


# ---------------------------------------------------------------- attachments


@_on(r"/v1/aigov/factsheet/models/large_attachment/([0-9a-f-]+)/content", "PUT")
def _put_attachment(owner, r, asset_id):
    asset = _asset(owner, asset_id, r)
    fact_id = r.query.get("fact_id") or None
    if fact_id and any((a.get("user_data") or {}).get("fact_id") == fact_id for a in asset.attachments):
        raise _error(409, "conflict", f"Fact {fact_id} already has an attachment")
    attachment_id = str(uuid.uuid4())
    user_data = {k: r.query[k] for k in ("fact_id", "phase_type", "html_rendering_hint") if r.query.get(k)}
    asset.attachments.append(
        {
            "id": attachment_id,
            "version": 2,
            "asset_type": "data_asset",
            "name": r.query.get("name", ""),
            "description": r.query.get("description", ""),
            "mime": r.query.get("mime", "application/octet-stream"),
            "user_data": user_data,
            "object_key": f"{asset.asset_type}/{asset_id}/{attachment_id}",
            "created_at": _now(),
        }
    )
    owner.uploads[attachment_id] = r.body
    return _Reply(200, {"attachment_id": attachment_id, "size": len(r.body), "asset_id": asset_id})


@_on(r"/v2/assets/([0-9a-f-]+)/attachments/([0-9a-f-]+)", "DELETE")
def _delete_attachment(owner, r, asset_id, attachment_id):
    asset = _asset(owner, asset_id, r)
    before = len(asset.attachments)
    asset.attachments = [a for a in asset.attachments if a["id"] != attachment_id]
    if len(asset.attachments) == before:
        raise _error(404, "not_found", f"Attachment {attachment_id} was not found")
    owner.uploads.pop(attachment_id, None)
    return _Reply(204, None)


# ---------------------------------------------------------------- AI use cases, approaches, tracking


@_on(r"/v1/aigov/model_inventory/model_entries", "POST")
def _create_usecase(owner, r):
    catalog = r.query.get("catalog_id")
    if not catalog or catalog == "None":
        raise _error(400, "invalid_request", "catalog_id (the inventory) is required")
    if catalog != owner.inventory_id:
        raise _error(404, "not_found", f"Inventory {catalog} was not found")
    body = r.json() or {}
    if not body.get("name"):
        raise _error(400, "invalid_request", "name is required")
    usecase = _Asset(
        asset_id=str(uuid.uuid4()), catalog_id=catalog, name=body["name"], asset_type="model_entry",
        description=body.get("description") or "", created=_now(),
    )
    usecase.entity = {"model_entry": {"status": body.get("status") or "draft", "tags": body.get("tags") or []}}
    owner.usecases[usecase.asset_id] = usecase
    owner.approaches[usecase.asset_id] = [
        # Every use case starts with its default approach, as the service makes it.
        {"id": "00000000-0000-0000-0000-000000000000", "name": "Default approach", "description": "", "icon": "Packages",
         "icon_color": "Gray", "versions": []}
    ]
    return _Reply(201, _asset_json(usecase))


def _usecase(owner: FactsServiceDouble, usecase_id: str, r: RecordedRequest) -> _Asset:
    usecase = owner.usecases.get(usecase_id)
    if usecase is None or r.query.get("catalog_id") not in (None, usecase.catalog_id):
        raise _error(404, "not_found", f"AI use case {usecase_id} was not found")
    return usecase


@_on(r"/v1/aigov/model_inventory/model_usecases/([0-9a-f-]+)/tracked_model_versions")
def _approaches(owner, r, usecase_id):
    _usecase(owner, usecase_id, r)
    return _Reply(200, {"approaches": json.loads(json.dumps(owner.approaches[usecase_id]))})


@_on(r"/v1/aigov/model_inventory/model_usecases/([0-9a-f-]+)/version_approach", "POST")
def _create_approach(owner, r, usecase_id):
    _usecase(owner, usecase_id, r)
    body = r.json() or {}
    if not body.get("name"):
        raise _error(400, "invalid_request", "name is required")
    approach = {
        "id": str(uuid.uuid4()), "name": body["name"], "description": body.get("description") or "",
        "icon": body.get("icon") or "Packages", "icon_color": body.get("icon_color") or "Gray", "versions": [],
    }
    owner.approaches[usecase_id].append(approach)
    return _Reply(200, {k: v for k, v in approach.items() if k != "versions"})


def _version_key(number: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", number)[:3])


@_on(r"/v1/aigov/model_inventory/models/([0-9a-f-]+)/model_entry", "POST")
def _track(owner, r, model_id):
    model = _asset(owner, model_id, r)
    body = r.json() or {}
    usecase = owner.usecases.get(body.get("model_entry_asset_id") or "")
    if usecase is None or usecase.catalog_id != body.get("model_entry_catalog_id"):
        raise _error(404, "not_found", "The AI use case to track the model in was not found")
    details = body.get("version_details") or {}
    approach = next((a for a in owner.approaches[usecase.asset_id] if a["id"] == details.get("approach_id")), None)
    if approach is None:
        raise _error(404, "not_found", f"Approach {details.get('approach_id')} was not found")
    if model.entity.get("modelfacts_system", {}).get("modelentry_information", {}).get("lmid"):
        raise _error(400, "already_tracked", f"Model {model_id} is already tracked; untrack it first")
    number = str(details.get("number") or "")
    if any(v["number"] == number for v in approach["versions"]):
        raise _error(400, "duplicate_version", f"Version {number} already exists in approach {approach['name']}")
    approach["versions"].append({"number": number, "comment": details.get("comment") or "", "models": [model_id]})
    approach["versions"].sort(key=lambda v: _version_key(v["number"]), reverse=True)
    model.entity.setdefault("modelfacts_system", {})["modelentry_information"] = {
        "lmid": f"{usecase.catalog_id}:{usecase.asset_id}",
        "model_entry_id": usecase.asset_id,
        "model_entry_catalog_id": usecase.catalog_id,
        "model_entry_name": usecase.name,
    }
    owner.tracked[model_id] = {
        "usecase_id": usecase.asset_id, "approach_id": approach["id"], "version_number": number,
        "version_comment": details.get("comment") or "",
    }
    return _Reply(200, {"model_entry_asset_id": usecase.asset_id, "model_entry_catalog_id": usecase.catalog_id,
                        "version_details": {"approach_id": approach["id"], "number": number}})


@contextlib.contextmanager
def factsheets_service(
    api_keys: tuple[str, ...] = (), users: dict[str, str] | None = None, tls_proxy: bool = False
) -> Iterator[FactsServiceDouble]:
    """A started double; with ``tls_proxy``, also the HTTPS proxy the IBM Cloud mode needs."""
    service = FactsServiceDouble(api_keys=api_keys, users=users).start()
    if tls_proxy:
        service.enable_tls_proxy()
    try:
        yield service
    finally:
        service.stop()
