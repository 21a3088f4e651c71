"""The scheduler's subcommands of the `smartnodule` CLI: scheduler, job NAME, model rollback / promote / list.

`node/cli.py` calls `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
import threading
from pathlib import Path

from config.settings import CONFIG_HELP


def register(subparsers) -> None:
    p = subparsers.add_parser("scheduler", help="run the scheduled jobs alone (drift, retraining, housekeeping)")
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    p.set_defaults(func=cmd_scheduler)

    p = subparsers.add_parser("job", help="run one scheduled job now and print its summary")
    p.add_argument("name", metavar="JOB", help="a job named in the [scheduler] section (drift, reindex, ...); checked when "
                                               "the command runs, so building the parser loads no job code")
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--force", action="store_true", help="retrain: fine-tune even without enough new verdicts")
    p.set_defaults(func=cmd_job)

    p = subparsers.add_parser("model", help="the model registry: list, promote VERSION, rollback")
    model = p.add_subparsers(dest="model_command", required=True, metavar="ACTION", help="one of the actions below")
    q = model.add_parser("list", help="registered versions with their gate figures")
    q.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    q.set_defaults(func=cmd_model_list)
    q = model.add_parser("promote", help="make VERSION the champion (administrator approval)")
    q.add_argument("version", metavar="VERSION", help="a registered version (`smartnodule model list`)")
    q.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    q.add_argument("--force", action="store_true", help="promote even though the gate failed")
    q.set_defaults(func=cmd_model_promote)
    q = model.add_parser("rollback", help="move the champion back to the previous champion")
    q.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    q.set_defaults(func=cmd_model_rollback)


def _open(config: Path | None, *, create: bool = False):
    """node.command_setup.open_for_command, imported when a command runs (building the parser loads no database)."""
    from node.command_setup import open_for_command

    return open_for_command(config, create=create)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from node.metrics import serve_metrics
    from scheduler.service import Scheduler

    settings, sessions = _open(args.config, create=True)
    scheduler = Scheduler(settings, sessions)
    serve_metrics(settings, sessions)  # [metrics] port; ends with the process
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.start()
    for name, when in scheduler.jobs().items():
        print(f"{name}\tnext run {when}")
    stop.wait()
    scheduler.stop()
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from node.store.runs import RunOutcome
    from scheduler.tasks import JOBS
    from scheduler.service import run_job

    if args.name not in JOBS:
        print(f"error: job must be one of {', '.join(sorted(JOBS))}, got {args.name!r}", file=sys.stderr)
        return 2
    settings, sessions = _open(args.config)
    kwargs = {"force": True} if args.force and args.name == "retrain" else {}
    run = run_job(settings, sessions, args.name, trigger="manual", **kwargs)
    print(json.dumps({"job": run.job, "outcome": run.outcome.value, "summary": json.loads(run.summary or "{}")},
                     indent=2, default=str))
    return {RunOutcome.OK: 0, RunOutcome.BREACH: 1}.get(run.outcome, 2)


def cmd_model_list(args: argparse.Namespace) -> int:
    from scheduler import registry

    settings, _ = _open(args.config)
    champion = registry.champion_version(registry.client(settings), settings)
    for v in registry.versions(settings):
        tags = v["tags"]
        mark = "*" if v["version"] == champion else " "
        print(f"{mark} {v['version']}\t{tags.get('card_version', '?')}\tgate {tags.get('gate', '?')}\t"
              f"{tags.get('gate_reasons', '')}\trun {v['run_id']}")
    return 0


def cmd_model_promote(args: argparse.Namespace) -> int:
    from scheduler import registry

    settings, _ = _open(args.config)
    try:
        old = registry.promote(settings, args.version, approved_by=getpass.getuser(), force=args.force)
    except registry.RegistryError as exc:
        print(f"error: {exc}")
        return 2
    print(f"champion: {old} -> {args.version}; running nodes switch within {settings.registry.watch_interval_s:g} s")
    return 0


def cmd_model_rollback(args: argparse.Namespace) -> int:
    from scheduler import registry

    settings, _ = _open(args.config)
    try:
        old, new = registry.rollback(settings)
    except registry.RegistryError as exc:
        print(f"error: {exc}")
        return 2
    print(f"champion: {old} -> {new} (rolled back)")
    return 0
