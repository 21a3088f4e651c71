"""The `smartnodule` command line: run the node, check settings, send files, re-send results, the demo."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import structlog

from config.settings import CONFIG_HELP, SettingsError, load_settings
from node.store.states import JobState

log = structlog.get_logger(__name__)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


# What each way of running the node starts (node.service.Node's switches). The scale-out roles never serve the web
# app (that is `smartnodule web`, whatever web.enabled says) nor send alerts (the web role does, once).
ROLES = {"run": dict(),
         "scp": dict(workers=0, deliver=False, scheduler=False, web=False, alerts=False),
         "worker": dict(scp=False, scheduler=False, web=False, alerts=False)}


def cmd_run(args: argparse.Namespace) -> int:
    from node.audit import configure_logging
    from node.service import Node

    settings = load_settings(args.config)
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    roles = dict(ROLES[args.command])
    if args.command == "run" and args.workers is not None:
        roles["workers"] = args.workers
    node = Node(settings, **roles)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    stop.wait()
    node.stop()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(f"{args.file}: OK (AE {settings.node.ae_title} on {settings.node.host}:{settings.node.port}, "
          f"{len(settings.destinations)} destination(s), database {settings.database_url.split('://')[0]})")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from node.scu import AssociationFailed, send_files

    paths = [p for item in args.files for p in (sorted(Path(item).rglob("*.dcm")) if Path(item).is_dir() else [Path(item)])]
    host, port = args.to
    try:
        results = send_files(paths, host=host, port=port, called_aet=args.called_aet, calling_aet=args.calling_aet)
    except AssociationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        status = "none" if result.status is None else f"0x{result.status:04X}"
        print(f"{result.path}\t{status}\t{result.comment}")
    return 0 if all(r.stored for r in results) else 1


def cmd_resend(args: argparse.Namespace) -> int:
    import getpass

    from node.command_setup import open_for_command
    from node.store.jobs import TransitionError, requeue_delivery

    _, sessions = open_for_command(args.config)
    try:
        previous = requeue_delivery(sessions, args.job)
    except TransitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("delivery_requeued", job_id=args.job, previous_state=previous.value, actor=getpass.getuser(), via="cli")
    print(f"job {args.job}: {previous.value} -> ENCODED; a running node delivers it now")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from node.store.db import Job, open_database

    settings = load_settings(args.config)
    with open_database(settings.database_url, must_exist=True)() as session:
        query = select(Job).order_by(Job.id.desc()).limit(args.limit)
        if args.state:
            query = query.where(Job.state == JobState(args.state))
        for job in session.scalars(query):
            probability = "" if job.probability is None else f"{job.probability:.3f}"
            print(f"{job.id}\t{job.state.value}\t{job.calling_aet}\t{job.sop_instance_uid}\t{probability}\t{job.reason or ''}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(count=args.count, size=args.size, keep_running=args.keep_running)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from node.audit import AUDIT_FILE, key_path, read_key, verify_chain

    settings = load_settings(args.config)
    path = args.file or settings.log_dir / AUDIT_FILE
    key_file = args.key_file or key_path(settings.audit, settings.node.data_dir)
    if not key_file.is_file():
        print(f"error: audit key {key_file} does not exist (set audit.key_file, or --key-file)", file=sys.stderr)
        return 2
    check = verify_chain(path, read_key(key_file), accept_legacy_prefix=args.accept_legacy_prefix)
    if check.intact:
        before = f" ({check.legacy} written before the keyed chain, not verified)" if check.legacy else ""
        checkpoint = f", checkpoint at record {check.checkpoint}" if check.checkpoint else ""
        print(f"{path}: {check.records} records{before}, chain intact{checkpoint}")
        return 0
    print(f"{path}: chain broken at line {check.broken_at}: {check.problem}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartnodule", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND -h: its options)")

    for name, help_text in (("run", "run receiver, workers and delivery in one process"),
                            ("scp", "run the Storage SCP alone (scale-out role)"),
                            ("worker", "run pipeline and delivery workers alone (scale-out role)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
        if name == "run":
            p.add_argument("--workers", type=int, default=None, help="override worker.count")
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a settings file (and the SMARTNODULE_* environment)")
    p.add_argument("file", type=Path, help="the settings file (TOML), e.g. config/node.toml")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("send", help="C-STORE DICOM files (or folders of .dcm) to a peer")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files, or folders searched for *.dcm")
    p.add_argument("--to", type=_host_port, required=True, metavar="HOST:PORT", help="the peer's address and port")
    p.add_argument("--called-aet", required=True, help="the peer's AE title")
    p.add_argument("--calling-aet", default="SMARTNODULE_SCU", help="our AE title (default: %(default)s)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("resend", help="deliver a job's results again (after FAILED_DELIVERY)")
    p.add_argument("job", type=int, metavar="JOB", help="the job id (first column of `smartnodule jobs`)")
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("jobs", help="list recent jobs")
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    p.add_argument("--state", type=str.upper, choices=[state.value for state in JobState], default=None,
                   metavar="STATE", help=f"only jobs in this state: {', '.join(state.value for state in JobState)}")
    p.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default: %(default)s)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("audit", help="the audit log: verify its keyed chain and checkpoint")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of the actions below")
    q = actions.add_parser("verify", help="recompute the chain; exit status 1 names the first broken line")
    q.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    q.add_argument("--file", type=Path, default=None, help="an audit file (default: the node's)")
    q.add_argument("--key-file", type=Path, default=None, help="its HMAC key (default: the node's audit.key_file)")
    q.add_argument("--accept-legacy-prefix", action="store_true",
                   help="accept lines without a keyed link at the head of the file (a log begun before the keyed "
                        "chain); they are counted, not verified")
    q.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("demo", help="phantom chest X-rays through the node and a local Orthanc")
    p.add_argument("--count", type=int, default=4, help="phantoms to push (default: %(default)s)")
    p.add_argument("--size", type=int, default=2048, help="their width and height in pixels (default: %(default)s)")
    p.add_argument("--keep-running", action="store_true",
                   help="after the table, keep node, Orthanc and review page running until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    from inference.commands import register as register_inference
    from review_web.commands import register as register_web
    from scheduler.commands import register as register_scheduler

    register_inference(sub)
    register_web(sub)
    register_scheduler(sub)
    return parser


# What the node writes is its own and its group's: folders 0750, files 0640 (the SQLite database 0600, node.db).
PRIVATE_UMASK = 0o027


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
