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

The task itself is a child forked from this runner (:func:`_run_forked`), not the
``sh`` + ``mktemp`` + new interpreter kfp.local starts for a lightweight component:
the same ``kfp.dsl.executor_main`` with the same arguments and environment, in a
fresh process that runs that one task, but with kfp, and on a runner started ahead
(``--standby``) the aiplane worker too, imported already. That start was most of
what kfp.local added to a task (profiled).
"""

import builtins
import json
import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable

# What a new interpreter starts with, for a forked task: kfp.local indents print() and configures logging.
_PRINT, _WARNINGS = builtins.print, list(warnings.filters)
_EXECUTOR = "kfp.dsl.executor_main"
# kfp.local's own, for a command that is not a lightweight component's (set by _fork_tasks).
_kfp_run_local_subprocess: Callable[[list[str], dict[str, str] | None], int] | None = None


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


def _lightweight(full_command: list[str]) -> tuple[str, list[str]] | None:
    """``(component source, executor arguments)`` of kfp's lightweight-component command
    (``sh -ec SCRIPT SOURCE ARGS...``, the script writing SOURCE to a file and running the
    executor on it); ``None`` for any other command, which runs as kfp.local runs it."""
    if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"]:
        return None
    script = full_command[2]
    if f"-m {_EXECUTOR}" not in script or "ephemeral_component.py" not in script:
        return None
    return full_command[3], full_command[4:]


def _run_forked(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's ``run_local_subprocess``, for a lightweight component: the task in a forked child."""
    task = _lightweight(full_command)
    if task is None:
        assert _kfp_run_local_subprocess is not None, "set by _fork_tasks before any task runs"
        return _kfp_run_local_subprocess(full_command, env_vars)
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the task: never returns
        os.close(read)
        _task(*task, write, env_vars or {})
    os.close(write)
    with os.fdopen(read, errors="replace") as output:
        for line in output:  # as kfp.local prints a task's output
            print(line, end="", flush=True)
    print("\n")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _task(source: str, args: list[str], output: int, env: dict[str, str]) -> None:
    """In the forked child: what the component's ``sh`` script does, then exit with the executor's status."""
    code = 1
    try:
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.environ.update(env)
        os.environ["_KFP_RUNTIME"] = "true"
        _as_new_interpreter()
        program = tempfile.mkdtemp()  # as the script's `mktemp -d`: under the run's TMPDIR
        path = os.path.join(program, "ephemeral_component.py")
        with open(path, "w") as f:
            f.write(source)
        from kfp.dsl import executor_main

        sys.argv = [_EXECUTOR, "--component_module_path", path, *args]
        executor_main.executor_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # anything the task raised: printed as a new interpreter would, then its exit status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _as_new_interpreter() -> None:
    """Undo, in a forked task, what this runner changed that a new interpreter would not have."""
    builtins.print = _PRINT
    warnings.filters[:] = _WARNINGS  # type: ignore[index]  # typeshed says Sequence; it is the module's own list
    loggers = [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate, logger.disabled = True, False
    logging.root.setLevel(logging.WARNING)


def _fork_tasks(preload: list[str]) -> None:
    """Run kfp.local's lightweight tasks forked from this runner, importing ``preload`` for them now."""
    global _kfp_run_local_subprocess
    from kfp.local import subprocess_task_handler as handler

    for module in preload:
        __import__(module)
    _kfp_run_local_subprocess = handler.run_local_subprocess
    handler.run_local_subprocess = _run_forked


def main(argv: list[str] | None = None) -> int:
    """Run one pipeline; with ``--standby READY_FD``, import kfp first, close READY_FD and wait for it.

    On standby the run's arguments come as one JSON line on stdin, ``{"argv": [SPEC,
    ARGS, OUT, ROOT], "tmpdir": DIR}``; EOF instead: exit.
    """
    argv = sys.argv[1:] if argv is None else argv
    # kfp warns that resources and non-"python" images do nothing locally; that is expected here.
    warnings.simplefilter("ignore")
    components, local = _import_kfp()
    standby = argv[:1] == ["--standby"]
    # On standby there is time to import what every task imports; otherwise the task imports it as it would.
    _fork_tasks([_EXECUTOR, "aiplane.core.worker"] if standby else [])
    if standby:
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
