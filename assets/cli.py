"""``aiplane``: check a deployment, run the whole chain, list plugins, stop the endpoint.

``aiplane up`` runs the preflight, then materializes through Dagster, on the
instance in ``$DAGSTER_HOME`` (default ``<home>/dagster``, the same one
``dagster dev`` uses when started with that ``DAGSTER_HOME``), only the assets
that are missing or stale, and prints the endpoint, a sample completion, the
factsheet and the lineage chain. A failure prints aiplane's message once, last,
without a traceback (``--debug`` or ``AIPLANE_DEBUG=1`` shows them).
"""


from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from aiplane.core.config import load_deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import Registry
from aiplane.core.worker import exit_now

from .instance import dagster_home, open_instance
from .runs import RunFailed, debug_requested, os_advice
from .up import pins, rollback, stop, up

__all__ = ["main", "console"]


def _check(args: argparse.Namespace) -> int:
    from aiplane.core.preflight import preflight, region_plan

    deployment = load_deployment(args.deployment or None)
    registry = Registry()
    problems = preflight(deployment, registry, pins(args), offline=args.offline)
    if args.offline:
        print(
            "offline: not checked: the home, the S3 stores' keys and endpoints, remote services, a base model in a bucket.",
            file=sys.stderr,
        )
    if problems:
        print(f"{deployment.source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"{deployment.source}: ok: {len(deployment.targets)} target(s) "
        f"({', '.join(t.name for t in deployment.targets)}); feature store {deployment.feature_store.name}, "
        f"trainer {deployment.trainer.name}, serving {deployment.serving.name}, factsheet {deployment.factsheet.name}"
    )
    # Per region, where its partition would run each workload: a region without a target fails alone at run
    # time, so `up` is not refused for it, but the check says so and fails.
    unplaceable = 0
    for region, placed in region_plan(deployment, registry).items():
        regional = deployment.in_region(region)
        stored = deployment.storage.regions.get(region)
        print(f"region {region}: feature store {regional.feature_store.name}; " + "; ".join(
            f"{key} {regional.spec(key).name} on {where}" for key, where in placed.items() if not where.startswith("no target:")
        ) + ("" if stored is None else f"; storage {stored.root}" + (
            f" (a store of its own: {stored.s3.endpoint or 'AWS S3'})" if stored.s3 else ""
        )))  # fmt: skip
        for key, where in placed.items():
            if where.startswith("no target:"):
                unplaceable += 1
                print(f"  - {key}: {where}", file=sys.stderr)
    if unplaceable:
        print(f"{unplaceable} workload(s) of some regions have no target: `aiplane up` fails those regions' partitions.", file=sys.stderr)
        return 1
    return 0


def _plugins(args: argparse.Namespace) -> int:
    registry = Registry()
    for p in registry.plugins():
        state = ""
        if p.disabled_by == "AIPLANE_DISABLE_PLUGINS":
            state = "  DISABLED: AIPLANE_DISABLE_PLUGINS names it"
        elif p.disabled_by:
            state = f"  DISABLED: {p.disabled_by} does not name it"
        print(f"{p.name:14} {p.distribution or '-'}-{p.version or '-'}  {', '.join(p.hooks)}{state}")
        if p.components:
            print(f"{'':14} provides {', '.join(f'{kind} {name!r}' for kind, name in p.components)}")
    for b in registry.broken:
        print(f"{b.name:14} {b.distribution or '-'}-{b.version or '-'}  BROKEN: {b.error}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """The Dagster UI on the instance ``aiplane up`` records to, with the same deployment, until Ctrl-C."""
    from .ui import check_port, serve_ui

    deployment = load_deployment(args.deployment or None)
    check_port(args.host, args.port)  # before the instance is written: a refused command changes nothing
    dagster_home(deployment.home)
    open_instance(deployment.home, deployment.dagster.postgres)  # dagster.yaml as `up` writes it (telemetry off)
    env = {**os.environ, "AIPLANE_HOME": str(deployment.home)}
    if args.deployment:
        # The code server resolves it again: a path, made absolute, means the same file wherever it runs.
        env["AIPLANE_DEPLOYMENT"] = str(Path(args.deployment).resolve()) if Path(args.deployment).exists() else args.deployment
    return serve_ui(env, args.host, args.port, say=lambda line: print(line, flush=True))


def _text(flag: str, help: str, **kwargs) -> tuple[str, dict]:
    """A subcommand's option that takes a value (a string, empty unless given, unless ``kwargs`` say otherwise)."""
    return flag, {"default": "", "help": help, **kwargs}


def _switch(flag: str, help: str) -> tuple[str, dict]:
    return flag, {"action": "store_true", "help": help}


def _commands() -> list[tuple[str, Callable[[argparse.Namespace], int], str, list[tuple[str, dict]]]]:
    """Each subcommand: its name, what runs it, its help, its options."""
    no_wait = "fail at once if another aiplane run holds the home"
    return [
        ("check", _check, "check the deployment, pins, ports and model before anything runs", [
            _text("--train-target", "check training pinned to this deployment target"),
            _switch("--offline", "reach nothing outside this machine and ask nothing of its environment (no probes, keys or home)"),
        ]),
        ("up", up, "materialize what is missing or stale and show the result", [
            _text("--train-target", "pin training to this deployment target (placement still checks it)"),
            _switch("--force", "materialize every asset, even those up to date"),
            _text("--region", "only this region's partition (deployments with regions)"),
            _switch("--no-wait", no_wait + ", instead of waiting"),
        ]),
        ("plugins", _plugins, "list installed plugins and the components they provide", []),
        ("ui", _ui, "open the Dagster UI on the instance `up` records to (Ctrl-C stops it)", [
            _text("--host", "address to bind (default: loopback only)", default="127.0.0.1"),
            _text("--port", "port to serve on (default: 3000)", type=int, default=3000),
        ]),
        ("stop", stop, "stop the served endpoint (every region's, unless --region)", [
            _text("--region", "stop only this region's endpoint"),
        ]),
        ("rollback", rollback, "serve an earlier adapter on the endpoint (default: the one before)", [
            _text("--to", "the adapter's digest, or 12 or more of its first hex digits"),
            _text("--region", "the region whose endpoint to roll back (deployments with regions)"),
            _switch("--no-wait", no_wait),
        ]),
    ]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiplane", description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default=os.environ.get("AIPLANE_DEPLOYMENT", ""), help="deployment name or path (default: local)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also AIPLANE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help, options in _commands():
        command = sub.add_parser(name, help=help)
        for flag, kwargs in options:
            command.add_argument(flag, **kwargs)
        command.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``aiplane`` command; its exit status (a failure prints one message, no traceback unless ``--debug``)."""
    args = _parser().parse_args(argv)
    # Output(data_version=...) is how the assets version their data; Dagster's beta label is noise here.
    warnings.filterwarnings("ignore", message=".*data_version.*beta", category=Warning)
    with _signals() as received:
        try:
            return args.fn(args)
        except (AiplaneError, RunFailed) as exc:
            if debug_requested(args):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the machine's, not the input's: a full disk, a path this user may not write
            if debug_requested(args):
                raise
            print(f"error: {exc.strerror or exc}: {exc.filename or ''}. {os_advice(exc.errno)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            how = "terminated (SIGTERM)" if signal.SIGTERM in received() else "cancelled (Ctrl-C)"
            print(f"aiplane: {how}; the run in progress was stopped, its workloads with it.", file=sys.stderr)
            return 128 + (signal.SIGTERM if signal.SIGTERM in received() else signal.SIGINT)


@contextlib.contextmanager
def _signals() -> Iterator[Callable[[], set[int]]]:
    """SIGTERM stops a command as Ctrl-C does (cleanly: the run is stopped, its workloads with it), and says so.

    During a run Dagster maps SIGTERM onto its SIGINT handler, so the handler that
    ran cannot say which signal came; the interpreter's wakeup fd can: it gets the
    number of every signal a Python handler catches, whoever installed the handler.
    Yields a function that reads the signals received so far.
    """
    if threading.current_thread() is not threading.main_thread():
        yield set
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    seen: set[int] = set()

    def received() -> set[int]:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read, 64):
                seen.update(chunk)
        return seen

    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)


def console() -> NoReturn:
    """The ``aiplane`` command: :func:`main`, then out without the interpreter's teardown.

    After a chain, freeing every object of Dagster, pyarrow and SQLAlchemy one by one
    takes most of a second, spent after the answer is printed; ``exit_now`` still
    joins threads, runs ``atexit`` handlers and flushes the streams first.
    """
    exit_now(main())


if __name__ == "__main__":
    console()
