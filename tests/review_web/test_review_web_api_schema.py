"""Property-based run of the JSON API against its own OpenAPI document (schemathesis): no request,
however odd, gets a server error or a response that breaks the schema."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from review_web.app import create_app


def test_api_answers_every_request_without_server_error(node):
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_app(node.settings, node.sessions, node.index))
    headers = {"Authorization": f"Bearer {node.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the OpenAPI document lists no operation"
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            case.call_and_validate(headers=headers)

        call()
