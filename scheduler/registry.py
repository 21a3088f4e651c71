"""Owns the MLflow side of the model: the registered model, candidates, the promotion gate, champion and rollback.

Registered model `registry.model_name` (default `smartnodule-nodule`) in the MLflow
registry at `settings.tracking_uri` (SQLite by default). Version 1 is the shipped
checkpoint, registered on first use and made `champion`. Each fine-tune run
registers a candidate version whose card names it `<base>+ft.<version>`, evaluates
it against the champion on a fixed set (the gate) and tags the version with the
figures. `promote` moves the alias `champion` (the old one becomes
`previous-champion`; the full history is the model tag `champion_history`),
`rollback` moves it back. `ChampionWatcher` gives each worker the champion's
`Detector`, switching between jobs when the alias moves.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from config.settings import Settings  # noqa: E402
from scheduler.fine_tune_contract import AdjudicatedCase, GateFigures  # noqa: E402

if TYPE_CHECKING:
    from inference.training.samples import ModelImages
    from inference.types import PreparedImage

log = structlog.get_logger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "champion_history"
SHIPPED_EXPERIMENT = "smartnodule-shipped"
ARTIFACT_DIR = "model"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, gate failed)."""


def client(settings: Settings):
    """An MlflowClient on the node's tracking/registry URI (the SQLite file's folder is created)."""
    from mlflow.tracking import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client, settings: Settings, name: str | None = None) -> str:
    name = name or settings.registry.experiment
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow_client.create_experiment(name, artifact_location=(settings.artifact_root / name).as_uri())
    except Exception:  # created meanwhile by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def shipped_card(settings: Settings) -> Path:
    from inference.predictor import DEFAULT_CARD

    return Path(settings.model.card or DEFAULT_CARD)


def _history(mlflow_client, name: str) -> list[str]:
    tags = mlflow_client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def champion_version(mlflow_client, settings: Settings) -> str | None:
    """The version the alias `champion` points to, or None (no registered model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(settings.registry.model_name, CHAMPION).version)
    except MlflowException:
        return None


def ensure_registered(settings: Settings, mlflow_client=None) -> str:
    """Register the shipped checkpoint as version 1 and make it champion, once; returns the champion version."""
    from mlflow.exceptions import MlflowException

    mlflow_client = mlflow_client or client(settings)
    current = champion_version(mlflow_client, settings)
    if current is not None:
        return current
    name = settings.registry.model_name
    try:
        mlflow_client.create_registered_model(name, description="SmartNodule nodule model (champion serves)")
    except MlflowException:
        current = champion_version(mlflow_client, settings)
        if current is not None:
            return current
    card_path = shipped_card(settings)
    from inference.model_card import load_card

    card = load_card(card_path)
    run = mlflow_client.create_run(experiment_id(mlflow_client, settings, SHIPPED_EXPERIMENT),
                                   run_name=f"{card.name}-{card.version}-shipped")
    run_id = run.info.run_id
    mlflow_client.log_artifact(run_id, str(card_path), ARTIFACT_DIR)
    mlflow_client.log_artifact(run_id, str(card_path.parent / card.weights_file), ARTIFACT_DIR)
    for ref in ("drift_reference.npz", *card.companion_files):
        if (card_path.parent / ref).is_file():
            mlflow_client.log_artifact(run_id, str(card_path.parent / ref), ARTIFACT_DIR)
    mlflow_client.set_tag(run_id, "card_version", card.version)
    mlflow_client.set_terminated(run_id)
    mv = mlflow_client.create_model_version(name, f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run_id,
                                            tags={"state": "ready", "shipped": "true", "card_version": card.version,
                                                  "gate": "shipped"})
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([str(mv.version)]))
    log.info("model_registered", version=mv.version, card_version=card.version, shipped=True)
    return str(mv.version)


def candidate_version_name(base_version: str, registry_version: str) -> str:
    """The card version of a fine-tuned candidate: `1.0.0+ft.7` (the base without any previous +suffix)."""
    return f"{base_version.split('+')[0]}+ft.{registry_version}"


def versions(settings: Settings, mlflow_client=None) -> list[dict]:
    """Every registered version with its tags and aliases, oldest first."""
    mlflow_client = mlflow_client or client(settings)
    found = mlflow_client.search_model_versions(f"name='{settings.registry.model_name}'")
    return sorted(({"version": str(v.version), "run_id": v.run_id, "aliases": list(v.aliases), "tags": dict(v.tags),
                    "source": v.source} for v in found), key=lambda v: int(v["version"]))


def promote(settings: Settings, version: str, *, approved_by: str, force: bool = False,
            mlflow_client=None) -> str | None:
    """Make `version` champion (the old one becomes previous-champion); returns the old champion version (None when
    there was none).

    Refused (RegistryError) unless the version is ready and passed the gate, or `force`.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = mlflow_client or client(settings)
    name = settings.registry.model_name
    try:
        mv = mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"version {version!r} of {name} does not exist") from None
    if mv.tags.get("state") != "ready":
        raise RegistryError(f"version {version} is not ready (state {mv.tags.get('state')!r})")
    if not force and mv.tags.get("gate") not in ("passed", "shipped"):
        raise RegistryError(f"version {version} did not pass the promotion gate ({mv.tags.get('gate_reasons', 'not evaluated')}); "
                            "use --force to promote it anyway")
    old = champion_version(mlflow_client, settings)
    if old == str(version):
        return old
    history = _history(mlflow_client, name)
    if old is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, old)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [str(version)]))
    mlflow_client.set_model_version_tag(name, str(version), "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    mlflow_client.set_model_version_tag(name, str(version), "promoted_by", approved_by)
    log.info("model_promoted", version=str(version), previous=old, approved_by=approved_by, forced=force)
    return old


def rollback(settings: Settings, mlflow_client=None) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from, to). History keeps every step."""
    mlflow_client = mlflow_client or client(settings)
    name = settings.registry.model_name
    current = champion_version(mlflow_client, settings)
    history = _history(mlflow_client, name) if current is not None else []
    if current is None or len(history) < 2:
        raise RegistryError("no previous champion to roll back to")
    history.pop()
    target = history[-1]
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    if len(history) >= 2:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, history[-2])
    else:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mlflow_client.set_model_version_tag(name, current, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log.info("model_rolled_back", version=current, to=target)
    return current, target


def download(settings: Settings, version: str, mlflow_client=None) -> Path:
    """Card path of registered `version`, downloaded once to `<data_dir>/models/<version>/`."""
    import mlflow.artifacts

    dest = settings.node.data_dir / "models" / str(version)
    if (dest / "card.json").is_file():
        return dest / "card.json"
    mlflow_client = mlflow_client or client(settings)
    mv = mlflow_client.get_model_version(settings.registry.model_name, str(version))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp),
                                                       tracking_uri=settings.tracking_uri))
        card = next(got.rglob("card.json"))
        os.replace(card.parent, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "card.json"


# --- the promotion gate -----------------------------------------------------------------------------------


def figures(probs: np.ndarray, labels: np.ndarray, threshold: float, n_phantoms: int) -> GateFigures:
    from inference.training.metrics import auc, ece

    probs, labels = np.asarray(probs, float), np.asarray(labels).astype(bool)
    pred = probs >= threshold
    sens = float(pred[labels].mean()) if labels.any() else float("nan")
    spec = float((~pred[~labels]).mean()) if (~labels).any() else float("nan")
    return GateFigures(auc(probs, labels), ece(probs, labels.astype(float)), sens, spec, float(threshold),
                       len(labels), n_phantoms, len(labels) - n_phantoms)


def verdict_image(case: AdjudicatedCase, images: ModelImages) -> PreparedImage:
    """An adjudicated case's spooled image as the model `images` describes reads it."""
    from pydicom import dcmread

    return images.read(dcmread(case.spool_path))


def gate_inputs(settings: Settings, spec: ModelImages, verdict_cases: Sequence[AdjudicatedCase]
                ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """The fixed evaluation set, read as the candidate reads images (`spec`): `eval_phantoms` test-split
    images of its training generator from `eval_start`, then the held-out verdict cases."""
    reg = settings.registry
    images, labels = [], []
    for i in range(reg.eval_start, reg.eval_start + reg.eval_phantoms):
        images.append(spec.sample("test", i)["image"][0].numpy())
        labels.append(i % 2 == 0)
    n_phantoms = len(images)
    for case in verdict_cases:
        images.append(verdict_image(case, spec).model_input)
        labels.append(case.nodule_present)
    return images, np.array(labels, bool), n_phantoms


def score(card_path: Path, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Calibrated probabilities of `images` (model inputs) by the carded Detector, and its threshold."""
    from inference.predictor import Detector
    from inference.types import PreparedImage

    detector = Detector.load(card_path, device="cpu")
    blank = np.zeros((1, 1), np.uint8)
    probs = [detector.probability(PreparedImage("", blank, x, None))[0] for x in images]
    return np.array(probs), detector.card.threshold


def gate(candidate: GateFigures, champion: GateFigures, settings: Settings) -> tuple[bool, list[str]]:
    """Whether the candidate is not worse than the champion beyond the tolerances; the reasons when not."""
    reg = settings.registry
    reasons = []
    if np.isfinite(champion.auc) and not candidate.auc >= champion.auc - reg.auc_tolerance:
        reasons.append(f"AUC {candidate.auc:.4f} < champion {champion.auc:.4f} - {reg.auc_tolerance}")
    if not candidate.ece <= champion.ece + reg.ece_tolerance:
        reasons.append(f"ECE {candidate.ece:.4f} > champion {champion.ece:.4f} + {reg.ece_tolerance}")
    if np.isfinite(champion.sensitivity) and not candidate.sensitivity >= champion.sensitivity - reg.sensitivity_tolerance:
        reasons.append(f"sensitivity {candidate.sensitivity:.4f} < champion {champion.sensitivity:.4f} - "
                       f"{reg.sensitivity_tolerance}")
    return not reasons, reasons


def evaluate_gate(settings: Settings, candidate_card: Path, champion_card: Path, verdict_cases: Sequence[AdjudicatedCase]
                  ) -> tuple[bool, list[str], GateFigures, GateFigures]:
    from inference.model_card import load_card
    from inference.training.samples import ModelImages

    spec = ModelImages.of(load_card(candidate_card), card_path=candidate_card)
    images, labels, n_ph = gate_inputs(settings, spec, verdict_cases)
    cand = figures(*_swap(score(candidate_card, images), labels), n_ph)
    champ = figures(*_swap(score(champion_card, images), labels), n_ph)
    passed, reasons = gate(cand, champ, settings)
    return passed, reasons, cand, champ


def _swap(scored: tuple[np.ndarray, float], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    probs, threshold = scored
    return probs, labels, threshold


def record_gate(settings: Settings, version: str, passed: bool, reasons: list[str], cand: GateFigures,
                champ: GateFigures, mlflow_client=None) -> None:
    from inference.training.metrics import json_safe

    mlflow_client = mlflow_client or client(settings)
    name = settings.registry.model_name
    mlflow_client.set_model_version_tag(name, version, "gate", "passed" if passed else "failed")
    mlflow_client.set_model_version_tag(name, version, "gate_reasons", "; ".join(reasons) or "none")
    mlflow_client.set_model_version_tag(name, version, "gate_candidate", json.dumps(json_safe(asdict(cand))))
    mlflow_client.set_model_version_tag(name, version, "gate_champion", json.dumps(json_safe(asdict(champ))))


# --- serving the champion -----------------------------------------------------------------------------------


class ChampionWatcher:
    """The champion's Detector for one worker, switched between jobs when the registry's alias moves.

    `current()` looks the alias up at most every `registry.watch_interval_s`; a new
    champion is downloaded to `<data_dir>/models/<version>/` and loaded with
    `Detector.load`. Before any fine-tuned candidate was promoted (no registry, or
    the champion is the shipped version) it is the shipped default Detector. A
    registry that cannot be read keeps the detector in service (logged).

    The node's workers call `current()` once per job, so a promotion or a
    rollback takes effect between jobs without a restart.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._version: str | None = None
        self._detector = None
        self._client = None

    def _load(self, card: Path | None):
        from inference.predictor import Detector

        return Detector.from_settings(self._settings.model, card)

    @property
    def version(self) -> str | None:
        """The registry version in service (None: the shipped default, registry not consulted yet)."""
        return self._version

    def current(self):
        with self._lock:
            now = time.monotonic()
            if self._detector is not None and now - self._checked_at < self._settings.registry.watch_interval_s:
                return self._detector
            self._checked_at = now
            try:
                if self._client is None:
                    self._client = client(self._settings)
                version = champion_version(self._client, self._settings)
                if version is not None and version != self._version:
                    mv = self._client.get_model_version(self._settings.registry.model_name, version)
                    card = None if mv.tags.get("shipped") == "true" else download(self._settings, version, self._client)
                    detector = self._load(card)
                    log.info("champion_loaded", version=version, model_version=detector.identity.version,
                             previous=self._version)
                    self._detector, self._version = detector, version
            except Exception as exc:
                log.error("champion_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            if self._detector is None:
                self._detector = self._load(None)
            return self._detector

