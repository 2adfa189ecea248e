"""The ``iceberg`` feature store: training features as Apache Iceberg tables in a SQL catalog.

Every publish is a full refresh committed atomically through the catalog; a
record pins the snapshot it was made from, so a reader always sees exactly the
rows the record names, however often the table is refreshed after it. A refresh
whose rows equal the current snapshot's (in any order) commits nothing, so the
snapshot id, and with it everything downstream, stays the same.

pyiceberg and pyarrow are imported inside the methods: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiplane.core.components import FEATURE_COLUMNS, FeatureStore
from aiplane.core.config import S3Settings, SecretRef
from aiplane.core.errors import AiplaneError, ConfigError, InputError
from aiplane.core.records import FeaturesRecord

if TYPE_CHECKING:
    import pyarrow
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot

__all__ = ["IcebergFeatureStore", "DIGEST_PROPERTY", "RESIDENCY_PROPERTY"]

DIGEST_PROPERTY = "aiplane.content-sha256"
"""Snapshot summary property holding the order-independent digest of the snapshot's rows."""
RESIDENCY_PROPERTY = "aiplane.residency"
"""Snapshot summary property holding the sorted residency tags of the rows, as a JSON list."""

_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DIGEST_FORMAT = b"aiplane-features-v2\0"
# Rows hashed per step of _content_digest: their word arrays (a few MB) stay in the CPU cache.
_DIGEST_BATCH_ROWS = 8192
# Concurrent publishers race through the catalog's optimistic commit; the loser
# re-reads the table and tries again (and finds nothing to do if the winner
# published the same rows).
_COMMIT_ATTEMPTS = 8
_CONNECT_ATTEMPTS = 4
_BACKOFF_S = 0.5


class RestAuth(BaseModel):
    """How aiplane authenticates to an Iceberg REST catalog. Keys are references, never values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bearer", "ibm-iam", "zenapikey"]
    """``bearer``: a token; ``ibm-iam``: an IBM Cloud API key exchanged for IAM tokens, renewed before they
    expire; ``zenapikey``: Cloud Pak for Data's ``ZenApiKey`` (user and API key)."""
    token: SecretRef | None = None
    api_key: SecretRef | None = None
    username: str | None = None
    iam_url: str = "https://iam.cloud.ibm.com"

    @model_validator(mode="after")
    def _complete(self) -> "RestAuth":
        need = {"bearer": ("token",), "ibm-iam": ("api_key",), "zenapikey": ("username", "api_key")}[self.type]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"auth type {self.type!r} needs {', '.join(missing)}")
        return self


def _auth_config(auth: RestAuth | None) -> dict[str, Any]:
    """pyiceberg's ``auth`` property for these settings: the managers read keys from the environment themselves."""
    if auth is None:
        return {"type": "noop"}
    impl = "aiplane.plugins.iceberg.auth." + {
        "bearer": "BearerEnvAuthManager", "ibm-iam": "IbmIamAuthManager", "zenapikey": "ZenApiKeyAuthManager",
    }[auth.type]  # fmt: skip
    custom: dict[str, Callable[[], dict[str, Any]]] = {
        "bearer": lambda: {"token_env": _env_of(auth.token)},
        "ibm-iam": lambda: {"apikey_env": _env_of(auth.api_key), "iam_url": auth.iam_url},
        "zenapikey": lambda: {"username": auth.username, "apikey_env": _env_of(auth.api_key)},
    }
    return {"type": "custom", "impl": impl, "custom": custom[auth.type]()}


def _env_of(ref: SecretRef | None) -> str:
    """The variable ``ref`` names; RestAuth's validator has made sure its type's references are set."""
    assert ref is not None
    return ref.env_var


def _summary(snapshot: Snapshot | None) -> dict[str, str]:
    """A snapshot's summary properties (this store's digest, pyiceberg's totals); none for no snapshot or summary."""
    return snapshot.summary.additional_properties if snapshot is not None and snapshot.summary is not None else {}


def _auth_ref(auth: RestAuth | None) -> str:
    ref = auth and (auth.api_key or auth.token)
    return f" from {ref!r}" if ref else ""


class IcebergFeatureStore(FeatureStore):
    """Feature tables in Apache Iceberg, one SQL catalog, full refresh per publish, reads pinned to a snapshot."""

    name: ClassVar[str] = "iceberg"
    # What a workload reading a table imports (the catalog module pulls in the table, scan and IO code).
    preload: ClassVar[tuple[str, ...]] = ("pyarrow.dataset", "pyiceberg.catalog")

    class Settings(BaseModel):
        """The ``feature_store.settings`` of a deployment that uses ``iceberg``."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        catalog: Literal["sql", "rest"] = "sql"
        """``sql``: a SQL catalog (SQLite, PostgreSQL); ``rest``: an Iceberg REST catalog (Polaris, Nessie,
        Unity, Glue REST, watsonx.data)."""
        catalog_uri: str
        """``sql``: SQLAlchemy URL, e.g. ``sqlite:////abs/path/catalog.db``; ``rest``: the catalog's base URL."""
        warehouse: str = ""
        """``sql``: where table files go, a local directory or ``s3://bucket/prefix``; ``rest``: the
        warehouse (or catalog) name the REST catalog expects, if any."""
        s3: S3Settings | None = None
        """The S3-compatible store of the table files, when the catalog does not hand out its own credentials."""
        auth: RestAuth | None = None
        """How to authenticate to a REST catalog; keys by reference."""
        namespace: str = Field(default="aiplane", pattern=_NAME)
        catalog_name: str = Field(default="aiplane", pattern=r"^[A-Za-z0-9_-]+$")

        @model_validator(mode="after")
        def _catalog_fits(self) -> "IcebergFeatureStore.Settings":
            if self.catalog == "rest":
                if not self.catalog_uri.startswith(("http://", "https://")):
                    raise ValueError(f"catalog_uri {self.catalog_uri!r}: a REST catalog is an http(s) URL")
            else:
                if not self.warehouse:
                    raise ValueError("warehouse: a SQL catalog needs one (a local directory or s3://bucket/prefix)")
                if self.auth is not None:
                    raise ValueError("auth: only a REST catalog takes it")
            return self

        @field_validator("catalog_uri")
        @classmethod
        def _sql_url(cls, value: str, info) -> str:
            if info.data.get("catalog") == "rest":
                return value.rstrip("/")
            if not re.match(r"^[A-Za-z][A-Za-z0-9+_]*://", value):
                raise ValueError(f"{value!r} is not a SQLAlchemy URL; write e.g. 'sqlite:////abs/path/catalog.db'")
            if re.match(r"^[^:/]+://[^/@]*:[^/@]*@", value):
                # The settings travel in every FeaturesRecord and Dagster's metadata: no password may ride along.
                raise ValueError(
                    "the catalog URL holds a password; secrets are never written in settings. "
                    "Use a URL without one (e.g. a client-certificate or IAM-authenticated connection)"
                )
            if value.startswith("sqlite:"):
                path, sep, query = value.removeprefix("sqlite:///").partition("?")
                if not value.startswith("sqlite:///") or path in ("", ":memory:"):
                    raise ValueError(
                        "an in-memory SQLite catalog cannot be shared by the processes that read the features; "
                        "give a file, e.g. 'sqlite:////abs/path/catalog.db'"
                    )
                # A relative path would mean a different catalog in every working directory.
                value = f"sqlite:///{os.path.abspath(os.path.expanduser(path))}{sep}{query}"
            return value

        @field_validator("warehouse")
        @classmethod
        def _warehouse(cls, value: str, info) -> str:
            if info.data.get("catalog") == "rest" or not value or value.startswith("s3://"):
                return value
            if value.startswith("file://"):
                value = value.removeprefix("file://")
            elif "://" in value:
                raise ValueError(f"{value!r}: the warehouse is a local directory or s3://bucket/prefix")
            return os.path.abspath(os.path.expanduser(value))

    def locations(self) -> dict[str, str]:
        # A SQL catalog's tables go under its warehouse; a REST catalog's server decides where (per-region
        # storage then relies on that catalog being the region's own).
        s: Any = self.settings
        return {"warehouse": s.warehouse} if getattr(s, "catalog", "rest") == "sql" else {}

    def __init__(self, settings: Any = None, catalog: "Catalog | None" = None):
        """``catalog``: a pyiceberg catalog to use instead of opening the one the settings name (tests pass one)."""
        super().__init__(settings)
        self._ice = self._iceberg_settings()
        self._catalog_cache: Catalog | None = catalog
        # Snapshot files by manifest list (immutable): a refresh asks for the current record, then
        # publishes, and a no-op publish records the same snapshot; its manifests are read once.
        self._files_cache: dict[str, dict[str, Any] | None] = {}

    def _iceberg_settings(self) -> "IcebergFeatureStore.Settings":
        """The settings in this class's own terms; a store with friendlier settings (watsonx-data) maps them."""
        return self.settings

    # ------------------------------------------------------------ public API

    def publish(self, rows: "pyarrow.Table", table: str) -> FeaturesRecord:
        """Make ``rows`` the whole content of ``table`` and return a record pinned to its snapshot.

        ``rows`` must have exactly the string columns of :data:`FEATURE_COLUMNS`
        and no nulls; this is checked before anything is written. Rows equal to
        the current snapshot's, in any order, commit nothing and return the
        current snapshot's record.
        """
        import pyarrow.compute as pc
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError, ValidationException

        self._check_table_name(table)
        canonical = _canonical_rows(rows)
        digest = _content_digest(canonical)
        residency = tuple(sorted(pc.unique(canonical.column("residency")).to_pylist()))
        properties = {DIGEST_PROPERTY: digest, RESIDENCY_PROPERTY: json.dumps(list(residency))}
        # Sorted only when a commit will write them: a refresh that changes nothing never sorts.
        to_write: list[pyarrow.Table] = []

        def written() -> "pyarrow.Table":
            if not to_write:
                to_write.append(_sorted_rows(canonical))
            return to_write[0]

        catalog = self._catalog(create=True)
        assert catalog is not None  # create=True makes one
        for attempt in range(_COMMIT_ATTEMPTS):
            existing = self._load(catalog, table)
            try:
                if existing is None:
                    self._ensure_namespace(catalog)
                    tx = catalog.create_table_transaction(self._identifier(table), _feature_schema())
                    tx.append(written(), snapshot_properties=properties)
                    published = tx.commit_transaction()
                else:
                    self._check_schema(table, existing.schema(), what="cannot be refreshed")
                    current = existing.current_snapshot()
                    if current is not None and _summary(current).get(DIGEST_PROPERTY) == digest:
                        return self._record(existing, current, table)
                    from pyiceberg.expressions import AlwaysTrue

                    # Delete and append in one transaction: one atomic catalog commit,
                    # so a reader sees the old rows or the new, never an empty table.
                    with existing.transaction() as refresh:
                        if current is not None and _summary(current).get("total-records") != "0":
                            refresh.delete(AlwaysTrue())
                        refresh.append(written(), snapshot_properties=properties)
                    published = existing
            except (CommitFailedException, TableAlreadyExistsError, ValidationException):
                # Another publisher committed first (pyiceberg already retried what it
                # safely could): back off, then start over from the table as it is now.
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
                continue
            # The committed metadata, not a reload: a reload could already show a
            # later publisher's snapshot, and this record must pin our own.
            snapshot = published.current_snapshot()
            if snapshot is None or _summary(snapshot).get(DIGEST_PROPERTY) != digest:
                raise RuntimeError(f"Publishing feature table {self._qualified(table)!r} committed no snapshot of these rows")
            return self._record(published, snapshot, table)
        raise AssertionError("unreachable")

    def read(self, features: FeaturesRecord) -> "pyarrow.Table":
        """The rows of ``features``, read at its pinned snapshot (never the latest), in :data:`FEATURE_COLUMNS` order."""
        store = features.store.get("name")
        if store not in (None, self.name):
            raise InputError(
                f"Features {features.uri!r} were published by the {store!r} feature store, not {self.name!r}; "
                "read them with the store named in the record"
            )
        namespace, _, table = features.table.rpartition(".")
        if namespace != self._ice.namespace:
            raise InputError(
                f"Feature table {features.table!r} is not in namespace {self._ice.namespace!r} of "
                f"Iceberg catalog {self._ice.catalog_name!r}; configure the feature store the record names"
            )
        # The snapshot's files are immutable: fetch them while the catalog is asked for the snapshot.
        with self._prefetch(features) as prefetch:
            return self._read(features, table, prefetch)

    def _read(self, features: FeaturesRecord, table: str, prefetch: "_Prefetch | None") -> "pyarrow.Table":
        import pyarrow as pa

        catalog = self._catalog(create=False)
        loaded = self._load(catalog, table) if catalog is not None else None
        if loaded is None:
            raise InputError(
                f"Feature table {features.table!r} does not exist in Iceberg catalog {self._ice.catalog_name!r} "
                f"({self._ice.catalog_uri}): materialize the `features` asset first"
            )
        snapshot = loaded.snapshot_by_id(features.snapshot_id)
        if snapshot is None:
            known = ", ".join(str(s.snapshot_id) for s in loaded.snapshots()) or "(none)"
            raise InputError(
                f"Snapshot {features.snapshot_id} of feature table {features.table!r} does not exist "
                f"(known snapshots: {known}); it may have been expired. Re-materialize the `features` asset"
            )
        schema = loaded.schemas().get(snapshot.schema_id) if snapshot.schema_id is not None else None
        self._check_schema(table, schema or loaded.schema(), what="cannot be read")
        pinned = features.store.get("snapshot_files") or {}
        fetched = None
        if prefetch is not None and pinned.get("manifest_list") == snapshot.manifest_list:
            # The same manifest list: the catalog's snapshot is the one whose files were fetched.
            try:
                fetched = prefetch.result()
            except AiplaneError:
                fetched = None  # e.g. the store's keys may not read what the catalog's may: its own scan decides
        if fetched is not None:
            import pyarrow.parquet as pq

            parts = [pq.read_table(pa.BufferReader(data), columns=list(FEATURE_COLUMNS)) for data in fetched]
            result = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        else:
            result = loaded.scan(snapshot_id=snapshot.snapshot_id, selected_fields=FEATURE_COLUMNS).to_arrow()
        return result.select(list(FEATURE_COLUMNS)).cast(_arrow_schema(pa))

    def current(self, table: str) -> FeaturesRecord | None:
        """The record of ``table``'s current snapshot, or ``None`` if the table does not exist or is empty."""
        self._check_table_name(table)
        catalog = self._catalog(create=False)
        loaded = self._load(catalog, table) if catalog is not None else None
        if loaded is None:
            return None
        snapshot = loaded.current_snapshot()
        if snapshot is None:
            return None
        self._check_schema(table, loaded.schema(), what="is not a feature table")
        return self._record(loaded, snapshot, table)

    # ------------------------------------------------------------ helpers

    def _catalog(self, create: bool) -> "Catalog | None":
        """The catalog; with ``create=False``, ``None`` if a SQLite catalog's file does not exist yet.

        Reading must not leave an empty catalog file behind, so only publish creates one.
        """
        if self._catalog_cache is not None:
            return self._catalog_cache
        if self._ice.catalog == "rest":
            self._catalog_cache = self._rest_catalog()
            return self._catalog_cache
        sqlite_file = _sqlite_file(self._ice.catalog_uri)
        if sqlite_file is not None:
            if not create and not os.path.exists(sqlite_file):
                return None
            os.makedirs(os.path.dirname(sqlite_file), exist_ok=True)
        s3_warehouse = self._ice.warehouse.startswith("s3://")
        if create and not s3_warehouse:
            os.makedirs(self._ice.warehouse, exist_ok=True)
        from pyiceberg.catalog.sql import SqlCatalog
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

        warehouse = self._ice.warehouse if s3_warehouse else Path(self._ice.warehouse).as_uri()
        properties = {"uri": self._ice.catalog_uri, "warehouse": warehouse, **self._file_io()}
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                catalog = SqlCatalog(self._ice.catalog_name, **properties)
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                # Processes opening a new catalog together all try to create its tables
                # (one at a time); a loser finds them made when it opens again. SQLite says
                # OperationalError; PostgreSQL, whose CREATE TABLE races on its catalog's
                # unique type name, says IntegrityError (or ProgrammingError: DuplicateTable).
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.05))
        self._catalog_cache = catalog
        return catalog

    def _file_io(self) -> dict[str, str]:
        """pyiceberg FileIO properties for the table files' store; secrets resolved here, where it is opened."""
        return self._ice.s3.pyiceberg_properties() if self._ice.s3 else {}

    def _rest_catalog(self) -> "Catalog":
        """An Iceberg REST catalog client; an unreachable catalog is retried with backoff, then explained."""
        import requests
        from pyiceberg.catalog.rest import RestCatalog
        from pyiceberg.exceptions import ForbiddenError, OAuthError, ServerError, UnauthorizedError

        properties: dict[str, Any] = {"uri": self._ice.catalog_uri, **self._file_io(), "auth": _auth_config(self._ice.auth)}
        if self._ice.warehouse:
            properties["warehouse"] = self._ice.warehouse
        where = f"Iceberg REST catalog {self._ice.catalog_uri}"
        for attempt in range(_CONNECT_ATTEMPTS):
            try:
                return RestCatalog(self._ice.catalog_name, **properties)
            except (UnauthorizedError, ForbiddenError, OAuthError) as exc:
                raise ConfigError(f"{where} refused the credentials{_auth_ref(self._ice.auth)}: {exc}") from None
            except (requests.ConnectionError, requests.Timeout, ServerError) as exc:
                if attempt == _CONNECT_ATTEMPTS - 1:
                    raise InputError(
                        f"{where} cannot be reached after {_CONNECT_ATTEMPTS} attempts ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the URL and the network, then retry."
                    ) from None
                time.sleep(_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _ensure_namespace(self, catalog: "Catalog") -> None:
        from sqlalchemy.exc import IntegrityError

        from pyiceberg.exceptions import NamespaceAlreadyExistsError

        try:
            catalog.create_namespace_if_not_exists(self._ice.namespace)
        except (IntegrityError, NamespaceAlreadyExistsError):
            # A concurrent publisher created it between the existence check and the insert.
            if not catalog.namespace_exists(self._ice.namespace):
                raise

    def _identifier(self, table: str) -> tuple[str, str]:
        return (self._ice.namespace, table)

    def _qualified(self, table: str) -> str:
        return f"{self._ice.namespace}.{table}"

    def _load(self, catalog: "Catalog", table: str) -> "Table | None":
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return catalog.load_table(self._identifier(table))
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    @staticmethod
    def _check_table_name(table: str) -> None:
        if not isinstance(table, str) or not re.match(_NAME, table):
            raise InputError(
                f"Feature table name {table!r} is not valid: use letters, digits and underscores "
                "(the namespace comes from the feature store settings)"
            )

    def _check_schema(self, table: str, schema: "Schema", what: str) -> None:
        from pyiceberg.types import StringType

        names = [f.name for f in schema.fields]
        missing = [c for c in FEATURE_COLUMNS if c not in names]
        extra = [c for c in names if c not in FEATURE_COLUMNS]
        not_string = [
            f"{f.name} ({f.field_type})"
            for f in schema.fields
            if f.name in FEATURE_COLUMNS and not isinstance(f.field_type, StringType)
        ]
        if missing or extra or not_string:
            problems = []
            if missing:
                problems.append(f"missing columns: {', '.join(missing)}")
            if extra:
                problems.append(f"extra columns: {', '.join(extra)}")
            if not_string:
                problems.append(f"not string: {', '.join(not_string)}")
            raise InputError(
                f"Wrong-schema feature table {self._qualified(table)!r} {what}: {'; '.join(problems)}. "
                f"A feature table has exactly the string columns {', '.join(FEATURE_COLUMNS)}; "
                "drop the table or publish to another table name"
            )

    def _prefetch(self, features: FeaturesRecord) -> "contextlib.AbstractContextManager[_Prefetch | None]":
        """Fetching of the record's snapshot files (see :meth:`_snapshot_files`), started now; ``None`` when
        there is nothing to fetch ahead: no list, files that are not in S3, or keys only the catalog hands out."""
        pinned = features.store.get("snapshot_files") or {}
        paths = [path for path, _ in pinned.get("files", [])]
        if not paths or self._ice.s3 is None or not all(p.startswith("s3://") for p in paths):
            return contextlib.nullcontext()
        return _Prefetch(paths, self._ice.s3)

    def _snapshot_files(self, loaded: "Table", snapshot: Any) -> dict[str, Any] | None:
        """The data files of a snapshot this store wrote, for readers to fetch while they ask the catalog.

        Only a few whole files with no delete files (what a publish writes); a
        reader trusts the list only if the catalog's snapshot has the same manifest list.
        """
        from pyiceberg.table import StagedTable

        if isinstance(loaded, StagedTable):
            return None  # the table this publish created: it cannot be scanned until loaded again
        if snapshot.manifest_list not in self._files_cache:
            self._files_cache[snapshot.manifest_list] = self._plan_files(loaded, snapshot)
        return self._files_cache[snapshot.manifest_list]

    @staticmethod
    def _plan_files(loaded: "Table", snapshot: Any) -> dict[str, Any] | None:
        tasks = list(loaded.scan(snapshot_id=snapshot.snapshot_id).plan_files())
        size = sum(t.file.file_size_in_bytes for t in tasks)
        if not tasks or len(tasks) > _PREFETCH_FILES or size > _PREFETCH_BYTES or any(t.delete_files for t in tasks):
            return None
        return {
            "manifest_list": snapshot.manifest_list,
            "files": [[t.file.file_path, t.file.file_size_in_bytes] for t in tasks],
        }

    def _record(self, loaded: "Table", snapshot: Any, table: str) -> FeaturesRecord:
        props = snapshot.summary.additional_properties
        row_count = props.get("total-records")
        residency = props.get(RESIDENCY_PROPERTY)
        if row_count is None or residency is None:
            # A snapshot not written by this store: derive the facts from its rows.
            column = loaded.scan(snapshot_id=snapshot.snapshot_id, selected_fields=("residency",)).to_arrow()
            row_count = column.num_rows
            residency_values = sorted({v for v in column.column("residency").to_pylist() if v is not None})
        else:
            residency_values = sorted(json.loads(residency))
        extra: dict[str, Any] = {}
        if residency is not None and (files := self._snapshot_files(loaded, snapshot)) is not None:
            extra["snapshot_files"] = files
        qualified = self._qualified(table)
        snapshot_id = snapshot.snapshot_id
        return FeaturesRecord(
            uri=f"iceberg://{self._ice.catalog_name}/{qualified}?snapshot={snapshot_id}",
            digest=f"iceberg-snapshot:{snapshot_id}",
            table=qualified,
            snapshot_id=snapshot_id,
            row_count=int(row_count),
            columns=FEATURE_COLUMNS,
            residency=tuple(residency_values),
            store={"name": self.name, "settings": self.settings.model_dump(mode="json"), **extra},
        )


# Prefetched whole, so bounded: beyond these, pyiceberg streams the scan.
_PREFETCH_FILES = 64
_PREFETCH_BYTES = 256 << 20


class _Prefetch:
    """Whole data files fetched in background threads; the bytes are dropped if the read ends otherwise."""

    def __init__(self, paths: list[str], s3: S3Settings):
        from concurrent.futures import ThreadPoolExecutor

        from aiplane.core.storage import Storage

        storage = Storage(s3)
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(paths)), thread_name_prefix="aiplane-prefetch")
        self._futures = [self._pool.submit(storage.read_bytes, path) for path in paths]

    def result(self) -> list[bytes]:
        return [future.result() for future in self._futures]

    def __enter__(self) -> "_Prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _feature_schema() -> "Schema":
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField, StringType

    # Optional fields: pyarrow columns are nullable, and nulls are rejected before writing anyway.
    return Schema(*(NestedField(i + 1, name, StringType(), required=False) for i, name in enumerate(FEATURE_COLUMNS)))


def _arrow_schema(pa: Any) -> "pyarrow.Schema":
    return pa.schema([(name, pa.string()) for name in FEATURE_COLUMNS])


def _sqlite_file(catalog_uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URL (made absolute by the settings), else ``None``."""
    if not catalog_uri.startswith("sqlite:///"):
        return None
    return catalog_uri.removeprefix("sqlite:///").partition("?")[0]


def _canonical_rows(rows: Any) -> "pyarrow.Table":
    """``rows`` checked, with columns in :data:`FEATURE_COLUMNS` order and plain strings, in the input's row order.

    Raises InputError, before anything is written, when the rows are not a
    feature table. The digest does not depend on the row order; the rows are
    sorted (:func:`_sorted_rows`) only when they are written.
    """
    import pyarrow as pa

    expected = ", ".join(FEATURE_COLUMNS)
    if not isinstance(rows, pa.Table):
        raise InputError(
            f"Feature rows must be a pyarrow.Table with the string columns {expected}; got {type(rows).__name__}. "
            "Build one with pyarrow.Table.from_pylist(rows)"
        )
    names = rows.column_names
    missing = [c for c in FEATURE_COLUMNS if c not in names]
    extra = [c for c in names if c not in FEATURE_COLUMNS]
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if missing or extra or duplicated:
        problems = [
            label + ", ".join(cols)
            for label, cols in (("missing columns: ", missing), ("extra columns: ", extra), ("repeated columns: ", duplicated))
            if cols
        ]
        raise InputError(
            f"Feature rows have the wrong columns ({'; '.join(problems)}). Expected exactly the string columns {expected}"
        )
    strings = {pa.string(), pa.large_string()}
    if hasattr(pa, "string_view"):
        strings.add(pa.string_view())
    wrong_type = [f"{c} ({rows.schema.field(c).type})" for c in FEATURE_COLUMNS if rows.schema.field(c).type not in strings]
    if wrong_type:
        raise InputError(
            f"Feature columns must be strings; not string: {', '.join(wrong_type)}. Expected the string columns {expected}"
        )
    with_nulls = [c for c in FEATURE_COLUMNS if rows.column(c).null_count]
    if with_nulls:
        raise InputError(
            f"Feature rows have empty (null) values in: {', '.join(with_nulls)}; every row needs all of {expected}"
        )
    if rows.num_rows == 0:
        raise InputError("No feature rows to publish: the table would be empty; check the source data")
    return rows.select(list(FEATURE_COLUMNS)).cast(_arrow_schema(pa))


def _sorted_rows(canonical: "pyarrow.Table") -> "pyarrow.Table":
    """The rows sorted by every column (``id`` first), so the files written do not depend on the input order."""
    return canonical.sort_by([(c, "ascending") for c in FEATURE_COLUMNS]).combine_chunks()


def _content_digest(canonical: "pyarrow.Table") -> str:
    """``sha256:`` of an order-independent fingerprint of the rows: the same rows in any order, the same digest.

    Each row is serialized without ambiguity: the byte lengths of its values
    (little-endian uint32), then the values, zero-padded to whole 64-bit words.
    Every word is salted with its position in the row and mixed into two 64-bit
    lanes; a row's lane is the sum of its mixed words, finalized with a
    splitmix64-style avalanche, and the table's lane is the sum of its rows'
    (mod 2**64). A sum does not depend on the order of the rows and, unlike a
    xor, counts repeated rows. The digest hashes the format, the column names,
    the row count and both lanes.

    Why this is enough: with row hashes that behave as random 128-bit values,
    two different row multisets give equal lane sums with probability about
    2**-128, however many rows there are (a multiset sum, not a search for any
    colliding pair among all rows). The mixing is not cryptographic: the digest
    detects changed data, not a forger. A multiply spreads a change in a word
    only towards its high bits, so each lane folds the high half back down,
    and the second lane byte-swaps every word first, so a change in a word's
    top byte is spread fully in at least one lane.

    It is vectorized with numpy over the Arrow buffers, a few thousand rows at
    a time so the word arrays stay in the CPU cache: about 0.15 s of CPU per
    million rows of tickets, where sorting every column alone took longer.
    """
    import numpy as np

    sums = [0, 0]
    scratch = np.empty(0, np.uint64)
    if canonical.num_rows and canonical.column(0).num_chunks > 1 + canonical.num_rows // _DIGEST_BATCH_ROWS:
        canonical = canonical.combine_chunks()  # many small chunks: hash them as few large batches
    for batch in canonical.to_batches(max_chunksize=_DIGEST_BATCH_ROWS):
        words, bounds = _row_words(batch)
        if scratch.size < 3 * words.size + 1:
            scratch = np.empty(3 * words.size + 1, np.uint64)
        for lane, total in enumerate(_lane_sums(words, bounds, scratch)):
            sums[lane] = (sums[lane] + total) & 0xFFFFFFFFFFFFFFFF
    h = hashlib.sha256(_DIGEST_FORMAT)
    for name in FEATURE_COLUMNS:
        h.update(name.encode() + b"\0")
    h.update(canonical.num_rows.to_bytes(8, "big") + sums[0].to_bytes(8, "big") + sums[1].to_bytes(8, "big"))
    return "sha256:" + h.hexdigest()


def _row_words(batch: "pyarrow.RecordBatch") -> tuple[Any, Any]:
    """The batch's rows serialized as :func:`_content_digest` says, as one array of 64-bit words, and where each
    row starts in it (row ``r`` is ``words[bounds[r]:bounds[r + 1]]``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    header = 4 * len(FEATURE_COLUMNS)
    # Past 2 GiB a batch needs 64-bit offsets (a few rows of huge values).
    binary, offset = (pa.large_binary(), np.int64) if batch.nbytes >= 1 << 30 else (pa.binary(), np.int32)
    values = [batch.column(name).cast(binary) for name in FEATURE_COLUMNS]
    lengths = np.empty((n, len(FEATURE_COLUMNS)), "<u4")
    padding = np.full(n, -header, np.int64)
    for k, column in enumerate(values):
        length = pc.binary_length(column).to_numpy()
        lengths[:, k] = length
        padding -= length
    padding &= 7
    prefix = pa.Array.from_buffers(
        binary, n, [None, pa.py_buffer(np.arange(0, header * (n + 1), header, dtype=offset)), pa.py_buffer(lengths)]
    )
    pads = pa.array([b"\0" * k for k in range(8)], pa.binary()).take(pa.array(padding)).cast(binary)
    rows = pc.binary_join_element_wise(prefix, *values, pads, pa.scalar(b"", binary))
    bounds = np.right_shift(np.frombuffer(rows.buffers()[1], offset, count=n + 1), 3)
    words = np.frombuffer(rows.buffers()[2], "<u8", count=int(bounds[-1]))
    return words, bounds


def _lane_sums(words: Any, bounds: Any, scratch: Any) -> tuple[int, int]:
    """Both lanes' sums of the rows' mixed words, as :func:`_content_digest` says; ``scratch`` holds at least
    ``3 * words.size + 1`` words (reused across batches: allocating it each time costs more than the hashing)."""
    import numpy as np

    u64 = np.uint64
    salt, half = u64(0x9E3779B97F4A7C15), u64(32)
    mix1, mix2 = u64(0xBF58476D1CE4E5B9), u64(0x94D049BB133111EB)  # splitmix64's
    lanes = ((mix1, u64(0xD6E8FEB86659FD93)), (mix2, u64(0xA0761D6478BD642F)))  # (word multiplier, row seed)
    size = words.size
    x, y, cumulative = scratch[:size], scratch[size : 2 * size], scratch[2 * size : 3 * size + 1]
    # x = each word's position in its row (a running count reset at every row start), times an odd salt, xor the word.
    x.fill(1)
    x[bounds[1:-1]] = u64(1) - np.diff(bounds[:-1]).astype(u64)
    x[0] = 0
    np.cumsum(x, out=x)
    x *= salt
    x ^= words
    cumulative[0] = 0
    sums = []
    for lane, (multiplier, seed) in enumerate(lanes):
        if lane:
            x.byteswap(inplace=True)
        np.multiply(x, multiplier, out=y)
        np.right_shift(y, half, out=cumulative[1:])  # (cumulative as scratch until the cumsum below)
        y ^= cumulative[1:]
        np.cumsum(y, out=cumulative[1:])
        row = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
        row ^= seed
        row ^= row >> u64(30)
        row *= mix1
        row ^= row >> u64(27)
        row *= mix2
        row ^= row >> u64(31)
        sums.append(int(row.sum(dtype=u64)))
    return sums[0], sums[1]
