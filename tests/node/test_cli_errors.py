"""Bad input to the `smartnodule` command is one line naming the setting or argument, exit status 2, no traceback
(issue #15): a missing or unreachable database, an environment variable that is not JSON, a schedule or time zone
APScheduler would refuse, an unknown job state. And every argument of every subcommand has a help text.

The commands run as an administrator runs them: a fresh interpreter (`python -m node.cli`), in an empty folder
(no data folder there), with the environment cleared of SMARTNODULE_* variables.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import load_settings
from node.cli import build_parser
from node.orthanc_peer import free_port
from node.store.db import open_database

ROOT = Path(__file__).resolve().parents[2]


def smartnodule(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMARTNODULE_")}
    environment.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single line the command wrote, after checking the exit status and that nothing else was written."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", [["jobs"], ["resend", "42"], ["user", "list"], ["user", "disable", "rita"],
                                     ["job", "drift"], ["model", "list"]])
def test_a_command_outside_a_data_folder_names_the_database_and_creates_nothing(tmp_path, command):
    line = one_error_line(smartnodule(*command, cwd=tmp_path))
    database = tmp_path / "var" / "smartnodule.db"
    assert line == (f'error: database sqlite:///{database} not found (run "smartnodule run" once, '
                    f'or set node.data_dir or node.database_url)')
    assert list(tmp_path.iterdir()) == []  # no empty database, no log folder, no audit key left behind


def test_an_unreachable_database_server_is_one_line_without_its_password(tmp_path):
    url = f"postgresql+psycopg://smartnodule:hunter2hunter2@127.0.0.1:{free_port()}/smartnodule"
    line = one_error_line(smartnodule("jobs", cwd=tmp_path, SMARTNODULE_NODE__DATABASE_URL=url))
    assert line.startswith(f"error: database {url.replace('hunter2hunter2', '***')} cannot be reached (")
    assert "node.database_url" in line and "hunter2" not in line


def test_a_list_in_the_environment_that_is_not_json_names_the_variable(tmp_path):
    line = one_error_line(smartnodule("check-config", str(ROOT / "config" / "node.toml"), cwd=tmp_path,
                                      SMARTNODULE_NODE__ALLOWED_CALLING_AETS="ORTHANC,STORESCU"))
    assert line.startswith("error: environment variable SMARTNODULE_NODE__ALLOWED_CALLING_AETS "
                           "(setting node.allowed_calling_aets) is not JSON (")
    assert 'write lists and tables as JSON, e.g. ["A", "B"]' in line


def test_a_bad_value_from_the_environment_names_setting_and_variable(tmp_path):
    line = one_error_line(smartnodule("check-config", str(ROOT / "config" / "node.toml"), cwd=tmp_path,
                                      SMARTNODULE_NODE__PORT="eleven"))
    assert "node.port: Input should be a valid integer" in line
    assert line.endswith("(got 'eleven') [from environment variable SMARTNODULE_NODE__PORT]")


@pytest.mark.parametrize("setting, value, problem", [
    ("drift", "99 99 * * *", "'99 99 * * *' is not a schedule (Error validating expression '99': the last value (99) "
                             "is higher than the maximum value (23))"),
    ("retrain", "nightly", "'nightly' is not a schedule (Wrong number of fields; got 1, expected 5)"),
    ("timezone", "Europe/Nowhere", "'Europe/Nowhere' is not a known time zone"),
])
def test_check_config_refuses_what_the_scheduler_would_refuse_at_start(tmp_path, setting, value, problem):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n'
                      f'[scheduler]\n{setting} = "{value}"\n')
    line = one_error_line(smartnodule("check-config", str(config), cwd=tmp_path))
    assert line.startswith(f"error: invalid settings in {config}: scheduler.{setting}: {problem}")
    # the same settings stop the node, and the scheduler role, before anything starts
    assert one_error_line(smartnodule("scheduler", "--config", str(config), cwd=tmp_path)) == line
    assert not (tmp_path / "var").exists()


def test_jobs_takes_only_known_states(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\naccept_any_calling_ae = true\n')
    open_database(load_settings(config).database_url)
    done = smartnodule("jobs", "--config", str(config), "--state", "bogus", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.splitlines()[-1] == (
        "smartnodule jobs: error: argument --state: invalid choice: 'BOGUS' (choose from 'RECEIVED', 'RUNNING', "
        "'ENCODED', 'DELIVERING', 'SENT', 'SKIPPED', 'REJECTED', 'FAILED', 'FAILED_DELIVERY')")
    done = smartnodule("jobs", "--config", str(config), "--state", "failed_delivery", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _actions(subparser, f"{path} {name}")


def test_every_argument_of_every_subcommand_has_help():
    missing = []
    for path, action in _actions(build_parser(), "smartnodule"):
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            missing += [f"{path} {name} (the command itself)" for name in action.choices if not listed.get(name)]
    assert missing == []
    assert sum(1 for _ in _actions(build_parser(), "smartnodule")) > 100  # the walk reached the subcommands
