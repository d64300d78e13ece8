"""The web page in a real browser (Debian's chromium driven by Playwright) against the real stack:
the API over HTTP, a worker running the tiny model, Redis and SQLite.

Screenshots go to ``var/screenshots/`` (or ``BATCHGEN_SCREENSHOTS_DIR``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_key

pytestmark = pytest.mark.slow  # a real browser against a real stack

CHROMIUM = os.environ.get("BATCHGEN_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("BATCHGEN_SCREENSHOTS_DIR", Path(__file__).resolve().parents[1] / "var" / "screenshots"))

if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    api, _, _, _ = served
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True,
                                  reduced_motion="reduce")
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # A 4xx answer is logged as "Failed to load resource"; that is the API speaking, not a fault.
    page.on("console", lambda msg: problems.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.goto(api.url + "/")
    yield page
    context.close()
    assert not problems, problems  # no script errors, no Content-Security-Policy violations


def sign_in(page, token):
    page.fill("#signin-key", token)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("h1")).to_have_text("Jobs")


def test_sign_in_submit_and_watch_a_job_complete(page, served):
    api, _, _, token = served
    expect(page.locator("h1")).to_have_text("Sign in")
    page.screenshot(path=SHOTS / "01-sign-in.png")

    page.fill("#signin-key", "key_nope.nope")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-title")).to_contain_text("401")
    expect(page.locator("#error-message")).to_contain_text("not valid")

    sign_in(page, token)
    # The key is in this tab's session storage only: no cookie, nothing in local storage.
    assert page.evaluate("sessionStorage.getItem('batchgen.key')") == token
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []

    page.click("a[data-nav=submit]")
    expect(page.locator("#submit-model")).to_have_value("tiny-chat")  # the model a worker serves
    page.fill("#submit-prompts", "Tell me about the sea.\nWhat is a hash map?\n\nWrite a haiku.")
    page.fill("input[name=max_new_tokens]", "6")
    page.fill("input[name=temperature]", "0")
    page.screenshot(path=SHOTS / "02-submit.png", full_page=True)
    page.click("#submit-button")

    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-status")).to_have_text("completed", timeout=60_000)
    expect(page.locator("#results-list > li")).to_have_count(3)
    expect(page.locator("#job-counts")).to_contain_text("3 / 3 done")
    expect(page.locator("#job-cancel")).to_be_hidden()  # it has ended: delete, not cancel
    expect(page.locator("#job-delete")).to_be_visible()
    expect(page.locator("#results-more")).to_be_hidden()
    stored = api.http.get(f"{api.url}/v1/jobs/{job_id}/results").json()["data"]
    texts = page.locator("#results-list .result-text").all_inner_texts()
    assert texts == [r["text"] for r in stored] and all(texts)
    expect(page.locator("#results-list .result-prompt").first).to_have_text("Tell me about the sea.")
    page.screenshot(path=SHOTS / "03-job-completed.png", full_page=True)

    with page.expect_download() as download:
        page.click("#job-download")
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts

    page.select_option("#results-filter", "failed")
    expect(page.locator("#results-empty")).to_be_visible()
    expect(page.locator("#results-list > li")).to_have_count(0)
    page.select_option("#results-filter", "succeeded")
    expect(page.locator("#results-list > li")).to_have_count(3)

    page.click("a[data-nav=jobs]")
    item = page.locator(f"li.job[data-id={job_id}]")
    expect(item.locator(".status")).to_have_text("completed")
    expect(item.locator(".progress")).to_have_attribute("aria-valuenow", "3")


def test_a_scoring_job_from_the_page_shows_each_prompts_score(page, served):
    api, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=submit]")
    expect(page.locator("#submit-model")).to_have_value("tiny-chat")
    page.fill("#submit-prompts", "The sky is blue.\nGrass is green.")
    page.select_option("select[name=kind]", "score")
    page.fill("input[name=temperature]", "0.5")  # a generation setting: the API names it, nothing is dropped
    page.click("#submit-button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-details")).to_contain_text("params.temperature: a scoring job generates nothing")
    page.fill("input[name=temperature]", "")
    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-status")).to_have_text("completed", timeout=60_000)
    job = api.http.get(f"{api.url}/v1/jobs/{job_id}").json()
    assert job["kind"] == "score" and job["params"] == {}
    stored = api.http.get(f"{api.url}/v1/jobs/{job_id}/results").json()["data"]
    texts = page.locator("#results-list .result-text").all_inner_texts()
    assert texts == [f"(the prompt): logprob {r['scores'][0]['logprob']:.4f}, perplexity "
                     f"{r['scores'][0]['perplexity']:.2f}" + (", greedy" if r["scores"][0]["is_greedy"] else "")
                     for r in stored]


def test_samples_from_the_page_are_each_shown(page, served):
    api, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=submit]")
    expect(page.locator("#submit-model")).to_have_value("tiny-chat")
    page.fill("#submit-prompts", "Tell me about the sea.")
    page.fill("input[name=max_new_tokens]", "4")
    page.fill("input[name=n]", "3")
    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-status")).to_have_text("completed", timeout=60_000)
    [stored] = api.http.get(f"{api.url}/v1/jobs/{job_id}/results").json()["data"]
    assert [c["index"] for c in stored["choices"]] == [0, 1, 2]
    shown = page.locator("#results-list .result-text").first.inner_text()
    assert shown == "\n".join(f"[{c['index']}] {c['text']}" for c in stored["choices"])


def test_a_webhook_from_the_page_shows_its_secret_once_and_its_delivery(page, served):
    api, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=submit]")
    expect(page.locator("#submit-model")).to_have_value("tiny-chat")
    page.fill("#submit-prompts", "Hello")
    page.fill("input[name=max_new_tokens]", "2")
    page.fill("input[name=webhook]", "http://10.0.0.1/hook")  # not this tenant's to call: named by the API
    page.click("#submit-button")
    expect(page.locator("#error-details")).to_contain_text("webhook.url")
    # A public name is taken (its addresses are checked when the event is sent; none resolve here).
    page.fill("input[name=webhook]", "https://hooks.example.com/batchgen")
    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-webhook-secret")).to_contain_text("whsec_")
    expect(page.locator("#job-status")).to_have_text("completed", timeout=60_000)
    expect(page.locator("#job-webhook")).to_contain_text("https://hooks.example.com/batchgen", timeout=10_000)
    job = api.http.get(f"{api.url}/v1/jobs/{job_id}").json()
    assert job["webhook"]["secret"] is None and job["webhook"]["status"] in ("pending", "failed")
    page.reload()  # shown once: not after reloading the job page
    expect(page.locator("#job-webhook-row")).to_be_visible()
    expect(page.locator("#job-webhook-secret")).to_be_hidden()


def test_the_jobs_list_follows_jobs_live(page, served):
    api, _, _, token = served
    sign_in(page, token)
    expect(page.locator("#jobs-live")).to_have_class(re.compile(r"\bon\b"))
    # Submitted elsewhere after the page loaded: it appears and completes without a reload.
    job = api.http.post(f"{api.url}/v1/jobs", json={
        "model": "tiny", "prompts": [f"live prompt {i}" for i in range(12)],
        "params": {"max_new_tokens": 24}, "metadata": {"name": "from curl"}}).json()
    item = page.locator(f"li.job[data-id={job['id']}]")
    expect(item).to_be_visible(timeout=15_000)
    expect(item.locator(".job-id")).to_have_text(f"from curl · {job['id']}")
    expect(item.locator(".status")).to_have_text("completed", timeout=60_000)
    expect(item.locator(".progress")).to_have_attribute("aria-valuenow", "12")
    expect(item.locator(".job-counts")).to_contain_text("12 / 12 done")
    page.screenshot(path=SHOTS / "04-jobs.png", full_page=True)


def test_a_server_busy_with_streams_still_shows_progress_by_polling(page, served, monkeypatch):
    api, _, _, token = served
    # As if the process served as many streams as it may (streams of earlier tests may still end).
    monkeypatch.setattr(api.server.app.extensions["batchgen"].limits.long_calls, "limit", 0)  # until the test ends
    sign_in(page, token)
    job = api.http.post(f"{api.url}/v1/jobs", json={
        "model": "tiny", "prompts": [f"busy prompt {i}" for i in range(6)], "params": {"max_new_tokens": 8}}).json()
    item = page.locator(f"li.job[data-id={job['id']}]")
    expect(item.locator(".status")).to_have_text("completed", timeout=60_000)
    expect(item.locator(".job-counts")).to_contain_text("6 / 6 done")
    expect(page.locator("#jobs-live")).not_to_have_class(re.compile(r"\bon\b"))  # polled, not streamed
    # A chat in the playground is a long call too: the 429 is shown as it is, with when to retry.
    page.click("a[data-nav=play]")
    page.fill("#play-input", "Hello there")
    page.keyboard.press("Enter")
    expect(page.locator("#error-title")).to_have_text("Error 429 · too_many_streams")
    expect(page.locator("#error-details")).to_contain_text("retry after 2 s")  # from Retry-After


def hold_back_the_model_list(page) -> None:  # type: ignore[no-untyped-def]
    """The browser holds the model list back for 1.5 s (the test itself goes on at once)."""
    page.evaluate("""() => {
        const real = window.fetch;
        window.fetch = (url, ...rest) => String(url).includes("/v1/models")
            ? new Promise((ok) => setTimeout(ok, 1500)).then(() => real(url, ...rest))
            : real(url, ...rest);
    }""")


def test_a_submit_before_the_model_list_arrives_waits_for_it(page, served):
    """Submit is disabled until the model list is in, so a click waits for it. Before, a click on
    the form while the (required) model list was still empty was swallowed by the browser's own
    check and nothing happened: CI saw it once as a flaky test of the error display."""
    _, _, _, token = served
    sign_in(page, token)
    hold_back_the_model_list(page)
    page.click("a[data-nav=submit]")
    page.fill("#submit-prompts", "a prompt")
    page.fill("input[name=max_new_tokens]", "100000")
    page.click("#submit-button")
    expect(page.locator("#error-title")).to_contain_text("422", timeout=15000)
    expect(page).to_have_url(re.compile(r"#/submit$"))
    expect(page.locator("#submit-prompts")).to_have_value("a prompt")


def test_api_errors_are_shown_as_they_are(page, served):
    _, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=submit]")
    page.fill("#submit-prompts", "a prompt")
    page.fill("input[name=top_p]", "0.5")
    page.fill("input[name=max_new_tokens]", "100000")
    page.click("#submit-button")
    expect(page.locator("#error-title")).to_contain_text("422")
    expect(page.locator("#error-details")).to_contain_text("max_new_tokens")
    expect(page.locator("#error-request")).to_contain_text("request id: ")
    page.screenshot(path=SHOTS / "05-error.png", full_page=True)
    expect(page).to_have_url(re.compile(r"#/submit$"))  # nothing was submitted; the form is kept
    expect(page.locator("#submit-prompts")).to_have_value("a prompt")

    page.set_input_files("#submit-file", files=[{"name": "bad.jsonl", "mimeType": "text/plain",
                                                  "buffer": b'{"prompt": "fine"}\nnot json\n'}])
    expect(page.locator("#error-message")).to_contain_text("bad.jsonl: 1 line could not be read")
    expect(page.locator("#error-details")).to_contain_text("bad.jsonl line 2")


def test_a_jsonl_file_is_submitted_as_requests_and_a_queued_job_is_cancelled(page, served):
    api, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=submit]")
    page.select_option("#submit-model", "tiny-base")  # no worker serves it: the job stays queued
    expect(page.locator("#submit-model-hint")).to_contain_text("no worker serves it now")
    rows = [{"custom_id": "first", "prompt": "one"}, {"custom_id": "second", "prompt": "two"}]
    page.set_input_files("#submit-file", files=[{
        "name": "requests.jsonl", "mimeType": "text/plain",
        "buffer": "".join(json.dumps(r) + "\n" for r in rows).encode()}])
    expect(page.locator("#submit-file-hint")).to_contain_text("2 requests from requests.jsonl")
    page.click("#submit-button")
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.locator("#job-delete")).to_be_hidden()
    expect(page.locator("#results-list .result-index")).to_have_text(["#0 · first", "#1 · second"])
    cancel = page.locator("#job-cancel")
    cancel.click()
    expect(cancel).to_have_text("Click again to cancel")
    cancel.click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#results-list .status")).to_have_text(["cancelled", "cancelled"])
    job_id = page.url.rsplit("/", 1)[-1]
    assert api.http.get(f"{api.url}/v1/jobs/{job_id}").json()["status"] == "cancelled"

    remove = page.locator("#job-delete")
    remove.click()
    remove.click()
    expect(page).to_have_url(re.compile(r"#/jobs$"))
    assert api.http.get(f"{api.url}/v1/jobs/{job_id}").status_code == 404


def test_playground_streams_a_chat_answer(page, served):
    api, _, _, token = served
    sign_in(page, token)
    page.click("a[data-nav=play]")
    expect(page.locator("#play-model")).to_have_value("tiny-chat")  # chat models only
    options = page.locator("#play-model option").all_inner_texts()
    assert "tiny-chat (chat) · 1 worker" in options and not [o for o in options if "tiny-base" in o]
    page.fill("#play-system", "You answer briefly.")
    page.fill("#play-temperature", "0")
    page.fill("#play-max", "12")
    page.fill("#play-input", "Hello there")
    page.keyboard.press("Enter")
    answer = page.locator("#play-log .msg.assistant").last
    expect(answer.locator(".usage")).to_contain_text(" tokens", timeout=30_000)
    text = answer.locator(".text").inner_text()
    assert text.strip()
    # The same question through the API directly, greedy: the page showed the model's answer.
    direct = api.http.post(f"{api.url}/v1/chat/completions", json={
        "model": "tiny-chat", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "system", "content": "You answer briefly."},
                     {"role": "user", "content": "Hello there"}]}).json()
    assert text == direct["choices"][0]["message"]["content"]
    page.fill("#play-input", "And then?")
    page.click("#play-send")
    expect(page.locator("#play-log .msg.assistant")).to_have_count(2)
    expect(page.locator("#play-log .msg.assistant").last.locator(".usage")).to_be_visible(timeout=30_000)
    page.screenshot(path=SHOTS / "06-playground.png", full_page=True)


def test_a_chat_sent_before_the_model_list_arrives_waits_for_it(page, served):
    """An Enter pressed in the playground while its model list is on its way is sent once the list
    is in. Before, the listeners went on only after the list came, and the Enter was lost: CI saw
    it as a flaky test of the busy server's 429."""
    _, _, _, token = served
    sign_in(page, token)
    hold_back_the_model_list(page)
    page.click("a[data-nav=play]")
    page.fill("#play-max", "4")
    page.fill("#play-input", "Hello there")
    page.keyboard.press("Enter")
    expect(page.locator("#play-model")).to_have_value("", timeout=1000)  # the list was still out
    answer = page.locator("#play-log .msg.assistant")
    expect(answer).to_have_count(1, timeout=15_000)
    expect(answer.locator(".usage")).to_contain_text(" tokens", timeout=30_000)
    expect(page.locator("#play-log .msg.user")).to_have_count(1)


def test_a_phone_sized_screen(browser, served):
    api, _, settings, _ = served
    token = make_key(settings.database_url, owner="phone")
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  reduced_motion="reduce")
    page = context.new_page()
    try:
        page.goto(api.url + "/")
        sign_in(page, token)
        http = api.http.__class__()
        http.headers["Authorization"] = f"Bearer {token}"
        job = http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["a", "b"],
                                                   "params": {"max_new_tokens": 4}}).json()
        page.goto(f"{api.url}/#/jobs/{job['id']}")
        expect(page.locator("#job-status")).to_have_text("completed", timeout=60_000)
        views = {"#/jobs": ".job", "#/submit": "#submit-model option", "#/play": "#play-model option",
                 f"#/jobs/{job['id']}": "#results-list > li"}
        for view, shown in views.items():
            page.goto(f"{api.url}/{view}")
            expect(page.locator(shown).first).to_be_attached()
            # Nothing wider than the screen: no sideways scrolling.
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, view
        expect(page.locator("#results-list > li")).to_have_count(2)
        page.screenshot(path=SHOTS / "07-phone-job.png", full_page=True)
        page.click("#sign-out")
        expect(page.locator("h1")).to_have_text("Sign in")
        assert page.evaluate("sessionStorage.getItem('batchgen.key')") is None
        http.close()
    finally:
        context.close()


def test_the_page_is_public_and_strict_about_what_it_loads(served):
    api, _, _, _ = served
    import requests

    page = requests.get(api.url + "/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert requests.get(api.url + "/ui/app.js").headers["Content-Type"].startswith("text/javascript")
    # Only the page's own files: not other files of its directory, nor anything else.
    assert requests.get(api.url + "/ui/index.html").status_code == 404
    assert requests.get(api.url + "/ui/nope.js").json()["error"]["code"] == "not_found"
    assert requests.get(api.url + "/v1/models").status_code == 401  # the data behind it is not public
