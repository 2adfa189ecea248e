"""Compile any workload into a versioned KFP v2 pipeline (IR YAML).

The pipeline has one task, :func:`~aiplane.plugins.kfp.component.aiplane_workload`.
What is the same for the same code and configuration is compiled in: the entry
point, the workload's params (as pipeline-parameter defaults, so a changed
hyperparameter default is a new version), the image, resources, node selector
and tolerations. What changes every run is *not*: run id, input records, the
result path and the ``run_params`` are run arguments. So the spec, and the
version named by its digest, is stable across runs of the same code and config.
"""

# No `from __future__ import annotations`: kfp reads the pipeline function's annotations as types.
import collections
import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from aiplane.core.config import Target
from aiplane.core.kube import cpu_quantity, memory_quantity, pod_gpus, pod_secret_refs
from aiplane.core.workload import Workload

from .settings import KfpSettings

__all__ = ["CompiledPipeline", "compile_workload", "pipeline_name"]

# The kfp DSL registers tasks in a process-wide "current pipeline"; compiling is not thread-safe.
_COMPILE_LOCK = threading.Lock()


@dataclass(frozen=True)
class CompiledPipeline:
    """A compiled pipeline and the run arguments of this workload's run of it."""

    name: str
    spec: str
    """The IR YAML, byte-identical for the same code and configuration."""
    digest: str
    """``sha256:<hex>`` of ``spec``."""
    arguments: dict[str, Any] = field(default_factory=dict)
    """Run-specific parameters: run id, input records, result path, run params."""

    @property
    def version(self) -> str:
        """The pipeline version name: the spec's digest, so equal specs share a version."""
        return self.digest.replace(":", "-")


def pipeline_name(workload: Workload) -> str:
    """``aiplane-<workload name>``: one KFP pipeline per kind of workload, versions by spec."""
    return f"aiplane-{workload.name}"


def _json(value: Any) -> str:
    # Sorted and compact, so equal values compile to equal bytes.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _secret_env(workload: Workload) -> dict[str, list[tuple[str, str]]]:
    """Secret name -> (key, env var) of every credential the workload reads where it runs.

    The pod sees only what is mounted into it: a reference to this process's
    environment (``{env: VAR}``) would be unset there, so it is refused here,
    before anything is sent.
    """
    mounts: dict[str, list[tuple[str, str]]] = {}
    for ref in pod_secret_refs(workload, "pipeline"):
        assert ref.secret is not None and ref.key is not None, "pod_secret_refs refuses any other kind"
        mounts.setdefault(ref.secret, []).append((ref.key, ref.env_var))
    return mounts


def _kubernetes_config(settings: KfpSettings, secret_env: dict[str, list[tuple[str, str]]] | None = None) -> dict[str, Any]:
    """The task's KubernetesExecutorConfig as JSON (the format kfp-kubernetes writes)."""
    config: dict[str, Any] = {}
    if secret_env:
        # Each secret key arrives as the env var its SecretRef resolves from.
        config["secretAsEnv"] = [
            {
                "secretName": name,
                "secretNameParameter": {"runtimeValue": {"constant": name}},
                "keyToEnv": [{"secretKey": key, "envVar": var} for key, var in sorted(pairs)],
            }
            for name, pairs in sorted(secret_env.items())
        ]
    if settings.node_selector:
        config["nodeSelector"] = {"labels": dict(sorted(settings.node_selector.items()))}
    if settings.tolerations:
        # int64 travels as a string in protobuf JSON, as kfp-kubernetes writes it.
        config["tolerations"] = [
            {k: str(v) if k == "tolerationSeconds" else v for k, v in t.manifest().items()} for t in settings.tolerations
        ]
    if settings.pvc_mounts:
        config["pvcMount"] = [
            # Both the current field and the deprecated `constant`, as kfp-kubernetes writes a fixed claim name.
            {"constant": claim, "mountPath": path, "pvcNameParameter": {"runtimeValue": {"constant": claim}}}
            for claim, path in sorted(settings.pvc_mounts.items())
        ]
    return config


def compile_workload(
    workload: Workload, target: Target, settings: KfpSettings, result_path: str = ""
) -> CompiledPipeline:
    """Compile ``workload`` for ``target`` into KFP IR YAML with its run arguments.

    Raises :class:`ConfigError` when the target cannot give the workload what it needs.
    What the spec is made from (everything but the run arguments) names it in a small
    cache, so a workload that runs again with the same code and configuration is not
    compiled again: the bytes would be the same.
    """
    run_params = {k: v for k, v in workload.params.items() if k in settings.run_params}
    made_of = _json(
        [
            workload.model_dump(mode="json", exclude={"run_id", "inputs", "cache_dir"}),
            sorted(run_params),
            target.model_dump(mode="json"),
            settings.model_dump(mode="json"),
        ]
    )
    name, spec, digest = _spec(made_of, workload, target, settings)
    return CompiledPipeline(
        name=name,
        spec=spec,
        digest=digest,
        arguments={
            "run_id": workload.run_id,
            "inputs_json": _json({k: v.model_dump(mode="json") for k, v in workload.inputs.items()}),
            "result_path": result_path,
            "run_params_json": _json(run_params),
        },
    )


_SPECS: "collections.OrderedDict[str, tuple[str, str, str]]" = collections.OrderedDict()
_SPECS_KEPT = 32


def _spec(made_of: str, workload: Workload, target: Target, settings: KfpSettings) -> tuple[str, str, str]:
    """(name, IR YAML, digest) of the pipeline made of ``made_of``: cached, else compiled."""
    with _COMPILE_LOCK:
        if made_of in _SPECS:
            _SPECS.move_to_end(made_of)
            return _SPECS[made_of]
    compiled = _compile(workload, target, settings)
    with _COMPILE_LOCK:
        _SPECS[made_of] = compiled
        while len(_SPECS) > _SPECS_KEPT:
            _SPECS.popitem(last=False)
    return compiled


def _compile(workload: Workload, target: Target, settings: KfpSettings) -> tuple[str, str, str]:
    from kfp import compiler, dsl

    from .component import aiplane_workload

    gpus = pod_gpus(workload, target)
    baked = {k: v for k, v in workload.params.items() if k not in settings.run_params}
    image = settings.base_image or f"python:{sys.version_info.major}.{sys.version_info.minor}"
    res = workload.resources
    cpu_request = settings.cpu_request or cpu_quantity(res.cpus)
    memory_request = settings.memory_request or (memory_quantity(res.memory_gb) if res.memory_gb else None)
    k8s = _kubernetes_config(settings, _secret_env(workload))
    name = pipeline_name(workload)

    def pipeline(
        run_id: str,
        inputs_json: str,
        result_path: str,
        run_params_json: str,
        workload_name: str,
        entrypoint: str,
        params_json: str,
        resources_json: str,
        storage_json: str,
    ) -> dsl.Artifact:
        task = component(
            workload_name=workload_name,
            entrypoint=entrypoint,
            params_json=params_json,
            resources_json=resources_json,
            run_id=run_id,
            inputs_json=inputs_json,
            run_params_json=run_params_json,
            result_path=result_path,
            storage_json=storage_json,
        )
        task.set_display_name(workload.name)
        # Workloads have side effects (publish, deploy); a cache hit would skip them.
        task.set_caching_options(False)
        task.set_cpu_request(cpu_request)
        if settings.cpu_limit:
            task.set_cpu_limit(settings.cpu_limit)
        if memory_request:
            task.set_memory_request(memory_request)
        if settings.memory_limit:
            task.set_memory_limit(settings.memory_limit)
        if gpus:
            task.set_accelerator_type(settings.accelerator_type)
            task.set_accelerator_limit(gpus)
        if k8s:
            task.platform_config = {"kubernetes": k8s}
        return task.outputs["result"]

    # The config lives in the defaults of the last five parameters: visible and
    # overridable in the KFP UI, and part of the spec's digest. Storage settings hold
    # only references; the pod's cache is its own (the orchestrator's path means nothing there).
    pipeline.__defaults__ = (
        workload.name,
        workload.entrypoint,
        _json(baked),
        _json(res.model_dump(mode="json")),
        _json(workload.model_dump(mode="json", include={"s3", "s3_routes"})),
    )
    with _COMPILE_LOCK, tempfile.TemporaryDirectory(prefix="aiplane-kfp-compile-") as tmp:
        component = dsl.component(aiplane_workload, base_image=image, install_kfp_package=False)
        compiled = dsl.pipeline(name=name, description=f"aiplane workload {workload.name} ({workload.entrypoint})")(
            pipeline
        )
        path = os.path.join(tmp, "pipeline.yaml")
        compiler.Compiler().compile(compiled, path)
        with open(path) as f:
            spec = f.read()
    return name, spec, "sha256:" + hashlib.sha256(spec.encode()).hexdigest()
