"""Every manifest under ``deployments/openshift-ai/``, validated offline as the cluster would.

Core kinds against Kubernetes' own schemas (kubernetes-validate's bundled, strict: an
unknown field is an error, as ``kubectl apply --validate=strict`` makes it), custom
resources against their CRDs in ``../shared/crds``, the Helm values against the chart's
values (``tests/data/dagster-helm-values.schema.yaml``), and the Dagster instance the chart
renders from them against dagster-k8s's and dagster-postgres's own config schemas, down to
the run Job dagster-k8s builds. Then what a schema cannot say: OpenShift's restricted SCC,
least-privilege RBAC, no secret values, and that each check can fail.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from conftest import CRDS, TESTS, crd_validator

pytestmark = pytest.mark.filterwarnings("ignore:Found version mismatch:UserWarning")

OPENSHIFT_AI = TESTS.parent / "deployments" / "openshift-ai"
VALUES = OPENSHIFT_AI / "dagster-values.yaml"
CONTAINERFILE = OPENSHIFT_AI / "Containerfile"
VALUES_SCHEMA = TESTS / "data" / "dagster-helm-values.schema.yaml"
# OpenShift 4.20's Kubernetes.
K8S_VERSION = "1.33"
NAMESPACE = "aiplane"

# Custom resources: (apiVersion, kind) -> (CRD file in ../shared/crds, version).
CRDS_BY_KIND = {
    ("ray.io/v1", "RayCluster"): ("ray.io_rayclusters.yaml", "v1"),
    ("ray.io/v1", "RayJob"): ("ray.io_rayjobs.yaml", "v1"),
    ("serving.kserve.io/v1beta1", "InferenceService"): ("serving.kserve.io_inferenceservices.yaml", "v1beta1"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): ("serving.kserve.io_servingruntimes.yaml", "v1alpha1"),
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): ("trainer.kubeflow.org_clustertrainingruntimes.yaml", "v1alpha1"),
    ("datasciencepipelinesapplications.opendatahub.io/v1", "DataSciencePipelinesApplication"): (
        "datasciencepipelinesapplications.opendatahub.io_datasciencepipelinesapplications.yaml",
        "v1",
    ),
}
CLUSTER_SCOPED = {"ClusterTrainingRuntime", "ClusterRole", "ClusterRoleBinding"}
# The files that are not Kubernetes objects.
NOT_MANIFESTS = {VALUES.name}
# Where a pod template sits in each kind aiplane writes.
_POD_TEMPLATES = {"StatefulSet": ("spec", "template"), "Deployment": ("spec", "template"), "Job": ("spec", "template")}


def _manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(OPENSHIFT_AI.glob("*.y*ml")):
        if path.name in NOT_MANIFESTS:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


MANIFESTS = _manifests()


def _id(entry: tuple[str, dict]) -> str:
    path, doc = entry
    return f"{path}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def validation_errors(doc: dict) -> list[str]:
    """What the cluster would reject in ``doc``: its kind's schema, strict; an unknown kind is an error too."""
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS_BY_KIND:
        filename, version = CRDS_BY_KIND[key]
        return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator(filename, version).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[1]} ({key[0]}): neither a Kubernetes kind nor a CRD in {CRDS}"]
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


# ------------------------------------------------------------------ the manifests against the cluster's schemas


def test_the_folder_has_the_orchestrator_and_the_cluster_side():
    kinds = {(path, doc["kind"]) for path, doc in MANIFESTS}
    assert {("rbac.yaml", "Role"), ("rbac.yaml", "RoleBinding"), ("rbac.yaml", "ServiceAccount")} <= kinds
    assert ("networkpolicy.yaml", "NetworkPolicy") in kinds
    assert {("raycluster.yaml", "RayCluster"), ("dspa.yaml", "DataSciencePipelinesApplication")} <= kinds
    assert VALUES.is_file() and CONTAINERFILE.is_file()


@pytest.mark.parametrize("entry", MANIFESTS, ids=_id)
def test_every_manifest_is_one_the_cluster_accepts(entry):
    _path, doc = entry
    assert validation_errors(doc) == []
    # A cluster-scoped kind has no namespace; every other object goes in aiplane's.
    assert doc["metadata"].get("namespace") == (None if doc["kind"] in CLUSTER_SCOPED else NAMESPACE)


@pytest.mark.parametrize(
    "where, field",
    [
        ("postgresql.yaml", ("spec", "template", "spec", "containers", 0, "securityContext", "runAsNonroot")),
        ("networkpolicy.yaml", ("spec", "podSelectors")),
        ("rbac.yaml", ("rules", 0, "verb")),
        ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParam")),
        ("dspa.yaml", ("spec", "apiServer", "deployed")),
    ],
    ids=lambda v: v if isinstance(v, str) else ".".join(map(str, v)),
)
def test_a_manifest_with_a_misspelt_field_is_rejected(where, field):
    kinds = {"rbac.yaml": "Role", "postgresql.yaml": "StatefulSet"}
    doc = copy.deepcopy(next(d for p, d in MANIFESTS if p == where and d["kind"] == kinds.get(where, d["kind"])))
    node = doc
    for step in field[:-1]:
        node = node[step]
    node[field[-1]] = True

    assert validation_errors(doc) != []


def test_a_kind_with_no_schema_is_rejected_not_skipped():
    route = {"apiVersion": "route.openshift.io/v1", "kind": "Route", "metadata": {"name": "x"}, "spec": {}}
    assert validation_errors(route) and "no schema" in validation_errors(route)[0]


# ------------------------------------------------------------------ the Helm values against the chart's schema


def _values_validator():
    """The values schema, its Kubernetes references resolved offline to kubernetes-validate's definitions."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource
    from referencing.jsonschema import DRAFT202012

    version = [v for v in kv.all_versions() if kv.major_minor(v) == K8S_VERSION][-1]
    k8s = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)

    def retrieve(uri: str):
        # The chart's references name kubernetesjsonschema.dev's /definitions/<name>; the bundled file keeps $defs.
        if uri.startswith("https://kubernetesjsonschema.dev/") and uri.endswith("/_definitions.json"):
            return Resource(
                {"definitions": {name: {"$ref": f"{k8s['$id']}#/$defs/{name}"} for name in k8s["$defs"]}},
                specification=DRAFT202012,
            )
        raise NoSuchResource(uri)

    registry = Registry(retrieve=retrieve).with_resource(k8s["$id"], Resource.from_contents(k8s))
    return jsonschema.Draft202012Validator(yaml.safe_load(VALUES_SCHEMA.read_text()), registry=registry)


def _values_errors(values: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _values_validator().iter_errors(values)]


def test_the_helm_values_fit_the_charts_schema():
    assert _values_errors(_values()) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("dagsterWebserver", "replicas"), 2),  # the chart's key is replicaCount
        (("dagsterDaemon", "securityContext", "runAsNonroot"), True),  # a Kubernetes field, misspelt
        (("runLauncher", "type"), "KubernetesRunLauncher"),
        (("runLauncher", "config", "k8sRunLauncher", "imagePullPolicy"), "Sometimes"),
        (("postgresql", "service", "port"), "5432"),
        (("dagster-user-deployments", "deployments", 0, "env", 1, "valueFrom", "secretKeyRef", "keys"), "x"),
    ],
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_helm_values_the_chart_would_not_take_are_rejected(path, value):
    values = _values()
    node = values
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value

    assert _values_errors(values) != []


# ------------------------------------------------------------------ the instance the chart renders, against Dagster's own schemas

# What the chart sets in the webserver's and daemon's environment, read by the instance settings it renders.
_CHART_ENV = {
    "DAGSTER_HOME": "/opt/dagster/dagster_home",
    "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "aiplane-dagster-instance",
    "DAGSTER_K8S_PG_PASSWORD_SECRET": "aiplane-postgresql",
    "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": "aiplane-dagster-pipeline-env",
}
_RUN_K8S_CONFIG_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}
_LAUNCHER_KEYS = {
    "envVars": "env_vars",
    "volumeMounts": "volume_mounts",
    "volumes": "volumes",
    "labels": "labels",
    "failPodOnRunFailure": "fail_pod_on_run_failure",
    "resources": "resources",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
}


def rendered_run_launcher(values: dict) -> dict:
    """The ``run_launcher.config`` the chart writes into dagster.yaml from ``runLauncher.config.k8sRunLauncher``."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": values["global"]["serviceAccountName"],
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}] + [c["name"] for c in k8s["envConfigMaps"]],
    }
    if k8s.get("envSecrets"):
        config["env_secrets"] = [s["name"] for s in k8s["envSecrets"]]
    for key, name in _LAUNCHER_KEYS.items():
        if k8s.get(key) not in (None, [], {}):
            config[name] = k8s[key]
    if k8s.get("runK8sConfig"):
        config["run_k8s_config"] = {_RUN_K8S_CONFIG_KEYS[k]: v for k, v in k8s["runK8sConfig"].items()}
    return config


def rendered_postgres_db(values: dict) -> dict:
    """The ``postgres_db`` the chart writes for run, event-log and schedule storage from ``postgresql``."""
    pg = values["postgresql"]
    db = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams", {}),
    }
    if pg.get("postgresqlScheme"):
        db["scheme"] = pg["postgresqlScheme"]
    return db


def _dagster_errors(config_type, value) -> list[str]:
    from dagster._config.validate import validate_config

    result = validate_config(config_type, value)
    return [] if result.success else [e.message for e in result.errors]


def test_the_run_launcher_is_dagster_k8s_and_its_settings_fit_its_own_schema():
    from dagster_k8s import K8sRunLauncher

    values = _values()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert _dagster_errors(K8sRunLauncher.config_type(), rendered_run_launcher(values)) == []


def test_run_event_and_schedule_storage_are_postgresql_and_fit_dagster_postgres_schemas():
    from dagster_postgres import DagsterPostgresStorage, PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    db = rendered_postgres_db(_values())
    for storage in (PostgresRunStorage, PostgresEventLogStorage, PostgresScheduleStorage, DagsterPostgresStorage):
        assert _dagster_errors(storage.config_type(), {"postgres_db": db}) == [], storage.__name__
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def test_run_launcher_and_storage_settings_dagster_would_not_take_are_rejected():
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import PostgresRunStorage

    launcher = rendered_run_launcher(_values())
    assert _dagster_errors(K8sRunLauncher.config_type(), {**launcher, "job_namespaces": "aiplane"}) != []
    assert _dagster_errors(K8sRunLauncher.config_type(), {**launcher, "load_incluster_config": "yes"}) != []
    db = rendered_postgres_db(_values())
    assert _dagster_errors(PostgresRunStorage.config_type(), {"postgres_db": {**db, "port": "five"}}) != []
    assert _dagster_errors(PostgresRunStorage.config_type(), {"postgres_db": {**db, "host": "x"}}) != []


def run_job(values: dict, monkeypatch) -> dict:
    """The Kubernetes Job dagster-k8s builds for a run from these values, as the API server would receive it."""
    import kubernetes
    from dagster._config.validate import process_config
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    for name, value in _CHART_ENV.items():
        monkeypatch.setenv(name, value)
    processed = process_config(K8sRunLauncher.config_type(), rendered_run_launcher(values))
    assert processed.success, processed.errors
    c = processed.value
    context = K8sContainerContext(
        image_pull_policy=c.get("image_pull_policy"), service_account_name=c.get("service_account_name"),
        env_config_maps=c.get("env_config_maps"), env_secrets=c.get("env_secrets"), env_vars=c.get("env_vars"),
        volume_mounts=c.get("volume_mounts"), volumes=c.get("volumes"), labels=c.get("labels"),
        namespace=c.get("job_namespace"), resources=c.get("resources"), security_context=c.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(c.get("run_k8s_config") or {}),
    )  # fmt: skip
    deployment = values["dagster-user-deployments"]["deployments"][0]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(
            job_image=image, dagster_home=c["dagster_home"], instance_config_map=c["instance_config_map"],
            postgres_password_secret=c["postgres_password_secret"],
        ),
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-0123456789",
        pod_name="dagster-run-0123456789",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": "__ASSET_JOB", "dagster/run-id": "0123456789"},
    )  # fmt: skip
    doc = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    doc["metadata"]["namespace"] = c["job_namespace"]
    return doc


def test_the_run_job_dagster_k8s_builds_from_the_values_is_a_valid_job(monkeypatch):
    job = run_job(_values(), monkeypatch)

    assert validation_errors(job) == []
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "run_worker"
    assert pod["spec"]["serviceAccountName"] == "aiplane"
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "aiplane-postgresql", "key": "postgresql-password"}
    assert env["AIPLANE_COS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "aiplane-cos"


# ------------------------------------------------------------------ OpenShift's restricted SCC


def _pod_specs() -> list[tuple[str, dict, dict]]:
    """``(where, pod spec, container)`` for every container aiplane's manifests and values run."""
    found = []
    for path, doc in MANIFESTS:
        if doc["kind"] in _POD_TEMPLATES and doc["apiVersion"].split("/")[0] in ("apps", "batch", "v1"):
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                found.append((f"{path}:{doc['metadata']['name']}/{c['name']}", spec, c))
    values = _values()
    for key in ("dagsterWebserver", "dagsterDaemon"):
        section = values[key]
        found.append((f"values:{key}", section["podSecurityContext"], {"securityContext": section["securityContext"]}))
    for d in values["dagster-user-deployments"]["deployments"]:
        found.append((f"values:user-code/{d['name']}", d["podSecurityContext"], {"securityContext": d["securityContext"]}))
    return found


def _pod_security(spec: dict) -> dict:
    return spec.get("securityContext", spec) if "containers" in spec else spec


@pytest.mark.parametrize("where, pod, container", _pod_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pod_passes_the_restricted_scc(where, pod, container):
    pod_sc = _pod_security(pod)
    sc = container.get("securityContext", {})
    assert "runAsUser" not in pod_sc and "runAsUser" not in sc, "OpenShift assigns the UID: no fixed runAsUser"
    assert "runAsGroup" not in pod_sc and "runAsGroup" not in sc and "fsGroup" not in pod_sc
    assert pod_sc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")
    assert not sc.get("privileged") and not pod.get("hostNetwork") and not pod.get("hostPID")


def test_the_run_pods_pass_the_restricted_scc(monkeypatch):
    spec = run_job(_values(), monkeypatch)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    test_every_pod_passes_the_restricted_scc("run", spec, container)


def test_a_fixed_uid_or_a_missing_drop_fails_the_scc_check():
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}, "containers": []}
    container = {"securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    with pytest.raises(AssertionError):
        test_every_pod_passes_the_restricted_scc("bad", pod, container)
    del pod["securityContext"]["runAsUser"]
    test_every_pod_passes_the_restricted_scc("good", pod, container)
    with pytest.raises(AssertionError):
        test_every_pod_passes_the_restricted_scc("bad", pod, {"securityContext": {"allowPrivilegeEscalation": False}})


def _containerfile() -> list[tuple[str, str]]:
    """The Containerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_the_image_is_ubi_pinned_non_root_and_group_zero_writable():
    steps = _containerfile()
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    (base,) = [a for op, a in steps if op == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("registry.access.redhat.com/ubi9/python-311:") and not base.endswith(":latest")
    users = [a for op, a in steps if op == "USER"]
    assert users[-1].isdigit() and users[-1] != "0", "the image ends as a numeric non-root user"
    installs = " ".join(a for op, a in steps if op == "RUN" and "pip install" in a)
    for package in ("torch", "dagster", "dagster-webserver", "dagster-k8s", "dagster-postgres"):
        assert re.search(rf'"{re.escape(package)}==\$\{{\w+\}}"', installs), f"{package} is not pinned"
    for name in re.findall(r"\$\{(\w+)\}", installs):
        assert re.fullmatch(r"\d+(\.\d+)+", args[name]), f"{name}={args.get(name)} is not an exact version"
    env = " ".join(a for op, a in steps if op == "ENV")
    dagster_home = _values()["global"]["dagsterHome"]
    assert f"DAGSTER_HOME={dagster_home}" in env
    writable = " ".join(a for op, a in steps if op == "RUN" and "chgrp" in a)
    for path in (dagster_home, "/var/lib/aiplane"):
        assert path in writable and "chgrp -R 0" in writable and "chmod -R g=u" in writable


def test_the_image_holds_no_secret():
    for op, arg in _containerfile():
        if op in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|APIKEY|API_KEY|ACCESS_KEY)\w*=", arg.upper()), arg


# ------------------------------------------------------------------ least privilege, secrets by reference


def _rules() -> list[dict]:
    (role,) = [d for _, d in MANIFESTS if d["kind"] == "Role"]
    return role["rules"]


def test_rbac_grants_no_wildcard_and_no_cluster_scope():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for rule in _rules():
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), rule
        assert not rule.get("nonResourceURLs")
    (binding,) = [d for _, d in MANIFESTS if d["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "aiplane"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "aiplane", "namespace": NAMESPACE}]


def _granted() -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in _rules():
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rbac_grants_what_aiplane_creates_and_reads_and_nothing_else():
    granted = _granted()
    assert granted[("batch", "jobs")] == {"create", "get", "list", "watch", "delete"}
    assert granted[("", "pods")] == {"get", "list", "watch", "delete"}  # delete: the k8s-job engine's cancel
    assert granted[("", "pods/log")] == {"get"}
    assert granted[("", "events")] == {"get", "list", "watch"}
    assert {"create", "delete", "get"} <= granted[("serving.kserve.io", "inferenceservices")]
    assert {"create", "delete", "get"} <= granted[("serving.kserve.io", "servingruntimes")]
    # No Secrets, ConfigMaps or workloads of other kinds; only these API groups.
    assert not {r for g, r in granted if r in ("secrets", "configmaps", "deployments", "services", "pods/exec")}
    allowed = {"", "batch", "serving.kserve.io", "datasciencepipelinesapplications.opendatahub.io", "route.openshift.io"}
    assert {g for g, _ in granted} <= allowed
    # What the API server could do with the pipeline server and routes is limited to aiplane's own.
    for rule in _rules():
        if rule["apiGroups"] != ["route.openshift.io"] and "datasciencepipelinesapplications" not in rule["resources"][0]:
            continue
        assert rule.get("resourceNames"), rule


def test_every_pod_of_the_values_runs_as_the_least_privilege_account():
    values = _values()
    assert values["serviceAccount"] == {"create": False, "name": "aiplane", "annotations": {}}
    assert values["global"]["serviceAccountName"] == "aiplane"
    assert values["rbacEnabled"] is False, "the chart's own Role grants more than rbac.yaml"
    assert values["dagster-user-deployments"]["serviceAccount"]["name"] == "aiplane"
    assert rendered_run_launcher(values)["service_account_name"] == "aiplane"


_SECRETISH = re.compile(r"(password|passwd|secret|token|api[_-]?key|apikey|access[_-]?key|credential)", re.IGNORECASE)


def _literal_secrets(node, where: str = "") -> list[str]:
    """Paths where a secret-looking key holds a literal value (a reference, a Secret's name or key, is fine)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if key in ("secretKeyRef", "secretRef", "s3CredentialsSecret"):
                continue  # a reference by name and key
            literal = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
            names_a_secret = _SECRETISH.search(str(key)) and literal and value != ""
            if names_a_secret and (not re.search(r"(Name|Secret|Key|Envvar)$", str(key)) or key in ("secretKey", "accessKey")):
                found.append(path)
            found += _literal_secrets(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict) and "name" in value and "value" in value and _SECRETISH.search(str(value["name"])):
                found.append(f"{where}[{i}] env {value['name']}")
            found += _literal_secrets(value, f"{where}[{i}]")
    return found


def test_no_manifest_carries_a_secret_value():
    assert [d["metadata"]["name"] for _, d in MANIFESTS if d["kind"] == "Secret"] == []
    for path, doc in MANIFESTS:
        assert _literal_secrets(doc, path) == []
    assert _literal_secrets(_values(), "values") == []
    assert _values()["postgresql"]["postgresqlPassword"] == ""


def test_the_secret_check_finds_a_literal_value():
    assert _literal_secrets({"env": [{"name": "AIPLANE_COS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert _literal_secrets({"postgresql": {"postgresqlPassword": "hunter2"}})
    assert not _literal_secrets({"env": [{"name": "X_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]})


def test_every_secret_a_manifest_references_is_named_in_its_comments():
    """Secrets are created before anything is applied: the file, or the values' list of them, names each."""

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                referenced.add(node["secretKeyRef"]["name"])
            for key in ("secretName",):
                if isinstance(node.get(key), str):
                    referenced.add(node[key])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    def comments(path: Path) -> str:
        return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))

    undocumented = {}
    for path in [VALUES, *sorted({OPENSHIFT_AI / p for p, _ in MANIFESTS})]:
        referenced = set()
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc)
        documented = comments(path) + comments(VALUES)
        missing = sorted(name for name in referenced if name not in documented)
        if missing:
            undocumented[path.name] = missing
    assert undocumented == {}


# ------------------------------------------------------------------ network policy


def _policies() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for _, d in MANIFESTS if d["kind"] == "NetworkPolicy"}


def test_ingress_is_denied_unless_a_policy_lets_it_in():
    policies = _policies()
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_postgresql_accepts_dagster_pods_only():
    spec = _policies()["postgresql-from-dagster"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "aiplane-postgresql"}
    (rule,) = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dagster"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    # No other policy selects PostgreSQL's pods (policies add up: one more would open it).
    others = [n for n, s in _policies().items() if n not in ("postgresql-from-dagster", "default-deny-ingress")]
    pg_labels = {"app.kubernetes.io/name": "aiplane-postgresql"}
    assert [n for n in others if _selects(_policies()[n]["podSelector"], pg_labels)] == []


def test_the_ui_is_reached_from_the_router_and_the_code_server_from_dagster_only():
    values = _values()
    web = _policies()["dagster-webserver-from-router"]
    assert web["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"policy-group.network.openshift.io/ingress": ""}}}]
    assert web["ingress"][0]["ports"][0]["port"] == values["dagsterWebserver"]["service"]["port"]
    code = _policies()["dagster-user-code-from-dagster"]
    assert code["ingress"][0]["ports"][0]["port"] == values["dagster-user-deployments"]["deployments"][0]["port"]
    sources = [f["podSelector"]["matchLabels"] for f in code["ingress"][0]["from"]]
    assert {s.get("component") or s.get("app.kubernetes.io/component") for s in sources} == {
        "dagster-webserver", "dagster-daemon", "run_worker"
    }  # fmt: skip
    for name in ("dagster-webserver", "dagster-daemon", "user-deployments"):
        labels = {"app.kubernetes.io/name": "dagster", "component": name}
        assert not _selects(_policies()["workloads-from-project"]["podSelector"], labels)


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, present = labels.get(expr["key"]), expr["key"] in labels
        if expr["operator"] == "In" and not (present and value in expr["values"]):
            return False
        if expr["operator"] == "NotIn" and present and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True
