"""The `smartnodule` command line: run the node, check settings, send files, re-send results, the demo."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TypedDict

import structlog

from config.settings import CONFIG_HELP, SettingsError, load_settings
from node.store.states import JobState

log = structlog.get_logger(__name__)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class NodeParts(TypedDict, total=False):
    """node.service.Node's switches: what one way of running the node starts."""

    scp: bool
    workers: int | None
    deliver: bool
    scheduler: bool
    web: bool
    alerts: bool


# The scale-out roles never serve the web app (that is `smartnodule web`, whatever web.enabled says) nor send
# alerts (the web role does, once).
ROLES: dict[str, NodeParts] = {"run": NodeParts(),
                               "scp": NodeParts(workers=0, deliver=False, scheduler=False, web=False, alerts=False),
                               "worker": NodeParts(scp=False, scheduler=False, web=False, alerts=False)}


def cmd_run(args: argparse.Namespace) -> int:
    from node.audit import configure_logging
    from node.service import Node

    settings = load_settings(args.config)
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    roles = ROLES[args.command].copy()
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


def cmd_backup(args: argparse.Namespace) -> int:
    from node.audit import configure_logging

    settings = load_settings(args.config)
    if not settings.node.data_dir.is_dir():
        print(f"error: node.data_dir {settings.node.data_dir} does not exist: nothing to back up", file=sys.stderr)
        return 2
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    return 0 if _backup(settings, args.to) else 2


def _backup(settings, to: Path | None, failed: str = ""):
    """`node.store.backup.backup` into `to` (default: the backup folder), printed; None (error printed) on failure."""
    from node.store.backup import BackupError, backup

    try:
        manifest = backup(settings, to or settings.backup_dir)
    except BackupError as exc:
        print(f"error: {exc}{failed}", file=sys.stderr)
        return None
    print(f"backup written: {manifest.path}")
    print(f"  {manifest.size_bytes / 1e6:.1f} MB, {manifest.files} files, {manifest.database} database at schema "
          f"revision {manifest.schema_revision or '(none)'}")
    print(f"  {'part':<16}{'files':>8}{'MB':>12}")
    for part in manifest.parts:
        print(f"  {part.name:<16}{part.files:>8}{part.bytes / 1e6:>12.1f}")
    for line in manifest.skipped:
        print(f"  not included: {line}")
    return manifest


def cmd_restore(args: argparse.Namespace) -> int:
    from node.audit import AUDIT_FILE, configure_logging, key_path, read_key, verify_chain
    from node.store.backup import BackupError, restore

    settings = load_settings(args.config)
    try:
        report = restore(args.archive, settings, force=args.force)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"restored {args.archive} (taken {report.manifest.created_at}) into {settings.node.data_dir}: "
          f"{report.files} files, {report.bytes / 1e6:.1f} MB; schema revision {report.schema_from or '(none)'}"
          f"{'' if report.schema_from == report.schema_to else f' migrated to {report.schema_to}'}")
    # The audit key is not in the archive (node.store.backup): without the key that signed the log, the node
    # would make a new one at start and every line after would break the chain. Say so before anything appends.
    key_file, audit_file = key_path(settings.audit, settings.node.data_dir), settings.log_dir / AUDIT_FILE
    if not key_file.is_file():
        print(f"warning: the audit key {key_file} is missing: put the key file back from where you keep it before "
              "starting the node (a new key would break the audit chain)", file=sys.stderr)
        return 1
    check = verify_chain(audit_file, read_key(key_file)) if audit_file.is_file() else None
    if check is not None and not check.intact:
        print(f"warning: {audit_file}: chain broken at line {check.broken_at} with the key {key_file} ({check.problem}): "
              "is it the key that signed this log?", file=sys.stderr)
        return 1
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    log.info("backup_restored", archive=str(args.archive), files=report.files, schema_from=report.schema_from,
             schema_to=report.schema_to)
    if check is not None:
        print(f"audit log: {check.records} records, chain intact with {key_file}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from node.audit import configure_logging
    from node.store.db import SchemaBehind, make_engine, migrate

    settings = load_settings(args.config)
    settings.node.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    try:
        try:
            found, head = migrate(engine)
        except SchemaBehind as behind:
            print(f"database at schema revision {behind.found}, this version needs {behind.head}"
                  f"{': backing up first' if not args.skip_backup else ''}")
        else:
            print(f"database at schema revision {head}: {'created' if found is None else 'nothing to migrate'}")
            return 0
        configure_logging(settings.log_dir, audit_settings=settings.audit)
        archive = None
        if not args.skip_backup:
            manifest = _backup(settings, args.to, "; nothing was migrated")
            if manifest is None:
                return 2
            archive = str(manifest.path)
        found, head = migrate(engine, upgrade=True)
    finally:
        engine.dispose()
    log.info("database_migrated", schema_from=found, schema_to=head, backup=archive)
    print(f"database migrated: schema revision {found} -> {head}")
    return 0


def _register_backup(sub) -> None:
    """The backup, restore and migrate subcommands (node.store.backup, node.store.db.migrate)."""
    config_help = "settings file (default: config/node.toml)"
    p = sub.add_parser("backup", help="archive everything the node holds (database, spool, results, audit log, index, "
                                      "MLflow store) into one file, while it runs")
    p.add_argument("--config", type=Path, default=None, help=config_help)
    p.add_argument("--to", type=Path, default=None, metavar="DIR",
                   help="folder for the archive (default: scheduler.backup_dir, else <data_dir>/backups)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="put a node back from a backup archive (checked before anything is written), "
                                       "then migrate its database; exit status 1: restored, but the audit key is "
                                       "missing or does not verify the restored chain")
    p.add_argument("archive", type=Path, metavar="ARCHIVE", help="a smartnodule-backup-*.tar file")
    p.add_argument("--config", type=Path, default=None, help=config_help)
    p.add_argument("--force", action="store_true",
                   help="replace a data folder or database that is not empty (refused while the node's port answers)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("migrate", help="back up, then bring the database schema to this version (after an upgrade)")
    p.add_argument("--config", type=Path, default=None, help=config_help)
    p.add_argument("--to", type=Path, default=None, metavar="DIR",
                   help="folder for the backup taken first (default: scheduler.backup_dir, else <data_dir>/backups)")
    p.add_argument("--skip-backup", action="store_true",
                   help="migrate without the backup (only when you took one yourself, e.g. with the database "
                        "server's tools)")
    p.set_defaults(func=cmd_migrate)


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

    _register_backup(sub)

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
