"""The ``iceberg`` feature store against a real SQL catalog (SQLite) in a temporary directory."""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.plugins import Registry
from aiplane.core.records import FeaturesRecord, record_from_json, record_to_json
from aiplane.core.sample import generate_tickets, to_features
from aiplane.plugins.iceberg import IcebergFeatureStore

TABLE = "tickets"


def _settings(root: Path) -> dict[str, str]:
    return {"catalog_uri": f"sqlite:///{root}/iceberg/catalog.db", "warehouse": str(root / "iceberg" / "warehouse")}


@pytest.fixture
def store(tmp_path: Path) -> IcebergFeatureStore:
    return IcebergFeatureStore(_settings(tmp_path))


@pytest.fixture(scope="module")
def features() -> list[dict[str, str]]:
    return to_features(generate_tickets(200))


def _table(rows: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def _snapshot_count(store: IcebergFeatureStore, table: str = TABLE) -> int:
    catalog = store._catalog(create=False)
    return len(catalog.load_table((store.settings.namespace, table)).metadata.snapshots)


def test_publish_returns_record_pinned_to_current_snapshot(store, features):
    record = store.publish(_table(features), TABLE)

    assert isinstance(record, FeaturesRecord)
    assert record.table == "aiplane.tickets"
    assert record.uri == f"iceberg://aiplane/aiplane.tickets?snapshot={record.snapshot_id}"
    assert record.digest == f"iceberg-snapshot:{record.snapshot_id}"
    assert record.row_count == 200
    assert record.columns == FEATURE_COLUMNS
    assert record.residency == tuple(sorted({r["residency"] for r in features}))
    assert record.store == {"name": "iceberg", "settings": store.settings.model_dump()}
    assert store.current(TABLE).snapshot_id == record.snapshot_id
    # The record survives JSON and is readable by a fresh store built from its own settings.
    again = record_from_json(record_to_json(record))
    rows = IcebergFeatureStore(again.store["settings"]).read(again)
    assert rows.column_names == list(FEATURE_COLUMNS)
    assert sorted(rows.to_pylist(), key=lambda r: r["id"]) == sorted(features, key=lambda r: r["id"])


def test_refresh_without_new_data_creates_no_snapshot(store, features):
    first = store.publish(_table(features), TABLE)
    shuffled = list(features)
    random.Random(1).shuffle(shuffled)
    # Same rows, another order and another column order.
    reordered = _table(shuffled).select(list(reversed(FEATURE_COLUMNS)))

    second = store.publish(reordered, TABLE)

    assert second.snapshot_id == first.snapshot_id
    assert second.digest == first.digest
    assert _snapshot_count(store) == 1


def test_refresh_with_changed_rows_creates_new_snapshot(store, features):
    first = store.publish(_table(features), TABLE)
    before = _snapshot_count(store)
    changed = [dict(r) for r in features]
    changed[0]["completion"] = " hardware critical" if changed[0]["completion"] != " hardware critical" else " email low"

    second = store.publish(_table(changed), TABLE)

    assert second.snapshot_id != first.snapshot_id
    assert _snapshot_count(store) > before
    assert store.current(TABLE).snapshot_id == second.snapshot_id


def test_read_of_old_record_returns_old_rows_after_refresh(store, features):
    old = store.publish(_table(features), TABLE)
    grown = to_features(generate_tickets(260))
    new = store.publish(_table(grown), TABLE)

    old_rows = store.read(old)
    new_rows = store.read(new)

    assert old_rows.num_rows == 200 and new.row_count == 260 and new_rows.num_rows == 260
    assert sorted(r["id"] for r in old_rows.to_pylist()) == sorted(r["id"] for r in features)
    assert sorted(r["id"] for r in new_rows.to_pylist()) == sorted(r["id"] for r in grown)


def test_read_of_missing_table_says_to_materialize_features(store, features, tmp_path):
    record = store.publish(_table(features), TABLE)
    elsewhere = IcebergFeatureStore(_settings(tmp_path / "other"))

    with pytest.raises(InputError, match="does not exist.*materialize the `features` asset first"):
        elsewhere.read(record)
    # Reading must not create a catalog as a side effect.
    assert not (tmp_path / "other").exists()


def test_read_of_unknown_snapshot_names_it(store, features):
    record = store.publish(_table(features), TABLE)
    bogus = record.model_copy(update={"snapshot_id": record.snapshot_id + 1})

    with pytest.raises(InputError, match=f"Snapshot {bogus.snapshot_id} .*does not exist"):
        store.read(bogus)


def test_read_of_wrong_schema_table_names_the_columns(store, features):
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField, StringType

    store.publish(_table(features), TABLE)  # creates the catalog and namespace
    catalog = store._catalog(create=False)
    odd = catalog.create_table(
        ("aiplane", "odd"),
        Schema(
            NestedField(1, "id", StringType(), required=False),
            NestedField(2, "text", StringType(), required=False),
        ),
    )
    odd.append(pa.table({"id": ["1"], "text": ["hello"]}))
    snapshot_id = odd.refresh().current_snapshot().snapshot_id
    record = FeaturesRecord(
        uri=f"iceberg://aiplane/aiplane.odd?snapshot={snapshot_id}",
        digest=f"iceberg-snapshot:{snapshot_id}",
        table="aiplane.odd",
        snapshot_id=snapshot_id,
        row_count=1,
        columns=FEATURE_COLUMNS,
        residency=(),
    )

    with pytest.raises(InputError, match="Wrong-schema feature table") as err:
        store.read(record)
    message = str(err.value)
    assert "missing columns: prompt, completion, residency, split" in message
    assert "extra columns: text" in message
    # Publishing into it is refused too, before anything is written.
    with pytest.raises(InputError, match="extra columns: text"):
        store.publish(_table(features), "odd")
    assert len(catalog.load_table(("aiplane", "odd")).metadata.snapshots) == 1


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        ({"id": ["1"], "prompt": ["p"], "completion": ["c"], "residency": ["eu"]}, "missing columns: split"),
        (
            {"id": ["1"], "prompt": ["p"], "completion": ["c"], "residency": ["eu"], "split": ["train"], "x": ["?"]},
            "extra columns: x",
        ),
        ({"id": [1], "prompt": ["p"], "completion": ["c"], "residency": ["eu"], "split": ["train"]}, "not string: id"),
        ({"id": ["1"], "prompt": [None], "completion": ["c"], "residency": ["eu"], "split": ["train"]}, "null.*prompt"),
    ],
)
def test_publish_of_bad_rows_fails_before_anything_is_created(tmp_path, columns, named):
    store = IcebergFeatureStore(_settings(tmp_path))

    with pytest.raises(InputError, match=named) as err:
        store.publish(pa.table(columns), TABLE)

    assert ", ".join(FEATURE_COLUMNS) in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert store.current(TABLE) is None


def test_publish_with_wrong_columns_leaves_existing_catalog_untouched(store, features):
    store.publish(_table(features), TABLE)
    catalog = store._catalog(create=False)

    with pytest.raises(InputError, match="missing columns: split"):
        store.publish(_table(features).drop_columns(["split"]), "other")

    assert not catalog.table_exists(("aiplane", "other"))
    assert _snapshot_count(store) == 1


def test_publish_into_new_namespace_fails_cleanly_on_bad_rows(tmp_path, features):
    store = IcebergFeatureStore({**_settings(tmp_path), "namespace": "fresh"})
    IcebergFeatureStore(_settings(tmp_path)).publish(_table(features), TABLE)

    with pytest.raises(InputError):
        store.publish(_table(features).drop_columns(["id"]), TABLE)

    assert ("fresh",) not in store._catalog(create=False).list_namespaces()


def test_store_is_reachable_through_the_plugin_manager(tmp_path):
    registry = Registry()

    assert registry.get("feature store", "iceberg") is IcebergFeatureStore
    assert isinstance(registry.create("feature store", "iceberg", _settings(tmp_path)), IcebergFeatureStore)


def test_unknown_setting_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="catalog_urI: Unknown setting 'catalog_urI'.*Did you mean 'catalog_uri'"):
        IcebergFeatureStore({"catalog_urI": "sqlite:////x.db", "warehouse": str(tmp_path)})


def test_in_memory_catalog_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="in-memory"):
        IcebergFeatureStore({"catalog_uri": "sqlite://", "warehouse": str(tmp_path)})


def test_relative_paths_in_settings_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = IcebergFeatureStore({"catalog_uri": "sqlite:///cat/catalog.db", "warehouse": "wh"})

    assert store.settings.catalog_uri == f"sqlite:///{tmp_path}/cat/catalog.db"
    assert store.settings.warehouse == str(tmp_path / "wh")


def test_importing_the_plugin_does_not_import_pyiceberg():
    code = "import sys, aiplane.plugins.iceberg; print(any(m.startswith(('pyiceberg', 'pyarrow')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_concurrent_publishers_of_the_same_rows_share_one_snapshot(tmp_path, features):
    rows = _table(features)
    # One store per worker: separate catalog connections, as in separate processes.
    stores = [IcebergFeatureStore(_settings(tmp_path)) for _ in range(4)]

    with ThreadPoolExecutor(len(stores)) as pool:
        records = list(pool.map(lambda s: s.publish(rows, TABLE), stores))

    assert len({r.snapshot_id for r in records}) == 1
    assert _snapshot_count(stores[0]) == 1


def test_reads_stay_pinned_while_another_store_publishes(store, features, tmp_path):
    old = store.publish(_table(features), TABLE)
    publisher = IcebergFeatureStore(_settings(tmp_path))
    expected = sorted(r["id"] for r in features)

    def publish_more() -> list[FeaturesRecord]:
        return [publisher.publish(_table(to_features(generate_tickets(200 + k))), TABLE) for k in range(1, 4)]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(publish_more)
        seen = [sorted(store.read(old).column("id").to_pylist()) for _ in range(3)]
        published = pending.result()

    assert all(ids == expected for ids in seen)
    assert [r.row_count for r in published] == [201, 202, 203]
    assert store.current(TABLE).snapshot_id == published[-1].snapshot_id
    assert sorted(store.read(old).column("id").to_pylist()) == expected


def test_catalog_url_with_a_password_is_refused_without_echoing_it():
    from aiplane.core.errors import ConfigError
    from aiplane.plugins.iceberg.store import IcebergFeatureStore

    with pytest.raises(ConfigError, match="holds a password") as err:
        IcebergFeatureStore({"catalog_uri": "postgresql://etl:hunter2@db/catalog", "warehouse": "/tmp/w"})
    assert "hunter2" not in str(err.value)
