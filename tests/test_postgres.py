"""Dagster's storage and the Iceberg SQL catalog on a real PostgreSQL server (``_postgres.py``).

The server is started once for the module, on loopback, as an unprivileged user
when the tests run as root. Every client gets the password by reference: Dagster
through ``{env: ...}`` in ``dagster.yaml``, pyiceberg's SQLAlchemy engine through
libpq's ``PGPASSWORD``; no URL or file written here holds it.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from aiplane.core.sample import generate_tickets, to_features

pytestmark = [
    pytest.mark.filterwarnings("ignore:Found version mismatch:UserWarning"),
    # Dagster reading our test schedule asks for a property it deprecated itself.
    pytest.mark.filterwarnings("ignore:Property .ScheduleDefinition.environment_vars. is deprecated:DeprecationWarning"),
]

TABLE = "tickets"
PASSWORD_ENV = "AIPLANE_TEST_PG_PASSWORD"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    from _postgres import start_postgres

    server = start_postgres(tmp_path_factory.mktemp("postgres-log"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(postgres, monkeypatch) -> str:
    """A fresh database for one test; the password reaches clients only through the environment."""
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


# ------------------------------------------------------------------ Iceberg SQL catalog on PostgreSQL


def _store(postgres, database: str, warehouse: Path):
    from aiplane.plugins.iceberg import IcebergFeatureStore

    return IcebergFeatureStore({"catalog_uri": postgres.url(database), "warehouse": str(warehouse)})


def _table(seed: int, n: int = 200) -> pa.Table:
    return pa.Table.from_pylist(to_features(generate_tickets(n, seed=seed)))


def _rows(table: pa.Table) -> list[tuple[str, ...]]:
    """The rows, whole, in a canonical order."""
    from aiplane.core.components import FEATURE_COLUMNS

    return sorted(zip(*(table.column(c).to_pylist() for c in FEATURE_COLUMNS), strict=True))


def _publish_together(stores, tables) -> list:
    """Every store publishes its table at the same instant (a barrier), each on its own connection."""
    barrier = threading.Barrier(len(stores))
    results: list = [None] * len(stores)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].publish(tables[i], TABLE)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the publisher's index
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException) or r is None]
    assert not failed, f"publishers failed: {failed}"
    return results


def _snapshots_with_digest(store) -> dict[str, int]:
    """How many snapshots of the table carry each row digest."""
    from aiplane.plugins.iceberg.store import DIGEST_PROPERTY

    table = store._catalog(create=False).load_table((store._ice.namespace, TABLE))
    counts: dict[str, int] = {}
    for snap in table.metadata.snapshots:
        digest = snap.summary.additional_properties.get(DIGEST_PROPERTY)
        if digest is not None:
            counts[digest] = counts.get(digest, 0) + 1
    return counts


def test_the_catalog_url_on_postgresql_holds_no_password(postgres, database, tmp_path):
    store = _store(postgres, database, tmp_path / "warehouse")
    record = store.publish(_table(1), TABLE)

    assert postgres.password not in store._ice.catalog_uri
    assert postgres.password not in repr(record.store)
    assert store._catalog(create=False).engine.dialect.name == "postgresql"


@pytest.mark.parametrize("existing", [False, True], ids=["new-table", "existing-table"])
def test_concurrent_refreshes_of_the_same_rows_on_postgresql_make_one_snapshot(postgres, database, tmp_path, existing):
    warehouse = tmp_path / "warehouse"
    if existing:
        _store(postgres, database, warehouse).publish(_table(1), TABLE)
    rows = _table(2)
    stores = [_store(postgres, database, warehouse) for _ in range(4)]

    records = _publish_together(stores, [rows] * len(stores))

    assert len({r.snapshot_id for r in records}) == 1
    from aiplane.plugins.iceberg.store import _canonical_rows, _content_digest

    assert _snapshots_with_digest(stores[0])[_content_digest(_canonical_rows(rows))] == 1
    assert _rows(stores[0].read(records[0])) == _rows(rows)


def test_concurrent_refreshes_of_different_rows_on_postgresql_lose_no_rows(postgres, database, tmp_path):
    warehouse = tmp_path / "warehouse"
    _store(postgres, database, warehouse).publish(_table(1), TABLE)
    # Two publishers of the same rows, two of other rows (same ticket ids, other contents; fewer rows).
    tables = [_table(10), _table(11), _table(10), _table(12, n=150)]
    stores = [_store(postgres, database, warehouse) for _ in tables]

    records = _publish_together(stores, tables)

    reader = _store(postgres, database, warehouse)
    # Every publisher's record reads back exactly its own rows: none lost, none mixed in from another.
    for record, rows in zip(records, tables, strict=True):
        assert record.row_count == rows.num_rows
        assert _rows(reader.read(record)) == _rows(rows)
    # The table is, whole, what one of them published (a full refresh, atomically).
    current = reader.current(TABLE)
    assert current.snapshot_id in {r.snapshot_id for r in records}
    assert _rows(reader.read(current)) in [_rows(t) for t in tables]


# ------------------------------------------------------------------ Dagster's storage on PostgreSQL

_DEFS = '''
import dagster as dg


@dg.asset
def numbers():
    return [1, 2, 3]


nightly = dg.ScheduleDefinition(
    name="nightly", job=dg.define_asset_job("refresh_numbers", selection=[numbers]), cron_schedule="0 3 * * *"
)
defs = dg.Definitions(assets=[numbers], schedules=[nightly])
'''


@pytest.fixture
def dagster_home(postgres, database, tmp_path, monkeypatch):
    """``(home, settings)``: aiplane's instance directory and the deployment's ``dagster.postgres``."""
    from aiplane.core.config import DagsterPostgres

    settings = DagsterPostgres(
        hostname=postgres.host, port=postgres.port, db_name=database, username=postgres.user,
        password={"env": PASSWORD_ENV}, params={"application_name": "aiplane-test"},
    )  # fmt: skip
    home = tmp_path / "dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home, settings


def _reopen(home: Path):
    """A fresh instance from the same dagster.yaml: what a restarted webserver or daemon opens."""
    import dagster as dg

    return dg.DagsterInstance.from_config(str(home))


def _schedule(instance, tmp_path: Path):
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, LoadableTargetOrigin

    defs_file = tmp_path / "pg_defs.py"
    defs_file.write_text(_DEFS)
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(python_file=str(defs_file), attribute="defs", working_directory=str(tmp_path)),
        location_name="pg-test",
    )
    location = origin.create_location(instance)
    return location, location.get_repository("__repository__").get_schedule("nightly")


def test_the_deployment_setting_writes_a_dagster_yaml_that_names_the_password_never_holds_it(postgres, dagster_home):
    from dagster._config.validate import validate_config
    from dagster_postgres import DagsterPostgresStorage

    from aiplane.assets.instance import open_instance

    home, settings = dagster_home
    open_instance(home.parent, settings).dispose()

    text = (home / "dagster.yaml").read_text()
    assert postgres.password not in text
    storage = yaml.safe_load(text)["storage"]["postgres"]
    assert storage["postgres_db"]["password"] == {"env": PASSWORD_ENV}
    assert validate_config(DagsterPostgresStorage.config_type(), storage).success
    assert postgres.password not in repr(settings)


def test_a_run_materialized_on_postgresql_is_there_after_a_restart(dagster_home, tmp_path):
    import dagster as dg

    from aiplane.assets.instance import open_instance

    home, settings = dagster_home
    instance = open_instance(home.parent, settings)
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"

    @dg.asset
    def numbers():
        return [1, 2, 3]

    run_id = dg.materialize([numbers], instance=instance).run_id
    instance.dispose()

    reopened = _reopen(home)
    try:
        run = reopened.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert reopened.get_latest_materialization_event(dg.AssetKey("numbers")).run_id == run_id
        assert not list(home.rglob("*.db")), "runs, events or schedules went to SQLite"
    finally:
        reopened.dispose()


def test_a_started_schedule_on_postgresql_is_still_running_after_a_restart(dagster_home, tmp_path):
    from dagster._core.scheduler.instigation import InstigatorStatus

    from aiplane.assets.instance import open_instance

    home, settings = dagster_home
    instance = open_instance(home.parent, settings)
    location, schedule = _schedule(instance, tmp_path)
    try:
        instance.start_schedule(schedule)
    finally:
        location.cleanup()
    instance.dispose()

    reopened = _reopen(home)
    try:
        state = reopened.get_instigator_state(schedule.get_remote_origin_id(), schedule.selector_id)
        assert state is not None and state.status == InstigatorStatus.RUNNING
        assert type(reopened.schedule_storage).__name__ == "PostgresScheduleStorage"
    finally:
        reopened.dispose()


def test_a_deployment_puts_dagster_on_postgresql_by_reference_and_refuses_a_literal_password(tmp_path):
    from aiplane.assets.instance import instance_yaml
    from aiplane.core.config import load_deployment
    from aiplane.core.errors import ConfigError

    local = (Path(__file__).parents[1] / "deployments" / "local.yaml").read_text()
    block = (
        "\ndagster:\n  postgres:\n    hostname: aiplane-postgresql.aiplane.svc\n"
        "    password: {secret: aiplane-postgresql, key: postgresql-password}\n"
    )
    (tmp_path / "pg.yaml").write_text(local + block)
    deployment = load_deployment(tmp_path / "pg.yaml", home=tmp_path)

    rendered = yaml.safe_load(instance_yaml(deployment.dagster.postgres))
    assert rendered["storage"]["postgres"]["postgres_db"]["password"] == {"env": "AIPLANE_POSTGRESQL_POSTGRESQL_PASSWORD"}
    assert load_deployment("local", home=tmp_path).dagster.postgres is None  # SQLite stays the default
    (tmp_path / "literal.yaml").write_text(local + block.replace("{secret: aiplane-postgresql, key: postgresql-password}", "hunter2"))
    with pytest.raises(ConfigError, match="dagster.postgres.password") as raised:
        load_deployment(tmp_path / "literal.yaml", home=tmp_path)
    assert "hunter2" not in str(raised.value)
