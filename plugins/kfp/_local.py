"""``python .../aiplane/plugins/kfp/_local.py SPEC.yaml ARGS.json OUT.json PIPELINE_ROOT``: run a compiled pipeline with kfp.local.

The engine runs this in its own process group rather than calling ``kfp.local``
in the orchestrator: ``kfp.local`` keeps process-wide state, prints task output to
``sys.stdout`` and cannot be stopped, while a process group can be killed whole
on cancellation, task subprocess included. Task output (aiplane event lines
among it) goes to stdout; ``OUT.json`` gets the run's directory and the URI of
the task's ``result`` artifact.

Run by its path, not with ``-m``: that would import the ``aiplane.plugins.kfp``
package, and with it ``aiplane.core`` (pydantic, pluggy), which nothing here uses
(a quarter of the runner's time, profiled). It needs only the standard library and kfp.
"""

import json
import os
import signal
import sys
import tempfile
import warnings


def _import_kfp():
    """``kfp.components`` and ``kfp.local``, without kfp's API client when that works.

    ``import kfp`` imports its API client, and with it the Kubernetes client (~0.3 s of
    each local run), unless ``_KFP_RUNTIME`` is set, as it is inside KFP task containers.
    kfp.local does not need the client. Importing ``component_factory`` first avoids a
    circular import in that mode; should a kfp release break this, import kfp plainly.
    """
    os.environ["_KFP_RUNTIME"] = "true"
    try:
        import kfp.dsl.component_factory  # noqa: F401
        from kfp import components, local

        return components, local
    except Exception:  # any failure of the runtime-mode import: retry in kfp's ordinary mode, which says what is wrong
        for name in [m for m in sys.modules if m == "kfp" or m.startswith("kfp.")]:
            del sys.modules[name]
        del os.environ["_KFP_RUNTIME"]
        from kfp import components, local

        return components, local


def main(argv: list[str] | None = None) -> int:
    """Run one pipeline; with ``--standby READY_FD``, import kfp first, close READY_FD and wait for it.

    On standby the run's arguments come as one JSON line on stdin, ``{"argv": [SPEC,
    ARGS, OUT, ROOT], "tmpdir": DIR}``; EOF instead: exit.
    """
    argv = sys.argv[1:] if argv is None else argv
    # kfp warns that resources and non-"python" images do nothing locally; that is expected here.
    warnings.simplefilter("ignore")
    components, local = _import_kfp()
    if argv[:1] == ["--standby"]:
        os.close(int(argv[1]))  # the engine sees EOF: imported
        line = sys.stdin.readline()
        # The tasks' stdin is empty, as for a runner started for the run.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if not line.strip():
            return 0
        handoff = json.loads(line)
        os.environ["TMPDIR"] = handoff["tmpdir"]
        tempfile.tempdir = None  # read TMPDIR again
        argv = handoff["argv"]
    spec, args_file, out_file, pipeline_root = argv
    # Cancellation arrives as SIGTERM: exit through the `with` blocks so the workspace is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    arguments = json.loads(open(args_file).read())
    with tempfile.TemporaryDirectory(prefix="aiplane-kfp-workspace-") as workspace:
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=pipeline_root,
            workspace_root=os.path.join(workspace, "ws"),
            raise_on_error=False,
        )
        os.makedirs(os.path.join(workspace, "ws"), exist_ok=True)
        task = components.load_component_from_file(spec)(**arguments)
    outputs = task.outputs
    artifact = outputs.get("Output") if isinstance(outputs, dict) else None
    if artifact is None:
        return 1
    uri = artifact.uri
    with open(out_file, "w") as f:
        json.dump({"result_artifact": uri, "run_dir": os.path.dirname(os.path.dirname(uri))}, f)
    return 0


if __name__ == "__main__":
    # Run as a file, Python puts this file's folder first on the path: its modules
    # (engine, pipeline, settings, ...) must not stand in for top-level ones kfp imports.
    del sys.path[0]
    sys.exit(main())
