"""schemathesis against the API's own OpenAPI spec: generated requests to every operation, with
a valid key; no server errors, and responses that match the documented schemas, statuses and
content types (invalid data rejected too)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from app.settings import Settings


@pytest.fixture(scope="module")
def api(tmp_path_factory, embedder):
    from app.api import create_app
    from app.keys import Keys
    from app.service import AnswerService
    from ingest.pipeline import ingest_records
    from retrieval.kb import KnowledgeBase

    # The fuzzer sends hundreds of requests with one key: no rate limit, so every one reaches its route.
    s = Settings(home=tmp_path_factory.mktemp("schema") / "home", api_rate_per_minute=0)
    kb = KnowledgeBase(s.home)
    ingest_records(kb, embedder, [("a", "Tea", "Green tea steeps at 80 degrees for two minutes."),
                                  ("b", "Trains", "The night train leaves Vienna at 21:30.")], collection="default")
    _, key = Keys(kb.store).create("schemathesis")
    return create_app(s, service=AnswerService(s, kb=kb, embedder=embedder)), key


def test_generated_requests_get_documented_answers(api):
    app, key = api
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every endpoint is in the spec
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Every check but positive_data_acceptance: some rules cannot be put in a JSON schema
            # ("the last message must be the user's question") and rightly answer 400.
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # noqa: BLE001 -- collected so that one run reports every operation
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
