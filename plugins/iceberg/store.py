"""The ``iceberg`` feature store: training features as Apache Iceberg tables in a SQL catalog.

Every publish is a full refresh committed atomically through the catalog; a
record pins the snapshot it was made from, so a reader always sees exactly the
rows the record names, however often the table is refreshed after it. A refresh
whose rows equal the current snapshot's (in any order) commits nothing, so the
snapshot id, and with it everything downstream, stays the same.

pyiceberg and pyarrow are imported inside the methods: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiplane.core.components import FEATURE_COLUMNS, FeatureStore
from aiplane.core.errors import InputError
from aiplane.core.records import FeaturesRecord

if TYPE_CHECKING:
    import pyarrow
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

__all__ = ["IcebergFeatureStore", "DIGEST_PROPERTY", "RESIDENCY_PROPERTY"]

DIGEST_PROPERTY = "aiplane.content-sha256"
"""Snapshot summary property holding the order-independent digest of the snapshot's rows."""
RESIDENCY_PROPERTY = "aiplane.residency"
"""Snapshot summary property holding the sorted residency tags of the rows, as a JSON list."""

_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DIGEST_FORMAT = b"aiplane-features-v1\0"
# Concurrent publishers race through the catalog's optimistic commit; the loser
# re-reads the table and tries again (and finds nothing to do if the winner
# published the same rows).
_COMMIT_ATTEMPTS = 8


class IcebergFeatureStore(FeatureStore):
    """Feature tables in Apache Iceberg, one SQL catalog, full refresh per publish, reads pinned to a snapshot."""

    name: ClassVar[str] = "iceberg"

    class Settings(BaseModel):
        """The ``feature_store.settings`` of a deployment that uses ``iceberg``."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        catalog_uri: str
        """SQLAlchemy URL of the SQL catalog, e.g. ``sqlite:////abs/path/catalog.db``."""
        warehouse: str
        """Local directory the table data and metadata files are written to; created on first publish."""
        namespace: str = Field(default="aiplane", pattern=_NAME)
        catalog_name: str = Field(default="aiplane", pattern=r"^[A-Za-z0-9_-]+$")

        @field_validator("catalog_uri")
        @classmethod
        def _sql_url(cls, value: str) -> str:
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
        def _local_dir(cls, value: str) -> str:
            if value.startswith("file://"):
                value = value.removeprefix("file://")
            elif "://" in value:
                raise ValueError(f"{value!r}: the warehouse is a local directory, not a URL")
            if not value:
                raise ValueError("the warehouse directory must not be empty")
            return os.path.abspath(os.path.expanduser(value))

    def __init__(self, settings: Any = None):
        super().__init__(settings)
        self._catalog_cache: SqlCatalog | None = None

    # ------------------------------------------------------------ public API

    def publish(self, rows: "pyarrow.Table", table: str) -> FeaturesRecord:
        """Make ``rows`` the whole content of ``table`` and return a record pinned to its snapshot.

        ``rows`` must have exactly the string columns of :data:`FEATURE_COLUMNS`
        and no nulls; this is checked before anything is written. Rows equal to
        the current snapshot's, in any order, commit nothing and return the
        current snapshot's record.
        """
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError, ValidationException

        self._check_table_name(table)
        canonical = _canonical_rows(rows)
        digest = _content_digest(canonical)
        residency = tuple(sorted(set(canonical.column("residency").to_pylist())))
        properties = {DIGEST_PROPERTY: digest, RESIDENCY_PROPERTY: json.dumps(list(residency))}

        catalog = self._catalog(create=True)
        for attempt in range(_COMMIT_ATTEMPTS):
            existing = self._load(catalog, table)
            try:
                if existing is None:
                    self._ensure_namespace(catalog)
                    tx = catalog.create_table_transaction(self._identifier(table), _feature_schema())
                    tx.append(canonical, snapshot_properties=properties)
                    published = tx.commit_transaction()
                else:
                    self._check_schema(table, existing.schema(), what="cannot be refreshed")
                    current = existing.current_snapshot()
                    if current is not None and current.summary.additional_properties.get(DIGEST_PROPERTY) == digest:
                        return self._record(existing, current, table)
                    from pyiceberg.expressions import AlwaysTrue

                    # Delete and append in one transaction: one atomic catalog commit,
                    # so a reader sees the old rows or the new, never an empty table.
                    with existing.transaction() as tx:
                        if current is not None and current.summary.additional_properties.get("total-records") != "0":
                            tx.delete(AlwaysTrue())
                        tx.append(canonical, snapshot_properties=properties)
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
            if snapshot is None or snapshot.summary.additional_properties.get(DIGEST_PROPERTY) != digest:
                raise RuntimeError(f"Publishing feature table {self._qualified(table)!r} committed no snapshot of these rows")
            return self._record(published, snapshot, table)
        raise AssertionError("unreachable")

    def read(self, features: FeaturesRecord) -> "pyarrow.Table":
        """The rows of ``features``, read at its pinned snapshot (never the latest), in :data:`FEATURE_COLUMNS` order."""
        import pyarrow as pa

        store = features.store.get("name")
        if store not in (None, self.name):
            raise InputError(
                f"Features {features.uri!r} were published by the {store!r} feature store, not {self.name!r}; "
                "read them with the store named in the record"
            )
        namespace, _, table = features.table.rpartition(".")
        if namespace != self.settings.namespace:
            raise InputError(
                f"Feature table {features.table!r} is not in namespace {self.settings.namespace!r} of "
                f"Iceberg catalog {self.settings.catalog_name!r}; configure the feature store the record names"
            )
        catalog = self._catalog(create=False)
        loaded = self._load(catalog, table) if catalog is not None else None
        if loaded is None:
            raise InputError(
                f"Feature table {features.table!r} does not exist in Iceberg catalog {self.settings.catalog_name!r} "
                f"({self.settings.catalog_uri}): materialize the `features` asset first"
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

    def _catalog(self, create: bool) -> "SqlCatalog | None":
        """The SQL catalog; with ``create=False``, ``None`` if its SQLite file does not exist yet.

        Reading must not leave an empty catalog file behind, so only publish creates one.
        """
        if self._catalog_cache is not None:
            return self._catalog_cache
        sqlite_file = _sqlite_file(self.settings.catalog_uri)
        if sqlite_file is not None:
            if not create and not os.path.exists(sqlite_file):
                return None
            os.makedirs(os.path.dirname(sqlite_file), exist_ok=True)
        if create:
            os.makedirs(self.settings.warehouse, exist_ok=True)
        from pyiceberg.catalog.sql import SqlCatalog
        from sqlalchemy.exc import OperationalError, ProgrammingError

        properties = {"uri": self.settings.catalog_uri, "warehouse": Path(self.settings.warehouse).as_uri()}
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                catalog = SqlCatalog(self.settings.catalog_name, **properties)
                break
            except (OperationalError, ProgrammingError):
                # Processes opening a new catalog together all try to create its tables
                # (one at a time); a loser finds them made when it opens again.
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.05))
        self._catalog_cache = catalog
        return catalog

    def _ensure_namespace(self, catalog: "SqlCatalog") -> None:
        from sqlalchemy.exc import IntegrityError

        try:
            catalog.create_namespace_if_not_exists(self.settings.namespace)
        except IntegrityError:
            # A concurrent publisher created it between the existence check and the insert.
            if not catalog.namespace_exists(self.settings.namespace):
                raise

    def _identifier(self, table: str) -> tuple[str, str]:
        return (self.settings.namespace, table)

    def _qualified(self, table: str) -> str:
        return f"{self.settings.namespace}.{table}"

    def _load(self, catalog: "SqlCatalog", table: str) -> "Table | None":
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
        qualified = self._qualified(table)
        snapshot_id = snapshot.snapshot_id
        return FeaturesRecord(
            uri=f"iceberg://{self.settings.catalog_name}/{qualified}?snapshot={snapshot_id}",
            digest=f"iceberg-snapshot:{snapshot_id}",
            table=qualified,
            snapshot_id=snapshot_id,
            row_count=int(row_count),
            columns=FEATURE_COLUMNS,
            residency=tuple(residency_values),
            store={"name": self.name, "settings": self.settings.model_dump()},
        )


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
    """``rows`` checked, with columns in :data:`FEATURE_COLUMNS` order, plain strings, sorted by every column.

    Raises InputError, before anything is written, when the rows are not a
    feature table. Sorting by all columns (``id`` first) makes the result, and
    so the digest and the written files, independent of the input order.
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
    ordered = rows.select(list(FEATURE_COLUMNS)).cast(_arrow_schema(pa))
    return ordered.sort_by([(c, "ascending") for c in FEATURE_COLUMNS]).combine_chunks()


def _content_digest(canonical: "pyarrow.Table") -> str:
    """``sha256:`` over the sorted rows, each value length-prefixed so no two tables serialize alike."""
    h = hashlib.sha256(_DIGEST_FORMAT)
    for name in FEATURE_COLUMNS:
        h.update(name.encode() + b"\0")
    columns = [canonical.column(name).to_pylist() for name in FEATURE_COLUMNS]
    for row in zip(*columns):
        for value in row:
            data = value.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return "sha256:" + h.hexdigest()
