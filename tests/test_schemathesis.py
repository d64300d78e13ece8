"""Hostile input, generated: schemathesis drives every route of /openapi.json against the real
server (HTTP, a real worker): no 5xx, and every answer matches what the description promises.

(schemathesis' pytest plugin does not run under this pytest, so its strategies are driven with
hypothesis directly; every operation is tried and all failures are reported together.)
"""

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.specs.openapi.checks import positive_data_acceptance

# A request the description allows may still be refused for what no schema can say: a model that is
# not registered, a prompt too long for the model's context, a job that has already ended. Those
# are 4xx by design, so "schema-valid data is accepted" is not checked; every other check is.
EXCLUDED = [positive_data_acceptance]
# PAI-EAS takes any text/plain body as the prompt: "null" is a prompt, not a JSON null, so there is no
# schema-violating body to send it.
NO_NEGATIVE = {("POST", "/")}
# Streams that run for minutes whatever is sent: their only input is the key (tested in
# tests/test_end_to_end.py).
ENDLESS = {("GET", "/v1/jobs/events")}


@pytest.mark.slow
def test_every_route_holds_under_generated_input(served):
    api, _, _, token = served
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    failures = []
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in ENDLESS:
            continue
        tried += 1
        # Requests the description allows, and requests it does not (wrong types, missing fields...).
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and (operation.method.upper(), operation.path) in NO_NEGATIVE:
                continue

            @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case):  # type: ignore[no-untyped-def]
                case.call_and_validate(base_url=api.url, headers={"Authorization": f"Bearer {token}"},
                                       timeout=30, excluded_checks=EXCLUDED)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing invalid to generate for this operation (no parameters, no body)
            except Exception as exc:  # noqa: BLE001 - collect every route's failure
                failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}")
    assert tried >= 20
    assert not failures, "\n\n".join(failures)
