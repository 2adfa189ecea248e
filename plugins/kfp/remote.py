"""The remote half of the ``kfp`` engine: talk to a KFP v2 / OpenShift AI DSP API server.

Every call goes through :class:`kfp.Client` (its generated v2beta1 APIs, so each
request has a timeout). The bearer token is read when a run starts, handed to
the client and nowhere else: it is scrubbed from every error message this module
raises, and never logged, returned or compiled into a spec.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiplane.core.errors import ConfigError, WorkloadCancelled, WorkloadError
from aiplane.core.workload import Event

from .pipeline import CompiledPipeline
from .settings import KfpSettings

__all__ = ["RemoteRun", "KfpRemote", "resolve_token", "token_source"]

_API = "/apis/v2beta1"
_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}
_TERMINATE_GRACE_S = 10.0
_POLL_RETRIES = 5


def token_source(settings: KfpSettings) -> str:
    """Where the token comes from, for messages (never the token itself)."""
    if settings.token_path:
        return f"{settings.token_path} (token file)"
    if settings.token is None:
        return "(none configured: set the target's `token` or `token_path`)"
    if settings.token.env:
        return f"{settings.token.env} (environment variable)"
    return f"{settings.token.secret} key {settings.token.key} (Kubernetes secret)"


def resolve_token(settings: KfpSettings) -> str | None:
    """Read the bearer token now; :class:`ConfigError` when it is missing or empty."""
    if settings.token_path:
        try:
            value = open(os.path.expanduser(settings.token_path)).read().strip()
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the KFP token from {settings.token_path}: {exc.strerror}. Mount the token there."
            ) from None
        if not value:
            raise ConfigError(f"The KFP token file {settings.token_path} is empty.")
        return value
    return settings.token.resolve() if settings.token is not None else None


@dataclass(frozen=True)
class RemoteRun:
    """A run created on the server."""

    run_id: str
    url: str
    pipeline_id: str
    version_id: str
    version_reused: bool
    experiment_id: str


class KfpRemote:
    """One session with a KFP API server, authenticated with a token read just now."""

    def __init__(self, settings: KfpSettings):
        self.settings = settings
        self.host = settings.host or ""
        self._token = resolve_token(settings)
        self._preflight()
        self._client = self._connect()

    # -- errors ---------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _api_error(self, what: str, exc: Exception) -> Exception:
        status = getattr(exc, "status", None)
        if status in (401, 403):
            return self._rejected(status)
        body = self._scrub(str(getattr(exc, "body", "") or exc))[:500]
        reason = getattr(exc, "reason", "") or type(exc).__name__
        return WorkloadError(f"KFP API at {self.host}: {what} failed ({status or 'no status'} {reason}): {body}")

    def _rejected(self, status: int) -> ConfigError:
        return ConfigError(
            f"KFP token rejected by {self.host} (HTTP {status}); check the secret {token_source(self.settings)}: "
            "it must hold a valid bearer token with access to the pipeline server's project."
        )

    def _unreachable(self, reason: str) -> WorkloadError:
        return WorkloadError(
            f"Cannot reach the KFP API server at {self.host}: {self._scrub(reason)}. "
            "Check the target's `host` setting and that the pipeline server (DSPA) is running."
        )

    # -- connection -----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.host.startswith("https://"):
            return None
        if not self.settings.verify_ssl:
            return ssl._create_unverified_context()  # the user turned verification off on purpose
        return ssl.create_default_context(cafile=self.settings.ca_cert)

    def _preflight(self) -> None:
        """Health-check with a short timeout before kfp.Client does (it retries 401s for 25 s)."""

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None  # an OAuth proxy redirects an unauthenticated call to its login page

        opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=self._ssl_context()))
        request = urllib.request.Request(f"{self.host}{_API}/healthz")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with opener.open(request, timeout=self.settings.connect_timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise self._rejected(exc.code) from None
            if 300 <= exc.code < 400:
                raise ConfigError(
                    f"KFP API at {self.host} redirected to a login page (HTTP {exc.code}): no valid token was sent; "
                    f"check the secret {token_source(self.settings)}."
                ) from None
            raise self._unreachable(f"health check answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(str(getattr(exc, "reason", exc))) from None
        try:
            json.loads(body or b"{}")
        except ValueError:
            raise self._unreachable("the health check did not answer JSON; is this the pipeline server's API route?") from None

    def _connect(self) -> Any:
        import kfp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "This client only works with KFP v2.0.0-beta.2 and later"
            try:
                return kfp.Client(
                    host=self.host,
                    existing_token=self._token,
                    namespace=self.settings.namespace or "kubeflow",
                    ssl_ca_cert=self.settings.ca_cert,
                    verify_ssl=self.settings.verify_ssl,
                )
            except Exception as exc:  # kfp.Client raises bare errors for auth, TLS and HTTP: each said as an aiplane error
                raise self._api_error("connecting", exc) from None

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from kfp_server_api import ApiException

        try:
            return fn(_request_timeout=self.settings.request_timeout_s, **kwargs)
        except ApiException as exc:
            raise self._api_error(what, exc) from None
        except OSError as exc:  # urllib3 connection errors
            raise self._unreachable(f"{what}: {exc}") from None
        except Exception as exc:  # urllib3's errors are not OSErrors; anything else is raised again unchanged
            if type(exc).__module__.startswith("urllib3"):
                raise self._unreachable(f"{what}: {type(exc).__name__}") from None
            raise

    # -- pipelines and versions -----------------------------------------------------------------

    @staticmethod
    def _equals(key: str, value: str) -> str:
        # The same filter kfp.Client.get_pipeline_id sends.
        return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})

    def _find_pipeline(self, name: str) -> str | None:
        kwargs: dict[str, Any] = {"filter": self._equals("display_name", name)}
        if self.settings.namespace:
            kwargs["namespace"] = self.settings.namespace
        found = self._call("listing pipelines", self._client.pipelines.pipeline_service_list_pipelines, **kwargs)
        matches = [p for p in found.pipelines or [] if p.display_name == name]
        return matches[0].pipeline_id if matches else None

    def _find_version(self, pipeline_id: str, version: str) -> str | None:
        found = self._call(
            "listing pipeline versions",
            self._client.pipelines.pipeline_service_list_pipeline_versions,
            pipeline_id=pipeline_id,
            filter=self._equals("display_name", version),
        )
        matches = [v for v in found.pipeline_versions or [] if v.display_name == version]
        return matches[0].pipeline_version_id if matches else None

    def ensure_version(self, compiled: CompiledPipeline) -> tuple[str, str, bool]:
        """``(pipeline_id, version_id, reused)``: the version named by the spec's digest, uploaded only if new."""
        from kfp_server_api import V2beta1Pipeline

        pipeline_id = self._find_pipeline(compiled.name)
        if pipeline_id is None:
            try:
                created = self._call(
                    "creating the pipeline",
                    self._client.pipelines.pipeline_service_create_pipeline,
                    pipeline=V2beta1Pipeline(
                        display_name=compiled.name,
                        description="aiplane workload pipeline; versions are named by the digest of their spec",
                        namespace=self.settings.namespace,
                    ),
                )
                pipeline_id = created.pipeline_id
            except WorkloadError:
                # Another run created it first (409): use theirs.
                pipeline_id = self._find_pipeline(compiled.name)
                if pipeline_id is None:
                    raise
        version_id = self._find_version(pipeline_id, compiled.version)
        if version_id is not None:
            return pipeline_id, version_id, True
        with tempfile.TemporaryDirectory(prefix="aiplane-kfp-upload-") as tmp:
            path = os.path.join(tmp, f"{compiled.name}.yaml")
            with open(path, "w") as f:
                f.write(compiled.spec)
            try:
                uploaded = self._call(
                    "uploading the pipeline version",
                    self._client.pipeline_uploads.upload_pipeline_version,
                    uploadfile=path,
                    name=compiled.version,
                    pipelineid=pipeline_id,
                    description=f"spec {compiled.digest}",
                )
            except WorkloadError:
                version_id = self._find_version(pipeline_id, compiled.version)
                if version_id is None:
                    raise
                return pipeline_id, version_id, True
        return pipeline_id, uploaded.pipeline_version_id, False

    def _ensure_experiment(self) -> str:
        from kfp_server_api import V2beta1Experiment

        name = self.settings.experiment
        kwargs: dict[str, Any] = {"filter": self._equals("display_name", name)}
        if self.settings.namespace:
            kwargs["namespace"] = self.settings.namespace
        found = self._call("listing experiments", self._client.experiments.experiment_service_list_experiments, **kwargs)
        for e in found.experiments or []:
            if e.display_name == name:
                return e.experiment_id
        created = self._call(
            "creating the experiment",
            self._client.experiments.experiment_service_create_experiment,
            experiment=V2beta1Experiment(display_name=name, namespace=self.settings.namespace),
        )
        return created.experiment_id

    # -- runs -----------------------------------------------------------------------------------

    def start(self, compiled: CompiledPipeline, display_name: str) -> RemoteRun:
        """Upload the version if it is new and start a run of it with the run arguments."""
        from kfp_server_api import V2beta1PipelineVersionReference, V2beta1Run, V2beta1RuntimeConfig

        pipeline_id, version_id, reused = self.ensure_version(compiled)
        experiment_id = self._ensure_experiment()
        run = self._call(
            "creating the run",
            self._client.runs.run_service_create_run,
            run=V2beta1Run(
                experiment_id=experiment_id,
                display_name=display_name,
                pipeline_version_reference=V2beta1PipelineVersionReference(
                    pipeline_id=pipeline_id, pipeline_version_id=version_id
                ),
                runtime_config=V2beta1RuntimeConfig(
                    parameters=compiled.arguments, pipeline_root=self.settings.pipeline_root
                ),
                service_account=self.settings.service_account,
            ),
        )
        url = self.settings.run_url.format(
            host=self.host, namespace=self.settings.namespace or "", experiment_id=experiment_id, run_id=run.run_id
        )
        return RemoteRun(run.run_id, url, pipeline_id, version_id, reused, experiment_id)

    def wait(self, run: RemoteRun, on_event: Callable[[Event], None], cancel: threading.Event) -> Any:
        """Poll until the run ends, with backoff, sending each state change as an event.

        Raises :class:`WorkloadCancelled` when ``cancel`` is set and :class:`WorkloadError`
        on timeout; the caller terminates the run on these and on anything else raised
        while waiting (a Dagster run termination).
        """
        s = self.settings
        started = time.monotonic()
        delay, last, failures = s.poll_interval_s, None, 0
        while True:
            try:
                current = self._call("reading the run", self._client.runs.run_service_get_run, run_id=run.run_id)
                failures = 0
            except ConfigError:
                raise
            except WorkloadError as exc:
                # A blip of the API server must not kill an hour of training: retry a few times.
                failures += 1
                if failures >= _POLL_RETRIES:
                    raise
                message = f"KFP run {run.run_id}: polling failed ({failures}/{_POLL_RETRIES}): {exc}"
                on_event(Event(type="log", message=message))
                if cancel.wait(delay):
                    raise WorkloadCancelled(f"KFP run {run.url} was cancelled; it was terminated.") from None
                continue
            state = str(current.state or "PENDING").upper()
            if state != last:
                on_event(Event(type="log", message=f"KFP run {run.run_id}: {state}"))
                last = state
            if state in _DONE:
                return current
            if s.timeout_s is not None and time.monotonic() - started > s.timeout_s:
                raise WorkloadError(f"KFP run {run.url} did not finish within {s.timeout_s:g} s; it was terminated.")
            if cancel.wait(delay):
                raise WorkloadCancelled(f"KFP run {run.url} was cancelled; it was terminated.")
            delay = min(delay * s.poll_backoff, s.poll_max_interval_s)

    def terminate(self, run: RemoteRun, on_event: Callable[[Event], None] | None = None) -> None:
        """Ask the server to stop the run; best effort, never raises (we are already failing)."""
        try:
            self._client.runs.run_service_terminate_run(run_id=run.run_id, _request_timeout=_TERMINATE_GRACE_S)
            message = f"KFP run {run.run_id}: terminate requested"
        except Exception as exc:  # on the way out with the original error: said in the log, never raised over it
            message = f"KFP run {run.run_id}: terminate failed ({type(exc).__name__}); stop it at {run.url}"
        if on_event is not None:
            try:
                on_event(Event(type="log", message=message))
            except Exception:  # the log sink failing too: the original error is what the caller must see
                pass
