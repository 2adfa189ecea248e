"""IBM's facts client, built so that its side effects stay under aiplane's home.

``ibm-aigov-facts-client`` writes ``./logs`` into the working directory when it is
imported, MLflow keeps its store and telemetry id in the working directory and
``~/.config``, and its loggers print to the console. Everything here runs with
the working directory, ``HOME``-derived paths and MLflow's locations pointed at
``state_dir``, and the API key is read from its reference at the last moment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["cloud_api_url", "contained", "import_client", "make_client", "route_logs", "state_dir"]

# The API host of each IBM Cloud region, as the facts client has them built in (utils/config.py).
_CLOUD_API = {
    "dallas": "https://api.dataplatform.cloud.ibm.com",
    "frankfurt": "https://api.eu-de.dataplatform.cloud.ibm.com",
    "london": "https://api.eu-gb.dataplatform.cloud.ibm.com",
    "tokyo": "https://api.jp-tok.dataplatform.cloud.ibm.com",
    "toronto": "https://api.ca-tor.dai.cloud.ibm.com",
    "sydney": "https://api.au-syd.dai.cloud.ibm.com",
}
_CWD_LOCK = threading.Lock()


def cloud_api_url(region: str) -> str:
    return _CLOUD_API[region]


@contextlib.contextmanager
def contained(state_dir: Path) -> Iterator[None]:
    """Run IBM's client with its files under ``state_dir``: working directory, MLflow, XDG config.

    The working directory is per process, so only one thread at a time may be inside.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_TRACKING_URI": (state_dir / "mlruns").as_uri(),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "XDG_CONFIG_HOME": str(state_dir / "config"),
        "XDG_CACHE_HOME": str(state_dir / "cache"),
    }
    with _CWD_LOCK:
        # FACTS_CLIENT_ENV: the client records its region there, for the process.
        saved = {k: os.environ.get(k) for k in (*env, "FACTS_CLIENT_ENV")}
        cwd = os.getcwd()
        os.environ.update(env)
        os.chdir(state_dir)
        # The client prints banners and tables; on a worker's stdout they would pass for progress events.
        try:
            with open(state_dir / "client-output.log", "a") as out, contextlib.redirect_stdout(out):
                yield
        finally:
            os.chdir(cwd)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _quiet_ibm_loggers() -> None:
    # aiplane reports what it did itself; these libraries' warnings still reach the run's log.
    for name in ("ibm_cloud_sdk_core", "ibm_watsonx_ai", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def route_logs(path: Path) -> None:
    """Send the facts client's own log (its stderr handler, set up when it is imported) to ``path``.

    It logs every failed call with ``logger.exception`` and a traceback, also for failures
    aiplane retries; the reason that matters reaches the user in aiplane's error.
    """
    logger = logging.getLogger("ibm_aigov_facts_client")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def import_client() -> None:
    """Import IBM's facts client (call inside :func:`contained`: importing it writes ``./logs``)."""
    try:
        import ibm_aigov_facts_client  # noqa: F401
    except ImportError as exc:
        from aiplane.core.errors import PluginError

        raise PluginError(
            f"The watsonx-governance publisher needs IBM's facts client ({exc}); "
            "install it with: pip install 'aiplane[governance]'"
        ) from None


def make_client(settings: Any) -> Any:
    """An ``AIGovFactsClient`` for ``settings`` (external models, no MLflow tracing). Call inside :func:`contained`."""
    from ibm_aigov_facts_client import AIGovFactsClient, CloudPakforDataConfig

    _quiet_ibm_loggers()
    api_key = settings.api_key.resolve()
    if settings.platform == "cpd":
        config = CloudPakforDataConfig(
            service_url=settings.url,
            username=settings.username,
            api_key=api_key,
            disable_ssl_verification=settings.disable_ssl_verification,
        )
        return AIGovFactsClient(cloud_pak_for_data_configs=config, external_model=True, disable_tracing=True)
    return AIGovFactsClient(
        api_key=api_key,
        region=settings.region,
        service_instance_id=settings.service_instance_id,
        external_model=True,
        disable_tracing=True,
    )


def state_dir(configured: str, cache_dir: str | None) -> Path:
    """``configured``, or ``<cache>/watsonx-governance`` (the deployment's cache is under its home)."""
    if configured:
        return Path(configured).expanduser()
    if not cache_dir:
        raise RuntimeError("the workload carries no cache_dir; set factsheet.settings.state_dir")
    return Path(cache_dir) / "watsonx-governance"
