"""The one KFP task every aiplane workload becomes: run the workload with the installed aiplane.

:func:`aiplane_workload` is a *lightweight* component: KFP copies this function's
source into the compiled spec and runs it in ``base_image``, which must hold the
installed aiplane. So it imports everything it needs inside its body, and
changing it changes every pipeline version digest (that is intended: new code,
new version).
"""

from kfp import dsl

__all__ = ["aiplane_workload"]


def aiplane_workload(
    workload_name: str,
    entrypoint: str,
    params_json: str,
    resources_json: str,
    run_id: str,
    inputs_json: str,
    run_params_json: str,
    result_path: str,
    storage_json: str,
    result: dsl.Output[dsl.Artifact],
):
    """Rebuild the workload and run it with ``aiplane.core.worker`` (which calls ``execute``).

    The result JSON (output records and metrics, or the error) goes to the
    ``result`` artifact and, when given, to ``result_path`` for the engine: an
    object-storage URI (``s3://...``), written with the workload's storage
    settings, or a path on a volume the engine mounts too.
    """
    import json
    import os
    import tempfile

    from aiplane.core import worker

    spec = {
        "name": workload_name,
        "entrypoint": entrypoint,
        "inputs": json.loads(inputs_json),
        "params": {**json.loads(params_json), **json.loads(run_params_json)},
        "resources": json.loads(resources_json),
        "run_id": run_id,
        **json.loads(storage_json),
    }
    with tempfile.TemporaryDirectory(prefix="aiplane-task-") as tmp:
        spec_file, result_file = os.path.join(tmp, "workload.json"), os.path.join(tmp, "result.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        code = worker.main([spec_file, result_file])
        with open(result_file) as f:
            text = f.read()
    if "://" in result_path and not result_path.startswith("file://"):
        from aiplane.core.config import S3Settings
        from aiplane.core.storage import Storage

        # One PUT: the engine sees the whole result or none.
        s3, routes = spec.get("s3"), spec.get("s3_routes") or {}
        storage = Storage(
            S3Settings.model_validate(s3) if s3 else None, {r: S3Settings.model_validate(v) for r, v in routes.items()}
        )
        storage.write_bytes(result_path, text.encode())
        result_path = ""
    targets = [result.path] + ([result_path.removeprefix("file://")] if result_path else [])
    for path in targets:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Written whole, then renamed: the engine never reads half a result.
        fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".result-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp_path, path)
    if code != 0:
        failure = json.loads(text)
        raise RuntimeError(
            f"aiplane workload {workload_name} ({run_id}) failed: {failure.get('error_type')}: {failure.get('error')}"
        )
