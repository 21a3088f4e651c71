"""The fault suite's short form in `make test`: each scenario once, fewest instances, shortest outages."""
from __future__ import annotations

import shutil

import pytest

from node.orthanc_peer import orthanc_available
from tests.faults.suite import SCENARIOS, SHORT, STORESCU, run

pytestmark = pytest.mark.integration

# Scenarios that show a node bug today (see the reason); the lead removes a mark with the fix.
KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])) if name in KNOWN_BUGS
    else name for name in SCENARIOS])
def test_fault_scenario_short(name, request):
    if not orthanc_available() or not shutil.which(STORESCU):
        pytest.skip("Orthanc and DCMTK are needed (make test installs them as root)")
    if name == "database_unavailable":
        request.getfixturevalue("postgres_server")  # skips without PostgreSQL
    [result] = run([name], SHORT)
    assert (result.lost, result.duplicates, result.failures) == (0, 0, []), result
