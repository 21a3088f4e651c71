"""`smartnodule eval` writes its report, figures and the ROC, reliability and risk-coverage plots, logs them to
MLflow with the run, prints AURC and confident false positives per family, and draws a progress bar only when asked."""
from __future__ import annotations

import json
from pathlib import Path

from inference.training import evaluate

PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_writes_plots_and_logs_them_to_mlflow(tmp_path: Path, capsys) -> None:
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    out = tmp_path / "report"
    assert evaluate.main(["--n", "2", "--robust-n", "0", "--ood-n", "0", "--latency-images", "0", "--threads", "1",
                          "--out", str(out), "--tracking-uri", uri, "--progress", "always"]) == 0
    captured = capsys.readouterr()
    assert "families: independent" in captured.err and "img" in captured.err  # the bar, on stderr
    assert "families: independent" not in captured.out
    lines = captured.out.splitlines()
    aurc_row = next(line for line in lines if line.startswith("AURC"))
    figures = json.loads(lines[-1])
    for family in ("training", "varied", "independent"):
        f = figures["families"][family]
        assert 0 <= f["aurc"] <= 1 and 0 <= f["confident_fp"] <= 1
        assert f"{f['aurc']:.3f} ({f['error_rate']:.3f})" in aurc_row
    assert any(line.startswith("confident FP (p>=0.9, no review)") for line in lines)

    plots = [out / f"{name}.png" for name in ("roc", "reliability", "risk_coverage")]
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG
        assert imread(plot).shape[0] > 200  # a real picture, not an empty file
    assert (out / "report.txt").read_text().count("AURC") >= 2
    assert json.loads((out / "figures.json").read_text())["families"].keys() == {"training", "varied", "independent"}

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(figures["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["independent_aurc"] == figures["families"]["independent"]["aurc"]
    assert "training_confident_fp" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"roc.png", "reliability.png", "risk_coverage.png", "report.txt", "figures.json"} <= logged
    back = Path(client.download_artifacts(run.info.run_id, "risk_coverage.png", str(tmp_path / "back")))
    assert back.read_bytes() == (out / "risk_coverage.png").read_bytes()
    # the experiment keeps its artifacts beside the database, not in the current folder
    assert (tmp_path / "ml" / "mlartifacts" / "smartnodule-eval").is_dir()


def test_no_bar_when_not_asked_and_not_a_terminal(tmp_path: Path, capsys) -> None:
    from inference.training import progress

    with progress.bar("auto", range(3), total=3, desc="quiet") as bar:  # pytest's stderr is not a terminal
        assert list(bar) == [0, 1, 2]
    with progress.bar("never", range(3), total=3, desc="off") as bar:
        list(bar)
    assert capsys.readouterr().err == ""
    with progress.bar("always", range(3), total=3, desc="loud") as bar:
        list(bar)
    assert "loud: 100%" in capsys.readouterr().err


def test_each_robustness_row_reads_its_own_perturbation() -> None:
    import argparse

    import numpy as np

    from inference.training import eval_report, options

    p = argparse.ArgumentParser()
    options.evaluate(p)
    args = p.parse_args(["--n", "2", "--robust-n", "2", "--ood-n", "0"])
    rows = {s.name: list(s.items) for s in evaluate.sources(args, 256) if s.section == "robustness"}
    assert list(rows) == list(eval_report.PERTURBATIONS)
    plain = list(eval_report.family_cases("independent", 2, 256))
    for name, cases in rows.items():
        expected = [eval_report.PERTURBATIONS[name](c) for c in plain]
        assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(cases, expected)), name
    assert not np.array_equal(rows["none"][0].pixels, rows["rotate +15 deg"][0].pixels)
    from inference.training import eval_family as ef

    assert "PixelSpacing" in ef.case_dataset(rows["none"][0])
    stripped = ef.case_dataset(rows["no spacing tags"][0])
    assert "PixelSpacing" not in stripped and "ImagerPixelSpacing" not in stripped
