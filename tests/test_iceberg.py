"""The Iceberg feature stores, one contract: a SQL catalog (SQLite) with table files on local disk or on S3,
an Iceberg REST catalog on S3 with IBM Cloud IAM, and ``watsonx-data`` on the same REST protocol.

The S3 store is moto's real server on loopback and the REST catalog the loopback
double in ``_iceberg_rest_server.py``; pyiceberg talks to both unmodified.
"""

from __future__ import annotations

import contextlib
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


BACKENDS = ["sql", "sql-s3", "rest-iam-s3", "watsonx-data"]
API_KEY = "aiplane-test-apikey"


@pytest.fixture(scope="module")
def s3():
    from _s3 import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request, s3, monkeypatch):
    """``backend(root, **overrides)``: a store whose catalog is ``root``'s, on this parameter's kind of catalog.

    Stores made for the same root share one catalog (one REST server, one bucket),
    as processes of one deployment do; another root is another, empty catalog.
    """
    from _iceberg_rest_server import IamAuth, iceberg_rest_server

    from aiplane.plugins.iceberg import WatsonxDataFeatureStore

    monkeypatch.setenv("TEST_S3_KEY", s3.access_key_id)
    monkeypatch.setenv("TEST_S3_SECRET", s3.secret_access_key)
    monkeypatch.setenv("TEST_WXD_APIKEY", API_KEY)
    s3_settings = {
        "endpoint": s3.endpoint_url, "region": s3.region,
        "access_key_id": {"env": "TEST_S3_KEY"}, "secret_access_key": {"env": "TEST_S3_SECRET"},
    }  # fmt: skip
    kind = request.param
    roots: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:

        def make(root: Path, **overrides):
            if kind == "sql":
                return IcebergFeatureStore({**_settings(root), **overrides})
            if root not in roots:
                bucket = s3.create_bucket()
                if kind == "sql-s3":
                    # The SQLite file stays in a private place: a store must not create `root` until it publishes.
                    roots[root] = {"catalog_uri": f"sqlite:///{stack.enter_context(_tmpdir())}/catalog.db",
                                   "warehouse": f"s3://{bucket}/warehouse", "s3": s3_settings}  # fmt: skip
                else:
                    roots[root] = stack.enter_context(
                        iceberg_rest_server(
                            f"s3://{bucket}/warehouse", auth=IamAuth(api_keys=(API_KEY,)), file_io=s3.pyiceberg_properties(),
                            vend_file_io=False, catalog_name="iceberg_data" if kind == "watsonx-data" else None,
                        )
                    )  # fmt: skip
            if kind == "sql-s3":
                return IcebergFeatureStore({**roots[root], **overrides})
            server = roots[root]
            if kind == "rest-iam-s3":
                auth = {"type": "ibm-iam", "api_key": {"env": "TEST_WXD_APIKEY"}, "iam_url": server.iam_url}
                return IcebergFeatureStore(
                    {"catalog": "rest", "catalog_uri": server.url, "auth": auth, "s3": s3_settings, **overrides}
                )
            return WatsonxDataFeatureStore(
                {"url": server.url.removesuffix("/mds/iceberg"), "catalog": "iceberg_data", "iam_url": server.iam_url,
                 "api_key": {"env": "TEST_WXD_APIKEY"}, "s3": s3_settings, **overrides}
            )  # fmt: skip

        yield make


@contextlib.contextmanager
def _tmpdir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aiplane-test-catalog-") as tmp:
        yield tmp


@pytest.fixture
def store(backend, tmp_path: Path) -> IcebergFeatureStore:
    return backend(tmp_path)


@pytest.fixture(scope="module")
def features() -> list[dict[str, str]]:
    return to_features(generate_tickets(200))


def _table(rows: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def _snapshot_count(store: IcebergFeatureStore, table: str = TABLE) -> int:
    catalog = store._catalog(create=False)
    return len(catalog.load_table((store._ice.namespace, table)).metadata.snapshots)


def test_publish_returns_record_pinned_to_current_snapshot(store, features):
    record = store.publish(_table(features), TABLE)

    assert isinstance(record, FeaturesRecord)
    assert record.table == "aiplane.tickets"
    assert record.uri == f"iceberg://{store._ice.catalog_name}/aiplane.tickets?snapshot={record.snapshot_id}"
    assert record.digest == f"iceberg-snapshot:{record.snapshot_id}"
    assert record.row_count == 200
    assert record.columns == FEATURE_COLUMNS
    assert record.residency == tuple(sorted({r["residency"] for r in features}))
    assert record.store == {"name": store.name, "settings": store.settings.model_dump(mode="json")}
    assert store.current(TABLE).snapshot_id == record.snapshot_id
    # The record survives JSON and is readable by a fresh store built from its own settings.
    again = record_from_json(record_to_json(record))
    rows = Registry().create("feature store", again.store["name"], again.store["settings"]).read(again)
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


def _without(record: FeaturesRecord, key: str) -> FeaturesRecord:
    return record.model_copy(update={"store": {k: v for k, v in record.store.items() if k != key}})


def test_a_record_pinning_its_files_has_them_fetched_while_the_catalog_confirms_the_snapshot(
    backend, store, features, monkeypatch
):
    from aiplane.plugins.iceberg import store as store_module

    store.publish(_table(features), TABLE)
    record = store.current(TABLE)
    (path, size), = record.store["snapshot_files"]["files"]
    assert path.endswith(".parquet") and size > 0
    used = []
    result = store_module._Prefetch.result
    monkeypatch.setattr(store_module._Prefetch, "result", lambda self: used.append(1) or result(self))
    rows = store.read(record)
    # Fetched ahead where the files are in S3 and the keys are the store's own; the same rows as a planned scan.
    assert used == ([] if store._ice.s3 is None else [1])
    assert rows.equals(store.read(_without(record, "snapshot_files")))
    assert sorted(rows.column("id").to_pylist()) == sorted(r["id"] for r in features)


def test_a_refresh_that_changes_nothing_reads_the_snapshots_manifests_once(backend, tmp_path, features, monkeypatch):
    backend(tmp_path).publish(_table(features), TABLE)
    store = backend(tmp_path)  # a new store, as each refresh makes
    planned = []
    plan = IcebergFeatureStore._plan_files
    monkeypatch.setattr(IcebergFeatureStore, "_plan_files", staticmethod(lambda *a: planned.append(1) or plan(*a)))
    before = store.current(TABLE)
    after = store.publish(_table(features), TABLE)
    assert after.snapshot_id == before.snapshot_id and after.store["snapshot_files"] == before.store["snapshot_files"]
    assert planned == [1]


def test_a_pinned_file_list_the_catalogs_snapshot_does_not_have_is_ignored(store, features, monkeypatch):
    from aiplane.plugins.iceberg import store as store_module

    store.publish(_table(features), TABLE)
    record = store.current(TABLE)
    stale = {"manifest_list": "s3://elsewhere/snap-1.avro", "files": [["s3://elsewhere/data.parquet", 10]]}
    tampered = record.model_copy(update={"store": {**record.store, "snapshot_files": stale}})
    monkeypatch.setattr(store_module._Prefetch, "result", lambda self: pytest.fail("a stale list was trusted"))
    assert sorted(store.read(tampered).column("id").to_pylist()) == sorted(r["id"] for r in features)


def test_pinned_files_the_stores_keys_cannot_fetch_are_read_through_the_catalog_instead(store, features, monkeypatch):
    from aiplane.core.errors import InputError as StorageError
    from aiplane.plugins.iceberg import store as store_module

    store.publish(_table(features), TABLE)
    record = store.current(TABLE)

    def refused(self):
        raise StorageError("Storage 's3://...': AccessDenied")

    monkeypatch.setattr(store_module._Prefetch, "result", refused)
    assert sorted(store.read(record).column("id").to_pylist()) == sorted(r["id"] for r in features)


def test_read_of_missing_table_says_to_materialize_features(backend, store, features, tmp_path):
    record = store.publish(_table(features), TABLE)
    elsewhere = backend(tmp_path / "other")

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
def test_publish_of_bad_rows_fails_before_anything_is_created(backend, tmp_path, columns, named):
    store = backend(tmp_path)

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


def test_publish_into_new_namespace_fails_cleanly_on_bad_rows(backend, tmp_path, features):
    store = backend(tmp_path, namespace="fresh")
    backend(tmp_path).publish(_table(features), TABLE)

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


def test_concurrent_publishers_of_the_same_rows_share_one_snapshot(backend, tmp_path, features):
    rows = _table(features)
    # One store per worker: separate catalog connections, as in separate processes.
    stores = [backend(tmp_path) for _ in range(4)]

    with ThreadPoolExecutor(len(stores)) as pool:
        records = list(pool.map(lambda s: s.publish(rows, TABLE), stores))

    assert len({r.snapshot_id for r in records}) == 1
    assert _snapshot_count(stores[0]) == 1


def test_reads_stay_pinned_while_another_store_publishes(backend, store, features, tmp_path):
    old = store.publish(_table(features), TABLE)
    publisher = backend(tmp_path)
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


# ---------------------------------------------------------------- REST catalog behaviour (watsonx.data)


@pytest.fixture
def wxd(s3, monkeypatch):
    """A watsonx-data store on the REST double with IAM, table files on S3, and the server to poke at."""
    from _iceberg_rest_server import IamAuth, iceberg_rest_server

    from aiplane.plugins.iceberg import WatsonxDataFeatureStore

    monkeypatch.setenv("TEST_S3_KEY", s3.access_key_id)
    monkeypatch.setenv("TEST_S3_SECRET", s3.secret_access_key)
    monkeypatch.setenv("TEST_WXD_APIKEY", API_KEY)
    s3_settings = {"endpoint": s3.endpoint_url, "access_key_id": {"env": "TEST_S3_KEY"}, "secret_access_key": {"env": "TEST_S3_SECRET"}}
    with iceberg_rest_server(
        f"s3://{s3.create_bucket()}/wh", auth=IamAuth(api_keys=(API_KEY,)), file_io=s3.pyiceberg_properties(),
        vend_file_io=False, catalog_name="iceberg_data",
    ) as server:  # fmt: skip
        settings = {"url": server.url.removesuffix("/mds/iceberg"), "catalog": "iceberg_data", "iam_url": server.iam_url,
                    "api_key": {"env": "TEST_WXD_APIKEY"}, "s3": s3_settings}  # fmt: skip
        yield server, lambda **o: WatsonxDataFeatureStore({**settings, **o})


def test_refused_commits_are_retried_and_every_publish_keeps_exactly_its_rows(wxd, features):
    server, make = wxd
    store = make()
    first = store.publish(_table(features), TABLE)
    grown = to_features(generate_tickets(230))
    server.fail_next_commits(f"aiplane.{TABLE}", 6)  # more than pyiceberg retries by itself
    second = store.publish(_table(grown), TABLE)
    assert second.row_count == 230 and second.snapshot_id != first.snapshot_id
    assert sorted(store.read(second).column("id").to_pylist()) == sorted(r["id"] for r in grown)
    assert sorted(store.read(first).column("id").to_pylist()) == sorted(r["id"] for r in features)
    assert sum(1 for c in server.requests if c.method == "POST" and c.status == 409) >= 6


def test_an_iam_token_that_expires_mid_run_is_renewed(wxd, features):
    server, make = wxd
    store = make()
    server.token_ttl_s = 1.0  # renewed after 0.8 s
    record = store.publish(_table(features), TABLE)
    import time

    time.sleep(1.2)
    assert store.read(record).num_rows == 200
    catalog_calls = [c for c in server.requests if c.path.startswith("/mds/")]
    assert all(c.status != 401 for c in catalog_calls)
    assert len({c.credential for c in catalog_calls}) >= 2, "a fresh token was used after the first expired"


def test_a_wrong_api_key_names_the_reference_never_the_value(wxd, monkeypatch, features):
    _, make = wxd
    monkeypatch.setenv("TEST_WXD_APIKEY", "not-the-key-hunter2")
    with pytest.raises(ConfigError) as err:
        make().publish(_table(features), TABLE)
    assert "TEST_WXD_APIKEY" in str(err.value) and "hunter2" not in str(err.value)


def test_an_unreachable_catalog_is_retried_then_explained(monkeypatch, features):
    import socket

    from aiplane.plugins.iceberg import WatsonxDataFeatureStore
    from aiplane.plugins.iceberg import store as store_module

    monkeypatch.setattr(store_module, "_BACKOFF_S", 0.01)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TEST_WXD_APIKEY", API_KEY)
    store = WatsonxDataFeatureStore(
        {"url": f"http://127.0.0.1:{port}", "catalog": "c", "api_key": {"env": "TEST_WXD_APIKEY"}, "iam_url": f"http://127.0.0.1:{port}"}
    )
    with pytest.raises(InputError, match=r"cannot be reached after \d attempts"):
        store.publish(_table(features), TABLE)


def test_watsonx_data_settings_name_what_is_missing():
    from aiplane.plugins.iceberg import WatsonxDataFeatureStore

    with pytest.raises(ConfigError, match="username: Cloud Pak for Data authenticates a user"):
        WatsonxDataFeatureStore({"url": "https://wxd.example", "catalog": "c", "platform": "cpd", "api_key": {"env": "K"}})
    with pytest.raises(ConfigError, match="api_key"):
        WatsonxDataFeatureStore({"url": "https://wxd.example", "catalog": "c"})
    with pytest.raises(ConfigError, match="api_key") as err:
        WatsonxDataFeatureStore({"url": "https://wxd.example", "catalog": "c", "api_key": "hunter2"})
    assert "hunter2" not in str(err.value)


# ---------------------------------------------------------------- the order-independent row digest


def _digest(rows: list[dict[str, str]] | pa.Table) -> str:
    from aiplane.plugins.iceberg.store import _canonical_rows, _content_digest

    return _content_digest(_canonical_rows(rows if isinstance(rows, pa.Table) else _table(rows)))


def test_the_row_digest_ignores_row_order_column_order_chunking_and_string_width(features, monkeypatch):
    from aiplane.plugins.iceberg import store as store_module

    expected = _digest(features)
    shuffled = list(features)
    random.Random(2).shuffle(shuffled)
    table = _table(shuffled).select(list(reversed(FEATURE_COLUMNS)))
    chunked = pa.concat_tables([table.slice(0, 37), table.slice(37)])
    wide = chunked.cast(pa.schema([(name, pa.large_string()) for name in chunked.column_names]))

    assert _digest(shuffled) == _digest(chunked) == _digest(wide) == expected
    monkeypatch.setattr(store_module, "_DIGEST_BATCH_ROWS", 7)  # many batches: their sums add up the same
    assert _digest(shuffled) == expected


def test_the_row_digest_changes_when_values_move_between_rows_or_columns(features):
    rows = [dict(r) for r in features[:50]]
    other = next(i for i, r in enumerate(rows) if r["completion"] != rows[0]["completion"])

    def changed(edit) -> str:
        copy = [dict(r) for r in rows]
        edit(copy)
        return _digest(copy)

    def swap_completions(rs):
        rs[0]["completion"], rs[other]["completion"] = rs[other]["completion"], rs[0]["completion"]

    def move_a_character_to_the_next_column(rs):
        rs[0]["residency"], rs[0]["split"] = rs[0]["residency"] + rs[0]["split"][0], rs[0]["split"][1:]

    variants = {
        "values swapped between rows (every column keeps its values)": swap_completions,
        "a character moved across a column boundary": move_a_character_to_the_next_column,
        "a trailing NUL": lambda rs: rs[0].update(id=rs[0]["id"] + "\0"),
        "a row repeated": lambda rs: rs.append(dict(rs[0])),
        "a row repeated in place of another": lambda rs: rs.__setitem__(1, dict(rs[0])),
        "two rows repeated (a xor would cancel them)": lambda rs: rs.extend([dict(rs[0]), dict(rs[0])]),
        "a row removed": lambda rs: rs.pop(),
    }
    digests = {name: changed(edit) for name, edit in variants.items()}

    original = _digest(rows)
    assert all(d != original for d in digests.values()), [n for n, d in digests.items() if d == original]
    assert len(set(digests.values())) == len(digests)


def test_the_row_digest_is_stable_across_releases_and_machines():
    # The digest is stored in every snapshot: if it changed, the next refresh of unchanged
    # rows would commit a snapshot. Change it only together with _DIGEST_FORMAT.
    rows = [
        {
            "id": "T1", "prompt": "Ticket: VPN keeps disconnecting.\nLabel:", "completion": " network high",
            "residency": "eu", "split": "train",
        },
        {"id": "T2", "prompt": "Ticket: Écran noir – ünïcode ✓\nLabel:", "completion": " hardware low", "residency": "us", "split": "eval"},
        {"id": "T2", "prompt": "", "completion": "", "residency": "", "split": ""},
    ]  # fmt: skip

    assert _digest(rows) == "sha256:81449d1ddb4a80445f6cb0a8fe00b45dc7949b6ffe462a3649ee1bbbdde2f903"
