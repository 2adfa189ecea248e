"""The Dagster instance ``aiplane`` commands record to: ``$DAGSTER_HOME`` (default ``<home>/dagster``), its
``dagster.yaml`` written by aiplane (telemetry off; runs, events and schedules on PostgreSQL when the
deployment says so) unless the user wrote their own."""

import importlib.util
import os
from pathlib import Path

from aiplane.core.errors import AiplaneError

__all__ = ["dagster_home", "instance_yaml", "open_instance"]

# Written when aiplane creates the instance: nothing leaves the machine, and a run whose
# process died is marked failed by the daemon under `dagster dev`.
_INSTANCE_YAML = """\
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def dagster_home(home: Path) -> Path:
    """``$DAGSTER_HOME``, set to ``<home>/dagster`` when unset (the process and its workloads then agree on it)."""
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(home / "dagster")
    return Path(os.environ["DAGSTER_HOME"])


# Heads the storage block aiplane writes from the deployment's `dagster.postgres`.
_PG_MARK = "# storage: from the deployment's dagster.postgres; aiplane rewrites this file while this line is here\n"


def instance_yaml(postgres=None) -> str:
    """``dagster.yaml`` as aiplane writes it; with ``postgres`` (a ``DagsterPostgres``), runs, events and
    schedules on PostgreSQL, the password read from the environment variable its reference names."""
    if postgres is None:
        return _INSTANCE_YAML
    import yaml

    db = {
        "username": postgres.username,
        "password": {"env": postgres.password.env_var},
        "hostname": postgres.hostname,
        "db_name": postgres.db_name,
        "port": postgres.port,
        # psycopg2, the driver the `postgres` extra installs: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
        "scheme": "postgresql+psycopg2",
    }
    if postgres.params:
        db["params"] = dict(postgres.params)
    return _INSTANCE_YAML + _PG_MARK + yaml.safe_dump({"storage": {"postgres": {"postgres_db": db}}}, sort_keys=False)


def open_instance(home: Path, postgres=None):
    """The Dagster instance under ``$DAGSTER_HOME``, its ``dagster.yaml`` made to follow the deployment first."""
    from dagster import DagsterInstance

    where = dagster_home(home)
    where.mkdir(parents=True, exist_ok=True)
    config = where / "dagster.yaml"
    text = config.read_text() if config.exists() else ""
    wanted = instance_yaml(postgres)
    # The default instance (SQLite under DAGSTER_HOME), or PostgreSQL when the deployment says so, with
    # telemetry off. aiplane's own file follows the deployment; a user's own file is kept.
    if text != wanted and (not text.strip() or text == _INSTANCE_YAML or _PG_MARK in text):
        if postgres is not None and importlib.util.find_spec("dagster_postgres") is None:
            raise AiplaneError("dagster.postgres needs dagster-postgres: pip install 'aiplane[postgres]'")
        config.write_text(wanted)
    return DagsterInstance.get()

