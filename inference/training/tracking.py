"""Owns logging a training or evaluation run to MLflow: parameters, finite metrics and files as artifacts.

`smartnodule train` and `smartnodule eval` log here when given a tracking URI (`--tracking-uri`, or
`MLFLOW_TRACKING_URI`). A new experiment on a `sqlite:///` URI keeps its artifacts beside the
database, in `mlartifacts/<experiment>` (the node's own layout, `Settings.artifact_root`), never in
the current folder.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(given: str | None) -> str | None:
    """The URI to log to: `given`, else $MLFLOW_TRACKING_URI, else None (nothing is logged)."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or None


def _experiment(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        location = (db.parent.resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def log_run(uri: str, experiment: str, run_name: str, params: dict, metrics: dict[str, float],
            files: Sequence[Path] = (), folder: Path | None = None) -> str:
    """One finished MLflow run with `params` (as text), the finite `metrics`, `files` and every file of `folder`
    as artifacts; returns its run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(_experiment(client, uri, experiment), run_name=run_name)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    try:
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                         metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])
        for path in files:
            client.log_artifact(run_id, str(path))
        if folder is not None:
            client.log_artifacts(run_id, str(folder))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
