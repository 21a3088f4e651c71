"""docs/conformance-statement.md (and the README's result series) against the code's own tables, so they cannot drift.

Each `<!-- table: NAME -->` table of the statement is parsed and compared with what
the code does: the SCP's SOP classes and transfer syntaxes (node.scp), the statuses
its handler can answer (every `_status(...)` in node/scp.py), its association
rejections, the SCU's warning statuses (node.scu), the result objects and every
coded concept of the SR as `sr_writer.encode_results` writes them, and the
network settings of config/node.toml.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

import node.scp as scp
from config.settings import DeliverySettings, NodeSettings, TLSSettings
from node.scu import UNCOMPRESSED, WARNING_STATUSES
from inference.types import REVIEW_REASON_CODES
from sr_writer.encode import encode_results
from sr_writer.source_header import clean_header
from tests.sr_writer.test_sr_writer_encode import make_inputs, make_source

ROOT = Path(__file__).resolve().parents[1]
STATEMENT = ROOT / "docs" / "conformance-statement.md"
README = ROOT / "README.md"
NETWORK_SECTIONS = {"node": NodeSettings, "delivery": DeliverySettings, "tls": TLSSettings}


def table(name: str, document: Path = STATEMENT) -> list[dict[str, str]]:
    """Rows of the markdown table right after `<!-- table: name -->`, keyed by header, backticks removed."""
    lines = document.read_text().splitlines()
    start = lines.index(f"<!-- table: {name} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    header, separator, *body = rows
    assert set("".join(separator)) <= set("-: "), f"table {name}: no header separator"
    assert body, f"table {name} is empty"
    return [dict(zip(header, row, strict=True)) for row in body]


def _hex(cell: str) -> int:
    return int(re.match(r"0x[0-9A-Fa-f]+", cell).group(0), 16)


def _encoded(source, *, positive: bool):
    """The result objects of `source` as the worker makes them: from the cleaned header."""
    header = clean_header(source).dataset
    image, prediction = make_inputs(header, positive=positive)
    if not positive:  # the negative goes to review for every reason, so that each reason's code is written
        prediction = dataclasses.replace(prediction, review_reasons=tuple(REVIEW_REASON_CODES))
    return [ds for ds in encode_results(header, image, prediction, review=not positive).all() if ds is not None]


def _results():
    """Result objects of a positive and a negative DX and a positive CR source."""
    dx = make_source()
    cr = make_source()
    cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    cr.Modality = "CR"
    return [ds for source, positive in ((dx, True), (dx, False), (cr, True))
            for ds in _encoded(source, positive=positive)]


@pytest.fixture(scope="module")
def results():
    return _results()


def test_scp_sop_classes():
    rows = table("scp-sop-classes")
    assert [r["UID"] for r in rows] == [str(uid) for uid in scp.ACCEPTED_SOP_CLASSES]
    for row in rows:
        assert UID(row["UID"]).name == row["SOP class"]


def test_scp_transfer_syntaxes_in_preference_order():
    rows = table("scp-transfer-syntaxes")
    assert [r["UID"] for r in rows] == list(scp.ACCEPTED_TRANSFER_SYNTAXES)
    for row in rows:
        assert UID(row["UID"]).name == row["Transfer syntax"]


def test_verification_transfer_syntaxes():
    assert [r["UID"] for r in table("verification-transfer-syntaxes")] == list(DEFAULT_TRANSFER_SYNTAXES)


def test_association_rejections():
    code = {value for name, value in vars(scp).items() if name.startswith("REJECT_")}
    documented = {tuple(_hex(row[column]) for column in ("Result", "Source", "Reason"))
                  for row in table("association-rejections")}
    assert documented == code


def _statuses_answered() -> set[int]:
    """Every status node/scp.py answers: first arguments of `_status(...)`, and what the C-ECHO handler returns."""
    tree = ast.parse((ROOT / "node" / "scp.py").read_text())
    names = {call.args[0].id for call in ast.walk(tree)
             if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_status"}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name == "_on_echo":
            names |= {node.value.id for node in ast.walk(function) if isinstance(node, ast.Return)}
    return {getattr(scp, name) for name in names}


def test_storage_statuses():
    answered = _statuses_answered()
    assert 0x0000 in answered and len(answered) >= 4
    assert {_hex(row["Status"]) for row in table("storage-statuses")} == answered


def test_scu_warning_statuses():
    assert {_hex(row["Status"]) for row in table("scu-warning-statuses")} == set(WARNING_STATUSES)


def test_result_objects_sent(results):
    sent = {(str(ds.SOPClassUID), ds.Modality, str(ds.SeriesNumber), ds.SeriesDescription) for ds in results}
    rows = table("scu-sop-classes")
    assert {(r["UID"], r["Modality"], r["Series number"], r["Series description"]) for r in rows} == sent
    for row in rows:
        assert UID(row["UID"]).name == row["SOP class"]


def test_readme_result_series(results):
    """README "Connect your PACS": the series a PACS shows, as the node writes them."""
    written = {(str(ds.SeriesNumber), ds.Modality, ds.SeriesDescription) for ds in results}
    rows = table("result-series", README)
    assert {(r["Series"], r["Modality"], r["Series description"]) for r in rows} == written


def test_scu_transfer_syntaxes(results):
    proposed = {str(ds.file_meta.TransferSyntaxUID) for ds in results} | {str(ts) for ts in UNCOMPRESSED}
    assert {r["UID"] for r in table("scu-transfer-syntaxes")} == proposed


def _codes(items, found: dict[tuple[str, str], str]) -> dict[tuple[str, str], str]:
    for item in items:
        sequences = [item.get(keyword, []) for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence")]
        sequences += [value.get("MeasurementUnitsCodeSequence", []) for value in item.get("MeasuredValueSequence", [])]
        for code in (code for sequence in sequences for code in sequence):
            found[(code.CodeValue, code.CodingSchemeDesignator)] = code.CodeMeaning
        _codes(item.get("ContentSequence", []), found)
    return found


def test_sr_codes_and_units(results):
    found: dict[tuple[str, str], str] = {}
    for ds in results:
        if ds.Modality == "SR":
            _codes([ds], found)
    documented = {(r["Code value"], r["Scheme"]): r["Meaning"] for r in table("sr-codes")}
    assert sorted(documented) == sorted(found)
    assert documented == found


def test_result_character_sets():
    rows = {row["Source text"]: row["Specific Character Set of the results"] for row in table("result-character-sets")}
    ascii_source, latin_source = make_source(), make_source()
    latin_source.PatientName = "M\u00fcller^J\u00fcrgen"
    for source, row in ((ascii_source, "ASCII only"), (latin_source, "any non-ASCII character")):
        written = {ds.get("SpecificCharacterSet") for ds in _encoded(source, positive=True)}
        assert written == {None if rows[row].startswith("absent") else rows[row]}, row


def _rendered(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return json.dumps(value)
    return str(value) or "empty"


def test_network_settings_are_the_shipped_defaults():
    shipped = tomllib.loads((ROOT / "config" / "node.toml").read_text())
    rows = {row["Setting"]: row["Default"] for row in table("network-settings")}
    expected = {}
    for section, model in NETWORK_SECTIONS.items():
        for key, field in model.model_fields.items():
            expected[f"{section}.{key}"] = _rendered(shipped.get(section, {}).get(key, field.default))
    assert rows == expected
