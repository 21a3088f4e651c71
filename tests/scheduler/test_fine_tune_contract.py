"""The retrain <-> fine-tune child contract: manifest and result round-trip through their JSON files, a malformed
manifest is refused naming the field (in the child too: one line, exit 2), and the child's progress reaches the
log while the child still runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import structlog

from scheduler.fine_tune_contract import (AdjudicatedCase, ContractError, FineTuneManifest, FineTuneResult, GateFigures,
                                          Progress)
from scheduler.tasks import REPO_ROOT, stream_child


def _manifest(make_settings, tmp_path: Path) -> FineTuneManifest:
    cases = (AdjudicatedCase(job_id=1, sop_instance_uid="1.2.826.0.1.1", spool_path=tmp_path / "a.dcm",
                             nodule_present=True, location=(120.5, 88.0), heldout=False, verdict_id=7),
             AdjudicatedCase(job_id=2, sop_instance_uid="1.2.826.0.1.2", spool_path=tmp_path / "b.dcm",
                             nodule_present=False, location=None, heldout=True, verdict_id=9))
    return FineTuneManifest.create("test", settings=make_settings(registry={"fine_tune_steps": 3}),
                                   champion_card=tmp_path / "card.json", champion_version="1", cases=cases,
                                   verdict_watermark=9, result_path=tmp_path / "result.json", steps=2, lr=0.01)


def test_manifest_and_result_round_trip(make_settings, tmp_path: Path) -> None:
    manifest = _manifest(make_settings, tmp_path)
    back = FineTuneManifest.read(manifest.write(tmp_path / "manifest.json"))
    assert back == manifest
    assert back.cases[0].location == (120.5, 88.0) and back.cases[1].heldout is True
    assert back.settings.registry.fine_tune_steps == 3 and back.steps == 2 and back.batch is None

    nan = GateFigures(float("nan"), 0.1, 1.0, 0.5, 0.3, 4, 4, 0)
    result = FineTuneResult(run_id="abc", registry_version="2", card_version="1.0.0+ft.2", gate_passed=False,
                            gate_reasons=("AUC 0.5 < champion 0.9 - 0.02",), candidate=nan,
                            champion=GateFigures(0.9, 0.05, 0.9, 0.8, 0.4, 6, 4, 2), data_fingerprint="f" * 64,
                            train_cases=1, heldout_cases=1, phantoms=2, steps=2, train_seconds=1.5, gate_seconds=2.0,
                            total_seconds=4.0, finished_at=1.7e9)
    again = FineTuneResult.read(result.write(tmp_path / "result.json"))
    assert math.isnan(again.candidate.auc) and again.champion == result.champion
    assert again.gate_reasons == result.gate_reasons
    summary = again.summary()
    assert summary["candidate"]["auc"] is None and json.loads(json.dumps(summary)) == summary  # strict JSON


def test_a_malformed_manifest_is_refused_naming_the_field(make_settings, tmp_path: Path) -> None:
    manifest = _manifest(make_settings, tmp_path)
    data = json.loads(manifest.model_dump_json())
    del data["cases"][1]["spool_path"]
    data["cases"][0]["nodule_present"] = "yes"
    data["stepz"] = 4
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError) as err:
        FineTuneManifest.read(path)
    text = str(err.value)
    assert "cases.1.spool_path: Field required" in text
    assert "cases.0.nodule_present: Input should be a valid boolean" in text
    assert "stepz: Extra inputs are not permitted" in text
    assert "1.2.826.0.1.1" not in text and "yes" not in text  # names the field, never the value

    with pytest.raises(ContractError, match="lr: Input should be greater than 0"):
        FineTuneManifest.create("overrides", **{**dict(manifest), "lr": -1.0})
    with pytest.raises(ContractError, match="cannot be read"):
        FineTuneResult.read(tmp_path / "missing.json")

    # the child answers with one line naming the field, no traceback
    child = subprocess.run([sys.executable, "-m", "scheduler.fine_tune", str(path)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 2
    assert child.stderr.strip().splitlines() == [f"error: {text}"]


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from scheduler.fine_tune_contract import Progress
    print("starting", flush=True)
    print(Progress(phase="train", done=1, total=2, loss=0.25, elapsed_s=0.1, eta_s=0.1, at=time.time()).line(), flush=True)
    print("some warning", file=sys.stderr, flush=True)
    go_on = Path(sys.argv[1])
    deadline = time.time() + 60
    while not go_on.exists():  # the parent's test creates it once it has seen the progress event in the log
        if time.time() > deadline:
            sys.exit(3)
        time.sleep(0.05)
    print(Progress(phase="train", done=2, total=2, loss=0.125, elapsed_s=0.2, at=time.time()).line(), flush=True)
""")


def test_progress_is_logged_while_the_child_runs(tmp_path: Path) -> None:
    go_on = tmp_path / "go-on"
    with structlog.testing.capture_logs() as events:
        def release_when_logged() -> None:
            for _ in range(1200):
                if any(e["event"] == "retrain_progress" for e in events):
                    go_on.touch()
                    return
                threading.Event().wait(0.05)

        watcher = threading.Thread(target=release_when_logged, daemon=True)
        watcher.start()
        # a buffering parent would log nothing until the child ends, and the child never ends (exit 3) without it
        stream_child(["-c", CHILD, str(go_on)], tmp_path / "child.log", timeout_s=120)
        watcher.join()
    progress = [e for e in events if e["event"] == "retrain_progress"]
    assert [(e["phase"], e["done"], e["total"], e["loss"]) for e in progress] == [("train", 1, 2, 0.25), ("train", 2, 2, 0.125)]
    logged = (tmp_path / "child.log").read_text()
    assert "starting" in logged and "some warning" in logged


def test_a_failing_or_hanging_child_is_an_error_with_its_last_line(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"fine-tune exited 4: ValueError: broken"):
        stream_child(["-c", "import sys; print('ValueError: broken', file=sys.stderr); sys.exit(4)"],
                     tmp_path / "a.log", timeout_s=60)
    with pytest.raises(RuntimeError, match="killed after registry.fine_tune_timeout_s = 1 s"):
        stream_child(["-c", "import time; time.sleep(60)"], tmp_path / "b.log", timeout_s=1)


def test_progress_lines_parse_and_other_lines_are_not_progress() -> None:
    step = Progress(phase="data", done=3, total=10, elapsed_s=1.0, eta_s=2.3, at=1.0)
    assert Progress.parse(step.line()) == step
    assert Progress.parse("Registered model 'x'") is None and Progress.parse('{"other": 1}') is None
    with pytest.raises(ContractError, match="done: Input should be greater than or equal to 0"):
        Progress.parse('{"progress": {"phase": "x", "done": -1, "total": 1, "elapsed_s": 0, "at": 1}}')
