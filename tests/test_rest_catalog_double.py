"""Contract tests: pyiceberg's RestCatalog, unmodified, against the loopback Iceberg REST double and moto's S3.

They pin what the product's REST and ``watsonx-data`` feature stores may rely on:
the routes and error answers of an Iceberg REST catalog, commits that lose a race
answer 409 (CommitFailedException), table files on an S3 endpoint, and the three
ways watsonx.data authenticates (none, IBM Cloud IAM tokens that expire, Cloud Pak
for Data's ZenApiKey or bearer token).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import requests
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.rest.auth import AuthManager
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NamespaceNotEmptyError,
    NoSuchNamespaceError,
    NoSuchTableError,
    RESTError,
    TableAlreadyExistsError,
    UnauthorizedError,
)
from pyiceberg.schema import Schema
from pyiceberg.types import NestedField, StringType

from _iceberg_rest_server import CpdAuth, IamAuth, IcebergRestServer, iceberg_rest_server
from _s3 import S3Server, s3_server
from aiplane.core.components import FEATURE_COLUMNS

NAMESPACE = "aiplane"
TABLE = (NAMESPACE, "tickets")
API_KEY = "test-iam-apikey"
# pyiceberg retries a refused commit by itself; tests that must see the 409 turn that off.
NO_CLIENT_RETRY = {"commit.retry.num-retries": "0"}


def _feature_schema() -> Schema:
    # As the iceberg feature store declares it: every feature column an optional string.
    return Schema(*(NestedField(i + 1, name, StringType(), required=False) for i, name in enumerate(FEATURE_COLUMNS)))


def _rows(prefix: str, count: int = 3) -> pa.Table:
    rows = [
        {"id": f"{prefix}-{i}", "prompt": f"q{i}", "completion": f"a{i}", "residency": "eu", "split": "train"}
        for i in range(count)
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in FEATURE_COLUMNS]))


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("id").to_pylist())


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_catalog(s3: S3Server) -> Iterator[IcebergRestServer]:
    """A REST catalog without auth whose warehouse is a fresh bucket on the moto server."""
    bucket = s3.create_bucket()
    with iceberg_rest_server(f"s3://{bucket}/warehouse", file_io=s3.pyiceberg_properties()) as server:
        yield server


@pytest.fixture
def local_catalog(tmp_path: Path) -> Iterator[IcebergRestServer]:
    with iceberg_rest_server(str(tmp_path / "warehouse")) as server:
        yield server


def _client(server: IcebergRestServer, **properties: object) -> RestCatalog:
    return RestCatalog("wxd", **server.client_properties(**properties))


# ------------------------------------------------------------------ S3 endpoint


def test_moto_serves_pyarrow_and_boto3_over_real_http(s3: S3Server) -> None:
    import pyarrow.parquet as pq

    bucket = s3.create_bucket()
    pq.write_table(_rows("s3"), f"{bucket}/features/part-0.parquet", filesystem=s3.pyarrow_filesystem())

    keys = [o["Key"] for o in s3.boto3_client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["features/part-0.parquet"]
    assert _ids(pq.read_table(f"{bucket}/features/part-0.parquet", filesystem=s3.pyarrow_filesystem())) == [
        "s3-0",
        "s3-1",
        "s3-2",
    ]
    assert s3.endpoint_url.startswith("http://127.0.0.1:")


# ------------------------------------------------------------------ catalog contract


def test_feature_table_round_trip_with_warehouse_on_s3(s3: S3Server, s3_catalog: IcebergRestServer) -> None:
    catalog = _client(s3_catalog)  # no storage settings: the catalog vends them in each table's config
    catalog.create_namespace(NAMESPACE)
    table = catalog.create_table(TABLE, _feature_schema())
    table.append(_rows("v1"))
    first = table.current_snapshot().snapshot_id
    table.overwrite(_rows("v2", 4))

    reloaded = catalog.load_table(TABLE)
    assert reloaded.current_snapshot().snapshot_id != first
    assert _ids(reloaded.scan(snapshot_id=first).to_arrow()) == ["v1-0", "v1-1", "v1-2"]
    assert _ids(reloaded.scan().to_arrow()) == ["v2-0", "v2-1", "v2-2", "v2-3"]
    assert reloaded.schema().column_names == list(FEATURE_COLUMNS)
    # The files really are in the bucket, and the server's own catalog points where the client does.
    assert reloaded.metadata_location.startswith(s3_catalog.catalog.properties["warehouse"])
    assert s3_catalog.catalog.load_table(TABLE).metadata_location == reloaded.metadata_location
    bucket = reloaded.metadata_location.split("/")[2]
    keys = [o["Key"] for o in s3.boto3_client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith(".parquet") and "/data/" in k for k in keys)
    assert any(k.endswith(".metadata.json") for k in keys)


def test_load_table_config_vends_the_servers_file_io(s3: S3Server, s3_catalog: IcebergRestServer) -> None:
    catalog = _client(s3_catalog)
    catalog.create_namespace(NAMESPACE)
    catalog.create_table(TABLE, _feature_schema())

    answer = requests.get(f"{s3_catalog.url}/v1/namespaces/{NAMESPACE}/tables/tickets", timeout=10).json()

    assert answer["config"] == s3.pyiceberg_properties()
    assert answer["metadata-location"].endswith(".metadata.json")
    assert answer["metadata"]["format-version"] == 2


def test_client_brings_its_own_file_io_when_the_catalog_vends_none(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    with iceberg_rest_server(f"s3://{bucket}/wh", file_io=s3.pyiceberg_properties(), vend_file_io=False) as server:
        catalog = _client(server, **s3.pyiceberg_properties())
        catalog.create_namespace(NAMESPACE)
        catalog.create_table(TABLE, _feature_schema()).append(_rows("own"))

        assert requests.get(f"{server.url}/v1/namespaces/{NAMESPACE}/tables/tickets", timeout=10).json()["config"] == {}
        assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == ["own-0", "own-1", "own-2"]


def test_create_table_transaction_commits_table_and_rows_at_once(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog)
    catalog.create_namespace(NAMESPACE)

    tx = catalog.create_table_transaction(TABLE, _feature_schema())
    assert not catalog.table_exists(TABLE)  # staged only
    tx.append(_rows("tx"))
    committed = tx.commit_transaction()

    assert _ids(catalog.load_table(TABLE).scan(snapshot_id=committed.current_snapshot().snapshot_id).to_arrow()) == [
        "tx-0",
        "tx-1",
        "tx-2",
    ]
    commits = local_catalog.calls("POST", "/tables/tickets")
    assert [c.status for c in commits] == [200]


def test_stale_commit_is_refused_with_409_and_changes_nothing(s3_catalog: IcebergRestServer) -> None:
    catalog = _client(s3_catalog)
    catalog.create_namespace(NAMESPACE)
    catalog.create_table(TABLE, _feature_schema(), properties=NO_CLIENT_RETRY).append(_rows("base"))
    winner = catalog.load_table(TABLE)
    loser = catalog.load_table(TABLE)

    winner.append(_rows("winner"))
    with pytest.raises(CommitFailedException, match="CommitFailedException: Requirement failed: branch main"):
        loser.append(_rows("loser"))

    current = catalog.load_table(TABLE)
    assert current.current_snapshot().snapshot_id == winner.current_snapshot().snapshot_id
    assert "loser-0" not in _ids(current.scan().to_arrow())
    assert s3_catalog.calls("POST", "/tables/tickets")[-1].status == 409


def test_pyiceberg_retries_a_stale_append_on_refreshed_metadata(local_catalog: IcebergRestServer) -> None:
    # pyiceberg 0.12 retries a commit that got 409 (table property commit.retry.num-retries, default 4):
    # it reloads the table, rebuilds its snapshot on the winner's and commits again.
    catalog = _client(local_catalog)
    catalog.create_namespace(NAMESPACE)
    catalog.create_table(TABLE, _feature_schema())
    winner = catalog.load_table(TABLE)
    late = catalog.load_table(TABLE)

    winner.append(_rows("winner"))
    late.append(_rows("late"))

    assert [c.status for c in local_catalog.calls("POST", "/tables/tickets")] == [200, 409, 200]
    assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == sorted(
        ["late-0", "late-1", "late-2", "winner-0", "winner-1", "winner-2"]
    )


def test_concurrent_create_transactions_one_wins_the_other_gets_409(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog)
    catalog.create_namespace(NAMESPACE)
    first = catalog.create_table_transaction(TABLE, _feature_schema())
    second = catalog.create_table_transaction(TABLE, _feature_schema())
    first.append(_rows("first"))
    second.append(_rows("second"))

    first.commit_transaction()
    with pytest.raises(CommitFailedException):
        second.commit_transaction()
    with pytest.raises(TableAlreadyExistsError):
        catalog.create_table_transaction(TABLE, _feature_schema())
    assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == ["first-0", "first-1", "first-2"]


def test_fail_next_commits_answers_409_that_many_times(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog)
    catalog.create_namespace(NAMESPACE)
    table = catalog.create_table(TABLE, _feature_schema(), properties=NO_CLIENT_RETRY)
    local_catalog.fail_next_commits("aiplane.tickets", 2)

    for _ in range(2):
        with pytest.raises(CommitFailedException, match="injected"):
            table.append(_rows("retry"))
    table.append(_rows("retry"))

    assert [c.status for c in local_catalog.calls("POST", "/tables/tickets")] == [409, 409, 200]
    assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == ["retry-0", "retry-1", "retry-2"]


def test_injected_409s_within_pyicebergs_retry_budget_are_absorbed(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog)
    catalog.create_namespace(NAMESPACE)
    table = catalog.create_table(TABLE, _feature_schema())
    local_catalog.fail_next_commits(TABLE, 2)

    table.append(_rows("once"))

    assert [c.status for c in local_catalog.calls("POST", "/tables/tickets")] == [409, 409, 200]
    assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == ["once-0", "once-1", "once-2"]


def test_missing_things_answer_404_and_conflicts_409(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog)
    with pytest.raises(NoSuchNamespaceError):
        catalog.load_namespace_properties("nowhere")
    with pytest.raises(NoSuchNamespaceError):
        catalog.create_table(("nowhere", "t"), _feature_schema())
    catalog.create_namespace(NAMESPACE)
    with pytest.raises(NamespaceAlreadyExistsError):
        catalog.create_namespace(NAMESPACE)
    with pytest.raises(NoSuchTableError):
        catalog.load_table(TABLE)
    assert not catalog.table_exists(TABLE)
    catalog.create_table(TABLE, _feature_schema())
    with pytest.raises(TableAlreadyExistsError):
        catalog.create_table(TABLE, _feature_schema())
    with pytest.raises(NamespaceNotEmptyError):
        catalog.drop_namespace(NAMESPACE)

    answer = requests.get(f"{local_catalog.url}/v1/namespaces/{NAMESPACE}/tables/absent", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "NoSuchTableException"
    assert answer.json()["error"]["code"] == 404
    assert answer.json()["error"]["message"]


def test_namespaces_and_tables_list_rename_and_drop(local_catalog: IcebergRestServer) -> None:
    catalog = _client(local_catalog, **{"rest-page-size": "1"})
    catalog.create_namespace(NAMESPACE, {"owner": "aiplane"})
    catalog.create_namespace("other")
    catalog.create_table(TABLE, _feature_schema())
    catalog.create_table((NAMESPACE, "second"), _feature_schema())

    assert sorted(catalog.list_namespaces()) == [("aiplane",), ("other",)]  # two pages of one
    assert catalog.load_namespace_properties(NAMESPACE)["owner"] == "aiplane"
    assert sorted(catalog.list_tables(NAMESPACE)) == [(NAMESPACE, "second"), TABLE]
    renamed = catalog.rename_table(TABLE, ("other", "tickets"))
    assert renamed.name() == ("other", "tickets")
    catalog.drop_table(("other", "tickets"))
    catalog.drop_table((NAMESPACE, "second"))
    catalog.drop_namespace("other")

    assert catalog.list_tables(NAMESPACE) == []
    assert catalog.list_namespaces() == [("aiplane",)]
    assert any(c.query.get("pageToken") for c in local_catalog.calls("GET", "/v1/namespaces"))


def test_catalog_name_is_the_warehouse_and_the_route_prefix(tmp_path: Path) -> None:
    with iceberg_rest_server(str(tmp_path), catalog_name="iceberg_data") as server:
        catalog = _client(server)  # warehouse=iceberg_data, as a watsonx.data client names its catalog
        catalog.create_namespace(NAMESPACE)

        assert server.calls("POST")[-1].path == "/mds/iceberg/v1/iceberg_data/namespaces"
        with pytest.raises(RESTError, match="NoSuchWarehouseException"):
            RestCatalog("wxd", uri=server.url, warehouse="no_such_catalog")


# ------------------------------------------------------------------ IBM Cloud IAM


def _iam_token(server: IcebergRestServer, apikey: str = API_KEY) -> requests.Response:
    return requests.post(
        f"{server.iam_url}/identity/token",
        data={"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": apikey},
        headers={"Accept": "application/json"},
        timeout=10,
    )


@pytest.fixture
def iam_catalog(tmp_path: Path) -> Iterator[IcebergRestServer]:
    with iceberg_rest_server(str(tmp_path / "warehouse"), auth=IamAuth(api_keys=(API_KEY,))) as server:
        yield server


def test_iam_token_endpoint_answers_as_ibm_iam_does(iam_catalog: IcebergRestServer) -> None:
    answer = _iam_token(iam_catalog)
    assert answer.status_code == 200
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert abs(body["expiration"] - (time.time() + 3600)) < 5
    assert body["access_token"].count(".") == 2  # a JWT, as IBM's SDKs decode it for exp and iat

    unknown = _iam_token(iam_catalog, apikey="not-a-key")
    assert unknown.status_code == 400
    assert unknown.json()["errorCode"] == "BXNIM0415E"
    as_json = requests.post(f"{iam_catalog.iam_url}/identity/token", json={"apikey": API_KEY}, timeout=10)
    assert as_json.status_code == 400


def test_catalog_answers_401_with_a_body_to_missing_unknown_and_expired_tokens(iam_catalog: IcebergRestServer) -> None:
    url = f"{iam_catalog.url}/v1/namespaces"
    token = _iam_token(iam_catalog).json()["access_token"]
    assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200

    missing = requests.get(url, timeout=10)
    unknown = requests.get(url, headers={"Authorization": "Bearer forged"}, timeout=10)
    iam_catalog.expire_tokens()
    expired = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    for answer in (missing, unknown, expired):
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "NotAuthorizedException"
        assert answer.json()["error"]["code"] == 401
    assert "expired" in expired.json()["error"]["message"]


def test_pyiceberg_with_a_static_iam_token_fails_once_it_expires(iam_catalog: IcebergRestServer) -> None:
    token = _iam_token(iam_catalog).json()["access_token"]
    catalog = _client(iam_catalog, token=token)
    catalog.create_namespace(NAMESPACE)

    iam_catalog.expire_tokens()
    with pytest.raises(UnauthorizedError, match="expired"):
        catalog.list_namespaces()
    # pyiceberg retried once (its 401 retry) with the same token: nothing can refresh a bare token.
    assert [c.status for c in iam_catalog.calls("GET", "/v1/namespaces")] == [401, 401]


def _iam_auth(server: IcebergRestServer, monkeypatch: pytest.MonkeyPatch, apikey: str = API_KEY) -> dict[str, object]:
    """aiplane's own IAM auth manager for pyiceberg, reading the key from the environment by name."""
    monkeypatch.setenv("TEST_IAM_APIKEY", apikey)
    impl = "aiplane.plugins.iceberg.auth.IbmIamAuthManager"
    return {"type": "custom", "impl": impl, "custom": {"apikey_env": "TEST_IAM_APIKEY", "iam_url": server.iam_url}}


def test_token_expiring_mid_run_is_replaced_before_the_catalog_refuses_it(
    iam_catalog: IcebergRestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam_catalog.token_ttl_s = 2.0  # the manager renews after 1.6 s
    catalog = _client(iam_catalog, auth=_iam_auth(iam_catalog, monkeypatch))
    catalog.create_namespace(NAMESPACE)
    table = catalog.create_table(TABLE, _feature_schema())
    table.append(_rows("before"))
    tokens_before = {c.credential for c in iam_catalog.calls() if c.path.startswith("/mds/")}

    time.sleep(2.1)  # every token issued so far has expired on the server
    table.append(_rows("after"))
    rows = _ids(catalog.load_table(TABLE).scan().to_arrow())

    assert rows == sorted(["before-0", "before-1", "before-2", "after-0", "after-1", "after-2"])
    catalog_calls = [c for c in iam_catalog.requests if c.path.startswith("/mds/")]
    assert all(c.status < 400 for c in catalog_calls)
    assert all(c.auth == "bearer" for c in catalog_calls)
    tokens_after = {c.credential for c in catalog_calls} - tokens_before
    assert tokens_after, "no request after the expiry used a fresh token"
    assert len(iam_catalog.calls("POST", "/identity/token")) >= 2


def test_custom_auth_manager_gets_no_second_chance_from_pyiceberg_on_401(
    iam_catalog: IcebergRestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token revoked before its time (here: expired on the server only) is not replaced by
    # pyiceberg's 401 retry for a custom manager: the product must surface UnauthorizedError.
    catalog = _client(iam_catalog, auth=_iam_auth(iam_catalog, monkeypatch))
    catalog.create_namespace(NAMESPACE)  # the catalog's session now holds a token
    iam_catalog.expire_tokens()
    with pytest.raises(UnauthorizedError, match="expired"):
        catalog.list_namespaces()
    assert [c.status for c in iam_catalog.calls("GET", "/v1/namespaces")] == [401, 401]


def test_unknown_api_key_fails_at_connect_with_iams_message_and_the_keys_name(
    iam_catalog: IcebergRestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiplane.core.errors import ConfigError

    refused = r"refused the API key in \$TEST_IAM_APIKEY \(400: .*BXNIM0415E|refused the API key in \$TEST_IAM_APIKEY \(400"
    with pytest.raises(ConfigError, match=refused) as err:
        _client(iam_catalog, auth=_iam_auth(iam_catalog, monkeypatch, apikey="wrong-hunter2"))
    assert "hunter2" not in str(err.value)


class SdkIamAuthManager(AuthManager):
    """The same hook built on IBM's own token manager (``ibm-cloud-sdk-core``), which refreshes by itself."""

    def __init__(self, apikey: str, iam_url: str) -> None:
        from ibm_cloud_sdk_core.token_managers.iam_token_manager import IAMTokenManager

        self.token_manager = IAMTokenManager(apikey, url=iam_url)

    def auth_header(self) -> str:
        return f"Bearer {self.token_manager.get_token()}"


def test_ibm_cloud_sdk_core_iam_token_manager_accepts_the_double(iam_catalog: IcebergRestServer) -> None:
    pytest.importorskip("ibm_cloud_sdk_core")
    impl = f"{SdkIamAuthManager.__module__}.{SdkIamAuthManager.__qualname__}"
    auth = {"type": "custom", "impl": impl, "custom": {"apikey": API_KEY, "iam_url": iam_catalog.iam_url}}
    catalog = _client(iam_catalog, auth=auth)
    catalog.create_namespace(NAMESPACE)

    assert catalog.list_namespaces() == [(NAMESPACE,)]
    assert all(c.status == 200 for c in iam_catalog.calls("POST", "/identity/token"))
    assert {c.auth for c in iam_catalog.calls() if c.path.startswith("/mds/")} == {"bearer"}


# ------------------------------------------------------------------ Cloud Pak for Data


@pytest.fixture
def cpd_catalog(tmp_path: Path) -> Iterator[IcebergRestServer]:
    with iceberg_rest_server(str(tmp_path / "warehouse"), auth=CpdAuth(users={"admin": "cpd-key"})) as server:
        yield server


def _zen_api_key(user: str, key: str) -> str:
    return "ZenApiKey " + base64.b64encode(f"{user}:{key}".encode()).decode()


def test_cpd_zen_api_key_round_trip(cpd_catalog: IcebergRestServer) -> None:
    # pyiceberg 0.12 sends no header of its own with the noop auth manager, so the header property stands.
    catalog = _client(cpd_catalog, auth={"type": "noop"}, **{"header.Authorization": _zen_api_key("admin", "cpd-key")})
    catalog.create_namespace(NAMESPACE)
    catalog.create_table(TABLE, _feature_schema()).append(_rows("cpd"))

    assert _ids(catalog.load_table(TABLE).scan().to_arrow()) == ["cpd-0", "cpd-1", "cpd-2"]
    assert {c.auth for c in cpd_catalog.requests} == {"zenapikey"}


def test_cpd_wrong_zen_api_key_is_refused_at_connect(cpd_catalog: IcebergRestServer) -> None:
    with pytest.raises(UnauthorizedError, match="ZenApiKey"):
        _client(cpd_catalog, auth={"type": "noop"}, **{"header.Authorization": _zen_api_key("admin", "wrong")})


def test_cpd_bearer_token_from_authorize(cpd_catalog: IcebergRestServer) -> None:
    authorize = f"{cpd_catalog.cpd_url}/v1/authorize"
    answer = requests.post(authorize, json={"username": "admin", "api_key": "cpd-key"}, timeout=10)
    assert answer.status_code == 200
    refused = requests.post(authorize, json={"username": "admin", "api_key": "no"}, timeout=10)
    assert refused.status_code == 401

    catalog = _client(cpd_catalog, token=answer.json()["token"])
    catalog.create_namespace(NAMESPACE)
    assert catalog.list_namespaces() == [(NAMESPACE,)]
    assert {c.auth for c in cpd_catalog.calls() if c.path.startswith("/mds/")} == {"bearer"}
