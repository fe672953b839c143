"""Schemathesis against the service's own OpenAPI schema, through the ASGI app with a real redis-server
and a real exported model.

Every operation gets the schema's own examples, generated valid requests and generated invalid ones
(a missing API key among them), and every response goes through all of Schemathesis' built-in checks:
no 5xx, only documented status codes, content types, headers and bodies as the schema declares them,
schema-valid requests accepted, schema-invalid ones rejected, the API key enforced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import app_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi

from service.app import create_app
from service.settings import Settings

API_KEY = "fuzz-key-7f3a"
EXAMPLES_PER_MODE = 20
MIN_CASES = 200

# Timestamps are RFC 3339 ``date-time`` strings (or unix seconds) from 1970 to the year 3000 by the
# schema's description; Hypothesis' own date-time strategy spans years 1-9999 and leap seconds.
schemathesis.openapi.format(
    "date-time",
    st.builds(
        lambda moment, sep, zone: moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S.%f") + zone,
        st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2999, 12, 30)),
        st.sampled_from(["T", "t", " "]),
        st.sampled_from(["Z", "z", "+00:00", "+05:30", "-08:00", "+14:00"]),
    ),
)


@pytest.fixture()
def schema(redis_url: str, model_dir: Path) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(app_settings(redis_url, model_dir, api_keys=API_KEY, retrieval_size=50))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    try:
        yield loaded
    finally:
        asgi.shutdown_lifespans()


def run_cases(
    strategy: st.SearchStrategy, max_examples: int, check: Callable[[schemathesis.Case], None]
) -> None:
    @given(case=strategy)
    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure in CI reproduces locally
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        check(case)

    run()


def test_every_operation_conforms_to_its_schema(schema: schemathesis.BaseSchema) -> None:
    ran: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:

        def check(case: schemathesis.Case, label: str = operation.label) -> None:
            response = case.call_and_validate(headers={"X-API-Key": API_KEY})  # every built-in check
            ran[label] += 1
            statuses[response.status_code] += 1

        for example in schema.get_strategies_from_examples(operation):
            run_cases(example, 1, check)
        run_cases(operation.as_strategy(GenerationMode.POSITIVE), EXAMPLES_PER_MODE, check)
        # Invalid requests need something to make invalid: a body, a path or a query parameter.
        if len(operation.body) or any(p.location in ("path", "query") for p in operation.iter_parameters()):
            run_cases(operation.as_strategy(GenerationMode.NEGATIVE), EXAMPLES_PER_MODE, check)

    print(f"\nschemathesis: {sum(ran.values())} cases over {len(ran)} operations, statuses {dict(statuses)}")
    for label, n in sorted(ran.items()):
        print(f"  {n:4d}  {label}")
    assert len(ran) == len(operations) >= 11
    assert sum(ran.values()) >= MIN_CASES
    assert statuses[200] >= MIN_CASES // 3, "most valid requests must be served, not only refused"
    assert statuses[401] > 0 and statuses[422] > 0
    assert not [status for status in statuses if status >= 500]


# What the fuzzer found, pinned as plain cases so a change of Hypothesis' choices cannot hide a relapse.
RFC3339_LOWER_CASE = {"user_id": "f", "item_id": "1", "type": "view", "timestamp": "2024-05-01t12:00:00z"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/events", {"events": [RFC3339_LOWER_CASE]}, 200),  # RFC 3339 allows "t" and "z"
        ("POST", "/v1/events", b'{"events": "\xff\xfe"}', 422),  # not UTF-8: was a 400 outside the schema
        ("GET", "/v1/users/f/history?limit=2&limit=x", None, 422),  # was: the last value silently won
        ("GET", "/v1/users/f/history?limt=2", None, 422),  # was: ignored, like no limit at all
        ("POST", "/v1/items", {"items": [{"item_id": "n", "text": " \t "}]}, 422),  # the schema says so
    ],
)
def test_fuzzer_findings_stay_fixed(
    redis_url: str, model_dir: Path, method: str, path: str, body: dict | bytes | None, status: int
) -> None:
    app = create_app(Settings(redis_url=redis_url, model_dir=model_dir, device="cpu"))
    with TestClient(app) as client:
        content = body if isinstance(body, bytes) else None
        json_body = body if isinstance(body, dict) else None
        headers = {"content-type": "application/json"}
        response = client.request(method, path, content=content, json=json_body, headers=headers)
    assert response.status_code == status, response.text
    if status == 422:
        assert response.json()["error"]["code"] == "validation_error"
