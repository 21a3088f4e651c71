"""Owns the contract between the scheduled retrain and its fine-tune child: what goes in, what comes back, progress.

`scheduler.tasks.retrain` writes a `FineTuneManifest` (the node's settings, the
champion, the adjudicated cases, the knobs of this run) to a JSON file and starts
`python -m scheduler.fine_tune MANIFEST`. The child reads it back validated,
prints one `Progress` JSON line on stdout per step of its work (the parent logs
each as a `retrain_progress` event as it arrives), and writes its
`FineTuneResult` to the manifest's `result_path` (temporary file, fsync, rename)
before it exits 0: the result is a file, never the last line of a stream.

All three are frozen pydantic models, strict on both sides: a missing, unknown
or mistyped field is refused on read with a `ContractError` that names the file
and the field, never the value (cases carry SOP Instance UIDs and spool paths).
Nothing here imports torch or MLflow.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from config.settings import Settings

PHANTOM_SEED_INDEX0 = 50_000_000  # train-split indices far beyond any training run's (train.py uses 0..fresh)


class ContractError(ValueError):
    """A manifest, result or progress line that does not follow the contract (names the file and the field)."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, ser_json_inf_nan="constants")

    @classmethod
    def create(cls, source: str, **fields) -> Self:
        """Validated construction in Python; ContractError naming `source` and the wrong field."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ContractError(_describe(cls.__name__, source, exc)) from None

    @classmethod
    def from_json(cls, text: str, source: str) -> Self:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ContractError(_describe(cls.__name__, source, exc)) from None

    @classmethod
    def read(cls, path: Path) -> Self:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ContractError(f"{cls.__name__} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        return cls.from_json(text, str(path))

    def write(self, path: Path) -> Path:
        """Durably: a temporary file beside `path`, fsync, rename, fsync of the folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.model_dump_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return path


def _describe(kind: str, source: str, exc: ValidationError) -> str:
    """One line per wrong field: where and what, without the value."""
    wrong = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
    return f"{kind} {source}: {wrong}"


@dataclass(frozen=True, config=ConfigDict(ser_json_inf_nan="constants"))
class GateFigures:
    """A model's figures on the promotion gate's evaluation set (probabilities from the serving path);
    computed by `scheduler.registry.figures`."""

    auc: float
    ece: float
    sensitivity: float
    specificity: float
    threshold: float
    n: int
    n_phantoms: int
    n_verdicts: int


class AdjudicatedCase(_Record):
    """A processed job with a final expert verdict: its spool file, the label, the mean click, the held-out flag."""

    job_id: int
    sop_instance_uid: str = Field(min_length=1)
    spool_path: Path
    nodule_present: bool
    location: tuple[float, float] | None  # (row, col) in source pixels; only on positives
    heldout: bool  # for the promotion gate, never for training
    verdict_id: int = Field(ge=0)  # the newest verdict of the job (the watermark of the run)


class FineTuneManifest(_Record):
    """What the fine-tune child is asked to do. `None` knobs take the node's `[registry]` setting."""

    settings: Settings
    champion_card: Path
    champion_version: str = Field(min_length=1)
    cases: tuple[AdjudicatedCase, ...]
    verdict_watermark: int = Field(ge=0)
    result_path: Path
    threads: int = Field(default=1, ge=1)
    steps: int | None = Field(default=None, ge=0)
    batch: int | None = Field(default=None, ge=2)
    lr: float | None = Field(default=None, gt=0)
    phantoms: int | None = Field(default=None, ge=0)
    calibration_phantoms: int | None = Field(default=None, ge=0)
    phantom_index0: int = Field(default=PHANTOM_SEED_INDEX0, ge=0)
    flip_labels: bool = False  # a candidate made worse on purpose (tests of the gate)
    seed: int = 0
    progress_interval_s: float = Field(default=10.0, ge=0)  # at most one train-step progress line per interval


class FineTuneResult(_Record):
    """What the child did: the MLflow run, the registered candidate and the promotion gate's verdict."""

    run_id: str
    registry_version: str
    card_version: str
    gate_passed: bool
    gate_reasons: tuple[str, ...]
    candidate: GateFigures
    champion: GateFigures
    data_fingerprint: str
    train_cases: int
    heldout_cases: int
    phantoms: int
    steps: int
    train_seconds: float
    gate_seconds: float
    total_seconds: float
    finished_at: float  # the child's clock (time.time()) when it wrote this result

    def summary(self) -> dict:
        """The scheduler run's summary (JSON-safe: NaN figures become null)."""
        from inference.training.metrics import json_safe

        return json_safe(self.model_dump(mode="json"))


class Progress(_Record):
    """One step of the child's work, printed as a JSON line on stdout: `{"progress": {...}}`."""

    phase: str  # data, train, calibration, gate, done
    done: int = Field(ge=0)
    total: int = Field(ge=0)
    loss: float | None = None
    elapsed_s: float = Field(ge=0)
    eta_s: float | None = None
    at: float  # the child's clock (time.time())

    def line(self) -> str:
        return json.dumps({"progress": json.loads(self.model_dump_json())})

    @classmethod
    def parse(cls, line: str) -> Self | None:
        """The Progress of a stdout line, or None when the line is not one (other output is kept, not logged)."""
        try:
            found = json.loads(line)
        except ValueError:
            return None
        if not isinstance(found, dict) or set(found) != {"progress"}:
            return None
        return cls.from_json(json.dumps(found["progress"]), "stdout line")
