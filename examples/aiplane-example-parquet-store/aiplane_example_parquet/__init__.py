"""An example third-party feature store: versioned tables as parquet files in a directory.

A snapshot is a file named by the sha256 of the rows' Arrow IPC bytes, so the same
rows give the same snapshot and a record's snapshot never changes under it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from aiplane.core import FeaturesRecord, FeatureStore, InputError, hookimpl
from aiplane.core.components import FEATURE_COLUMNS

__all__ = ["ParquetFeatureStore", "aiplane_feature_stores"]

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str
    """Where each table's folder of snapshots lives (created on first publish)."""


class ParquetFeatureStore(FeatureStore[_Settings]):
    name = "example-parquet"
    Settings = _Settings

    def locations(self) -> dict[str, str]:
        return {"directory": self.settings.directory}

    def check(self, deployment) -> list[str]:
        root = Path(self.settings.directory).expanduser()
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            return [f"example-parquet: {root} cannot be created here; give a writable directory"]
        return []

    def publish(self, rows: pa.Table, table: str) -> FeaturesRecord:
        folder = self._folder(table)
        rows = rows.select(list(FEATURE_COLUMNS))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        digest = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
        path = folder / f"{digest}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _replace(folder, path, lambda tmp: pq.write_table(rows, tmp))
        _replace(folder, folder / "CURRENT", lambda tmp: Path(tmp).write_text(digest))
        return self._record(table, path)

    def current(self, table: str) -> FeaturesRecord | None:
        marker = self._folder(table) / "CURRENT"
        if not marker.exists():
            return None
        return self._record(table, self._folder(table) / f"{marker.read_text().strip()}.parquet")

    def read(self, features: FeaturesRecord) -> pa.Table:
        path = self._folder(features.table) / f"{features.digest.removeprefix('sha256:')}.parquet"
        if not path.exists():
            raise InputError(f"example-parquet: snapshot {features.digest} of {features.table!r} is not in {path.parent}")
        rows = pq.read_table(path)
        if tuple(rows.column_names) != FEATURE_COLUMNS:
            raise InputError(f"example-parquet: {path} has columns {rows.column_names}, not {list(FEATURE_COLUMNS)}")
        return rows

    def _folder(self, table: str) -> Path:
        if not _NAME.match(table):
            raise InputError(f"example-parquet: table name {table!r}: use letters, digits and underscores")
        return Path(self.settings.directory).expanduser() / table

    def _record(self, table: str, path: Path) -> FeaturesRecord:
        meta = pq.read_metadata(path)
        digest = path.stem
        return FeaturesRecord(
            uri=path.as_uri(),
            digest=f"sha256:{digest}",
            table=table,
            snapshot_id=int(digest[:15], 16),
            row_count=meta.num_rows,
            columns=FEATURE_COLUMNS,
            residency=tuple(sorted(set(pq.read_table(path, columns=["residency"]).column(0).to_pylist()))),
            store={"name": self.name, "settings": self.settings.model_dump()},
        )


def _replace(folder: Path, path: Path, write) -> None:
    """Write through a temporary file and rename: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@hookimpl
def aiplane_feature_stores():
    return [ParquetFeatureStore]
