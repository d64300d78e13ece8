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


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory, redis_server, registry_file, sqlite_template):  # type: ignore[no-untyped-def]
    """The API over HTTP with a worker, every rate and capacity limit off (a run whose calls were
    mostly answered 429 would test nothing) and event streams that end after 2 s (so the streams
    are tried too, and their events checked against their description)."""
    import shutil
    import uuid

    from core.settings import Settings
    from tests.conftest import make_key
    from tests.support import ApiServer, WorkerProcess
    from webapi import create_app

    var = tmp_path_factory.mktemp("schemathesis")
    shutil.copy(sqlite_template, var / "batchgen.db")
    settings = Settings.model_validate({
        "var_dir": var, "database_url": f"sqlite:///{var / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry_file, "max_wait_ms": 5.0,
        "model": "tiny-chat", "calibrate": "off", "rate_limit_per_minute": 0, "max_pending_per_key": 0,
        "max_pending_per_model": 0, "auth_failures_per_minute": 0, "stream_max_s": 2.0})
    app = create_app(settings)
    token = make_key(settings.database_url)
    api = ApiServer(app, token).start()
    worker = WorkerProcess(settings, "tiny-chat").start()
    # A finished job of this key's owner: its event streams have events to check.
    job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["a", "b"],
                                                    "params": {"max_new_tokens": 2}}).json()
    api.wait_for_job(job["id"])
    yield api, token, job["id"]
    worker.stop()
    api.stop()
    app.extensions["batchgen"].close()


@pytest.mark.slow
def test_every_route_holds_under_generated_input(unlimited):
    api, token, job_id = unlimited
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    failures = []
    statuses: list[int] = []
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        tried += 1
        # Requests the description allows, and requests it does not (wrong types, missing fields...).
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and (operation.method.upper(), operation.path) in NO_NEGATIVE:
                continue

            @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case):  # type: ignore[no-untyped-def]
                response = case.call_and_validate(base_url=api.url, headers={"Authorization": f"Bearer {token}"},
                                                  timeout=30, excluded_checks=EXCLUDED)
                statuses.append(response.status_code)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing invalid to generate for this operation (no parameters, no body)
            except Exception as exc:  # noqa: BLE001 - collect every route's failure
                failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}")
    assert tried >= 25
    # The event streams, followed on a real job: every event must match its description.
    for path in ("/v1/jobs/events", "/v1/jobs/{job_id}/events"):
        case = schema[path]["GET"].Case(path_parameters={"job_id": job_id} if "{" in path else {})
        response = case.call_and_validate(base_url=api.url, headers={"Authorization": f"Bearer {token}"},
                                          timeout=30, excluded_checks=EXCLUDED)
        assert response.text.count("event: progress") >= 1, (path, response.text)
        assert path != "/v1/jobs/{job_id}/events" or "event: end" in response.text
    assert not failures, "\n\n".join(failures)
    # Limits were off: the generated calls reached the routes' own logic.
    assert statuses and statuses.count(429) <= 0.02 * len(statuses), (statuses.count(429), len(statuses))
    assert sum(200 <= s < 300 for s in statuses) >= 0.1 * len(statuses), sorted(set(statuses))
