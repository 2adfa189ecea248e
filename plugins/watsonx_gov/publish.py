"""The ``publish-factsheet`` workload of ``watsonx-governance``: the factsheet into watsonx.governance.

For the served adapter it saves an external model (named after the endpoint,
identified by the adapter's digest, so publishing it again updates the same
entry), sets the factsheet's facts on it as custom facts, attaches the HTML
page and the loss chart, and tracks it in the AI use case (found by name or
created) under the approach, as the next version. Every call goes through IBM's
``ibm-aigov-facts-client``. A call the service does not answer is tried again
a bounded number of times; then publishing fails with a :class:`WorkloadError`
that says what to do. Publishing comes after serving and only adds facts, so a
failure changes nothing that is served.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiplane.core.errors import AiplaneError, ConfigError
from aiplane.core.factsheet_page import factsheet_page, loss_chart_png
from aiplane.core.publishing import Attempts, publish_inputs
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.workload import WorkloadContext

from . import client as _client
from .facts import FACTS, custom_facts, definitions_csv, document_digest, model_identifier
from .publisher import WatsonxGovernanceSettings

__all__ = ["run", "publish"]

_FACT_TYPE = "modelfacts_user"
_HTML_FACT, _PNG_FACT = "aiplane_factsheet_page", "aiplane_loss_chart"


class _Unavailable(Exception):
    """The service did not answer usably; worth another attempt."""


def run(ctx: WorkloadContext) -> dict[str, FactsheetRecord]:
    """Publish ``ctx.params["document"]`` for ``ctx.inputs["endpoint"]`` with ``ctx.params["settings"]``."""
    endpoint, document = publish_inputs(ctx)
    settings = WatsonxGovernanceSettings.model_validate(ctx.params.get("settings") or {})
    where = _client.state_dir(settings.state_dir, ctx.workload.cache_dir)
    return {"factsheet": publish(endpoint, document, settings, where, log=ctx.log)}


def publish(
    endpoint: EndpointRecord,
    document: Mapping[str, Any],
    settings: WatsonxGovernanceSettings,
    state_dir: Path,
    *,
    log: Callable[[str], None] = lambda message: None,
    client_factory: Callable[[WatsonxGovernanceSettings], Any] = _client.make_client,
    sleep: Callable[[float], None] = time.sleep,
) -> FactsheetRecord:
    """Publish ``document`` (see :func:`aiplane.core.factsheet.build_factsheet`) and return its record.

    ``client_factory`` makes the ``AIGovFactsClient``; inside it, the working directory and
    IBM's local files are under ``state_dir``.
    """
    service = settings.service_url()
    attempt = _attempts(settings, service, sleep, log)
    with _client.contained(state_dir):
        _client.import_client()
        _client.route_logs(state_dir / "client-output.log")
        facts_client = attempt("sign in", lambda: client_factory(settings))
        identifier = model_identifier(document)
        name = (document.get("endpoint") or {}).get("model_name") or endpoint.model_name
        _ensure_definitions(facts_client, attempt, state_dir)
        model = attempt("save the model entry", lambda: _save_model(facts_client, identifier, name, document, endpoint))
        facts = custom_facts(document)
        attempt("set the custom facts", lambda: _set_facts(model, facts))
        if settings.attachments:
            _attach(model, document, state_dir, attempt)
        usecase = attempt("find or create the AI use case", lambda: _usecase(facts_client, settings, log))
        approach = attempt("find or create the approach", lambda: _approach(usecase, settings))
        version = attempt("track the model in the use case", lambda: _track(model, usecase, approach, document, log))
        model_id, catalog_id = model.get_id(), model.get_container_id()
        # The factsheet's page in the platform's UI, as IBM's client spells it for this platform.
        page = attempt("read the model entry", lambda: model.get_info(verbose=True)).get("url") or ""
    log(
        f"published {identifier} to watsonx.governance at {service}: model {model_id} (catalog {catalog_id}), "
        f"AI use case {settings.use_case!r} approach {settings.approach!r} version {version}"
    )
    digest = document_digest(document)
    return FactsheetRecord(
        uri=f"{service}/v2/assets/{model_id}?catalog_id={catalog_id}",
        digest=digest,
        publisher="watsonx-governance",
        page_uri=page,
        sources=(endpoint,),
    )


def _attempts(settings: WatsonxGovernanceSettings, service: str, sleep: Callable[[float], None],
              log: Callable[[str], None]) -> Attempts:  # fmt: skip
    """Bounded retries of each call to the service; a refused credential ends them at once."""

    def refused(exc: BaseException, reason: str, what: str) -> ConfigError | None:
        if not _refused(reason):
            return None
        cpd_user = f" and the user {settings.username!r}" if settings.platform == "cpd" else ""
        return ConfigError(f"watsonx.governance at {service} refused the credentials while trying to {what} "
                           f"({reason}); check {settings.api_key!r}{cpd_user}")  # fmt: skip

    return Attempts(f"watsonx.governance at {service}", settings.attempts, settings.backoff_s,
                    reason=lambda exc: _scrub(_reason(exc), settings), refused=refused, log=log, sleep=sleep,
                    raise_what="factsheet.settings.attempts")  # fmt: skip


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


_CREDENTIAL_IN_TEXT = re.compile(r"""(?i)\b(apikey|api_key|password|access_token)(=|['"]?\s*:\s*['"]?)[^&\s'",}]+""")


def _scrub(text: str, settings: WatsonxGovernanceSettings) -> str:
    """``text`` without the API key: IBM's client sends it in a query string (IAM's introspection),
    so a connection error's message, which quotes the URL, would carry it."""
    try:
        key = settings.api_key.resolve()
    except AiplaneError:
        key = ""
    if key:
        text = text.replace(key, "***")
    return _CREDENTIAL_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


# How IBM's client words a refused credential: CPD's authorize answering 401 ("Please check the CPD
# credentials"), IAM's introspection calling the key inactive (AuthorizationError), IAM's unknown key.
_REFUSED = ("Please check the CPD credentials", "AuthorizationError", "inactive or invalid", "BXNIM0415E")


def _refused(reason: str) -> bool:
    """Whether another attempt with the same credentials cannot succeed."""
    return any(s in reason for s in _REFUSED)


def _ensure_definitions(facts_client: Any, attempt: Attempts, state_dir: Path) -> None:
    """Define the ``aiplane_*`` custom facts the account lacks (merged, never replacing the account's own)."""

    def current() -> dict[str, Any] | None:
        try:
            found = facts_client.assets.get_facts_definitions(type_name=_FACT_TYPE)
        except Exception as exc:  # IBM's client raises a bare Exception carrying the HTTP status; others raised on
            if "ERROR 404" in str(exc):
                return None  # the account has defined no custom model facts yet
            raise
        if not isinstance(found, Mapping):
            raise _Unavailable(f"fact definitions came back as {type(found).__name__}")
        return dict(found)

    def missing(defined: Mapping[str, Any] | None) -> list[str]:
        return [f for f in FACTS if f not in ((defined or {}).get("properties") or {})]

    defined = attempt("read the custom fact definitions", current)
    absent = missing(defined)
    if not absent:
        return
    path = state_dir / "aiplane-facts.csv"
    path.write_text(definitions_csv(absent))

    def define() -> None:
        # Merged into the account's own definitions; only an account with none gets a fresh set.
        overwrite = not (defined or {}).get("properties")
        facts_client.assets.create_custom_facts_definitions(str(path), type_name=_FACT_TYPE, overwrite=overwrite)
        if missing(current()):
            raise _Unavailable("the custom fact definitions were not saved")

    attempt("define aiplane's custom facts", define)


def _save_model(facts_client: Any, identifier: str, name: str, document: Mapping[str, Any], endpoint: EndpointRecord) -> Any:
    from ibm_aigov_facts_client.supporting_classes.factsheet_utils import DeploymentDetails

    adapter = document.get("adapter") or {}
    base = document.get("base_model") or {}
    model = facts_client.external_model_facts.save_external_model_asset(
        model_identifier=identifier,
        name=name,
        description=(
            f"{document.get('training', {}).get('method', 'adapter')} adapter {adapter.get('digest')} "
            f"of {base.get('name')} ({base.get('digest')}), served by aiplane at {endpoint.url}"
        ),
        deployment_details=DeploymentDetails(
            identifier=endpoint.url,
            name=endpoint.model_name,
            deployment_type="online",
            scoring_endpoint=endpoint.url,
        ),
    )
    if model is None or not model.get_id():
        raise _Unavailable("the service did not return the saved model")
    return model


def _set_facts(model: Any, facts: Mapping[str, str]) -> None:
    model.set_custom_facts(dict(facts))
    stored = model.get_custom_facts() or {}
    absent = [k for k, v in facts.items() if stored.get(k) != v]
    if absent:
        raise _Unavailable(f"the service did not keep the custom facts {', '.join(absent)}")


def _attach(model: Any, document: Mapping[str, Any], state_dir: Path, attempt: Attempts) -> None:
    """The HTML page and loss chart the local publisher renders, as attachments (replacing earlier ones)."""
    png = loss_chart_png(document)
    folder = state_dir / "attachments" / hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        # The page has its own <style>, which the service refuses to render inline: it opens in a tab.
        _HTML_FACT: (folder / "factsheet.html", factsheet_page(document, png).encode(), "The aiplane factsheet page", "link_new_tab"),
        _PNG_FACT: (folder / "loss.png", png, "Training loss curve", "inline_image"),
    }
    for fact_id, (path, data, description, hint) in files.items():
        path.write_bytes(data)

        def put(fact_id=fact_id, path=path, description=description, hint=hint) -> None:
            if model.has_attachment(fact_id=fact_id):
                model.remove_attachment(fact_id=fact_id)
            model.set_attachment_fact(
                file_to_upload=str(path), fact_id=fact_id, description=description, html_rendering_hint=hint
            )
            if not model.has_attachment(fact_id=fact_id):
                raise _Unavailable(f"the attachment {path.name} was not stored")

        attempt(f"attach {path.name}", put)


def _usecase(facts_client: Any, settings: WatsonxGovernanceSettings, log: Callable[[str], None]) -> Any:
    def find() -> list[Any]:
        found = facts_client.assets.get_ai_usecases_by_name(
            name=settings.use_case, inventory_id=settings.inventory_id, exact_match=True
        ) or []
        return sorted((u for u in found if u.get_name() == settings.use_case), key=lambda u: u.get_id())

    # The client answers [] when the search fails, too: ask twice before creating a second use case.
    found = find() or find()
    if found:
        return found[0]
    if not settings.inventory_id:
        raise ConfigError(
            f"watsonx.governance has no AI use case named {settings.use_case!r} to track the model in; set "
            "factsheet.settings.inventory_id to the inventory to create it in, or create it there and publish again"
        )
    log(f"watsonx.governance: creating AI use case {settings.use_case!r}")
    return facts_client.assets.create_ai_usecase(
        catalog_id=settings.inventory_id,
        name=settings.use_case,
        description="Models served by aiplane: each adapter of an endpoint is a version under its approach.",
    )


def _approach(usecase: Any, settings: WatsonxGovernanceSettings) -> Any:
    for approach in usecase.get_approaches() or []:
        if approach.get_name() == settings.approach:
            return approach
    return usecase.create_approach(name=settings.approach, description="Adapters trained and served by aiplane")


def _track(model: Any, usecase: Any, approach: Any, document: Mapping[str, Any], log: Callable[[str], None]) -> str:
    """Track the model under the approach as its next version; a model already tracked stays as it is."""
    try:
        tracked = model.get_tracking_model_usecase()
    except Exception as exc:  # IBM's client says "not tracked" in a bare Exception; any other is raised on
        if "not tracked" not in str(exc):
            raise
        tracked = None
    if tracked is not None:
        if tracked.get_id() != usecase.get_id():
            log(
                f"watsonx.governance: model {model.get_id()} is tracked in another AI use case "
                f"({tracked.get_id()}); leaving it there"
            )
        return "unchanged"
    adapter = (document.get("adapter") or {}).get("digest")
    # "minor": the service numbers it after the approach's latest version (0.1.0, 0.2.0, ...).
    answer = model.track(usecase=usecase, approach=approach, version_number="minor", version_comment=f"aiplane adapter {adapter}")
    version = answer.get("version_details", {}).get("number") if isinstance(answer, Mapping) else None
    return str(version or "next minor")
