"""Authentication for Iceberg REST catalogs that pyiceberg does not speak natively: IBM Cloud IAM and Cloud Pak for Data.

pyiceberg asks its auth manager for an ``Authorization`` header before every
request (``auth={"type": "custom", "impl": ..., "custom": {...}}``). Its own
OAuth2 managers send a client-credentials grant, which IBM Cloud IAM does not
take; these managers do IAM's API-key exchange and CPD's ``ZenApiKey``. They are
given the *name* of the environment variable holding the key and read it
themselves, so the key never sits in catalog properties, records or logs.
"""

from __future__ import annotations

import base64
import os
import threading
import time

from pyiceberg.catalog.rest.auth import AuthManager

from aiplane.core.errors import ConfigError, InputError

__all__ = ["IbmIamAuthManager", "ZenApiKeyAuthManager", "BearerEnvAuthManager", "IAM_GRANT"]

IAM_GRANT = "urn:ibm:params:oauth:grant-type:apikey"
# IBM's SDKs renew at 80% of a token's life; a token is never sent within its last fifth.
_REFRESH_FRACTION = 0.8
_ATTEMPTS = 4


def _secret(env: str, what: str) -> str:
    value = os.environ.get(env, "")
    if not value:
        raise ConfigError(f"{what}: environment variable {env} is not set; export {env}=... (or mount the Secret as it)")
    return value


class IbmIamAuthManager(AuthManager):
    """IBM Cloud IAM: the API key in ``$apikey_env`` exchanged for a bearer token, renewed before it expires."""

    def __init__(self, apikey_env: str, iam_url: str = "https://iam.cloud.ibm.com", timeout_s: float = 30.0) -> None:
        self._apikey_env = apikey_env
        self._url = iam_url.rstrip("/") + "/identity/token"
        self._timeout = timeout_s
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def auth_header(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._exchange()
            return f"Bearer {self._token}"

    def _exchange(self) -> None:
        import requests

        apikey = _secret(self._apikey_env, "IBM Cloud IAM")
        for attempt in range(_ATTEMPTS):
            try:
                answer = requests.post(
                    self._url,
                    data={"grant_type": IAM_GRANT, "apikey": apikey},
                    headers={"Accept": "application/json"},
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                if attempt == _ATTEMPTS - 1:
                    raise InputError(f"IBM Cloud IAM at {self._url} cannot be reached after {_ATTEMPTS} attempts: {exc}") from None
                time.sleep(0.5 * 2**attempt)
                continue
            if answer.status_code in (400, 401, 403):
                raise ConfigError(
                    f"IBM Cloud IAM refused the API key in ${self._apikey_env} ({answer.status_code}: "
                    f"{_iam_message(answer)}); check that it is a valid API key of the account."
                )
            if answer.status_code >= 500 and attempt < _ATTEMPTS - 1:
                time.sleep(0.5 * 2**attempt)
                continue
            answer.raise_for_status()
            body = answer.json()
            self._token = body["access_token"]
            self._renew_at = time.monotonic() + float(body.get("expires_in", 3600)) * _REFRESH_FRACTION
            return


def _iam_message(answer) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.reason or "no details"
    return str(body.get("errorMessage") or body.get("message") or body.get("errorCode") or "no details")


class ZenApiKeyAuthManager(AuthManager):
    """Cloud Pak for Data: ``ZenApiKey base64(user:apikey)``, the key read from ``$apikey_env``."""

    def __init__(self, username: str, apikey_env: str) -> None:
        self._username = username
        self._apikey_env = apikey_env

    def auth_header(self) -> str:
        key = _secret(self._apikey_env, "Cloud Pak for Data")
        return "ZenApiKey " + base64.b64encode(f"{self._username}:{key}".encode()).decode()


class BearerEnvAuthManager(AuthManager):
    """A bearer token read from ``$token_env`` at each request, so a rotated token is picked up."""

    def __init__(self, token_env: str) -> None:
        self._token_env = token_env

    def auth_header(self) -> str:
        return f"Bearer {_secret(self._token_env, 'Iceberg REST catalog token')}"
