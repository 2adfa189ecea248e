"""The feature store contract: publish pins a snapshot, the same rows make none, a record reads its own snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.components import FEATURE_COLUMNS, FeatureStore
from aiplane.core.errors import InputError
from aiplane.core.records import FeaturesRecord

from ._common import Broken, check_check, check_settings
from .fixtures import sample_rows

__all__ = ["check_feature_store"]


def check_feature_store(
    cls: type[FeatureStore[Any]], settings: Mapping[str, Any] | None, tmp_path: Path, table: str = "conformance_train"
) -> None:
    """Drive feature store ``cls`` through the contract; raise ConformanceError naming the broken promise.

    ``settings`` should point the store at somewhere under ``tmp_path`` (its ``check()`` is watched for writes there).
    """
    store = check_settings(cls, FeatureStore, "feature store", settings)
    broken = Broken("feature store", cls.name)
    check_check(store, broken, tmp_path, "feature_store", settings)
    broken.require(store.current(table) is None, "current() of a table never published must be None")

    first_rows, second_rows = sample_rows(0), sample_rows(1)
    first = store.publish(first_rows, table)
    _check_record(broken, first, first_rows, cls.name)
    broken.require(_pinned(store.current(table)) == _pinned(first), "current() right after publish() must be the record publish() returned")
    again = store.publish(first_rows, table)
    broken.require(
        again.digest == first.digest and again.snapshot_id == first.snapshot_id,
        "publishing the same rows again must make no new snapshot (same digest and snapshot_id)",
    )
    second = store.publish(second_rows, table)
    _check_record(broken, second, second_rows, cls.name)
    broken.require(second.digest != first.digest, "publishing other rows must give a new snapshot (a new digest)")
    broken.require(_pinned(store.current(table)) == _pinned(second), "current() must follow the newest publish()")
    old = store.read(first)
    broken.require(_same(old, first_rows), "read() of the first record must give its own rows, not the newest")
    broken.require(_same(store.read(second), second_rows), "read() of the newest record must give its rows")
    gone = first.model_copy(update={"snapshot_id": first.snapshot_id + 987654321, "digest": first.digest + "0"})
    try:
        store.read(gone)
    except InputError:
        pass
    except Exception as exc:  # noqa: BLE001 - the promise is about which error escapes
        raise broken(f"read() of a missing snapshot must raise InputError, not {type(exc).__name__}: {exc}") from None
    else:
        raise broken("read() of a record whose snapshot does not exist must raise InputError, not return rows")


def _check_record(broken: Broken, record: Any, rows: Any, name: str) -> None:
    broken.require(isinstance(record, FeaturesRecord), f"publish() must return a FeaturesRecord, not {type(record).__name__}")
    broken.require(record.row_count == rows.num_rows, f"record.row_count is {record.row_count}, the table has {rows.num_rows}")
    broken.require(tuple(record.columns) == FEATURE_COLUMNS, f"record.columns is {record.columns}, not {FEATURE_COLUMNS}")
    broken.require(
        set(record.residency) == set(rows.column("residency").to_pylist()),
        f"record.residency {record.residency} is not the residency tags of the rows",
    )
    broken.require(
        record.store.get("name") == name,
        f"record.store['name'] is {record.store.get('name')!r}, not {name!r} (a workload re-creates the store from it)",
    )


def _pinned(record: Any) -> Any:
    """What a record pins; ``store`` may carry more than it did at publish (the files a read needs)."""
    fields = ("uri", "digest", "table", "snapshot_id", "row_count", "columns", "residency")
    return {f: getattr(record, f) for f in fields} if isinstance(record, FeaturesRecord) else record


def _same(a: Any, b: Any) -> bool:
    key = [("id", "ascending")]
    return a.select(list(FEATURE_COLUMNS)).sort_by(key).to_pylist() == b.select(list(FEATURE_COLUMNS)).sort_by(key).to_pylist()
