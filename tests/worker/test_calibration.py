"""Calibration: the choice from a curve it is given, the search that measures the curve, the cache
keyed by everything the result depends on, and a real worker that calibrates and says so.

The choice and the search are pure logic and get curves written here; the cache and the worker
measure the real tiny model with CTranslate2."""

import json
import os
import time

import pytest

from worker import calibration as cal
from worker.calibration import Plan, Trial, choose


def curve(peak_tokens, *, lengths=(32, 160), new=32, layout=(2, 1), ct="int8", sizes=(1, 2, 4, 8, 16, 32, 64)):
    """Trials of a device whose tokens/s rise to a peak at ``peak_tokens`` per batch, then fall."""
    trials = []
    for length in lengths:
        for size in sizes:
            tokens = size * (length + new)
            tps = 1000 * min(tokens, peak_tokens) / peak_tokens * (0.8 if tokens > peak_tokens else 1)
            seconds = size * layout[0] * new / tps
            trials.append(Trial(ct, *layout, length, new, size, layout[0], seconds, tps))
    return trials


def test_the_choice_is_the_budget_where_the_curve_peaks():
    for peak in (512, 1024, 2048, 4096):
        choice = choose(curve(peak))
        # The budget whose batches reach the peak for both prompt shapes (to a batch size's step).
        assert peak / 2 < choice.max_batch_tokens <= peak * 1.3, (peak, choice)
        assert (choice.compute_type, choice.inter_threads, choice.intra_threads) == ("int8", 2, 1)
        assert choice.batch_seconds > 0 and choice.tokens_per_s > 0


def test_a_flat_top_gets_the_smallest_budget_that_reaches_it():
    trials = [t if t.batch_tokens <= 1024 else Trial(**{**t.__dict__, "tokens_per_s": 1000.0})
              for t in curve(1024)]
    # Flat from 1024 tokens on; the long prompts (192 tokens a request) reach it at 8 x 192.
    assert choose(trials).max_batch_tokens == 1536


def test_failed_trials_do_not_count():
    trials = curve(1024) + [Trial("int8", 2, 1, 32, 32, 128, 2, 0.0, 0.0, error="RuntimeError: out of memory")]
    assert choose(trials) == choose(curve(1024))  # as if the failed trial had not been run
    with pytest.raises(ValueError):
        choose([Trial("int8", 2, 1, 32, 32, 1, 2, 0.0, 0.0, error="boom")])


class Device:
    """A device for the search to measure: seconds from a throughput curve, by layout and type."""

    def __init__(self, peak_tokens, speed=None):
        self.peak, self.speed = peak_tokens, speed or {}
        self.calls = []

    def __call__(self, ct, inter, intra, length, new, size, batches):
        self.calls.append((ct, inter, intra, length, size))
        if size * (length + new) > 6000:
            raise RuntimeError("out of memory")
        tokens = size * (length + new)
        tps = 1000 * self.speed.get((ct, inter, intra), 1.0) * min(tokens, self.peak) / self.peak
        if tokens > self.peak:
            tps *= 0.5
        return size * batches * new / tps


def plan(**kw):
    values = dict(device="cpu", layouts=[(2, 1), (1, 2)], compute_types=["int8", "int8_float32"], shapes=[32, 160],
                  new_tokens=32, batch_sizes=[1, 2, 4, 8, 16, 32, 64], screen_batch=8, budget_s=1e9, min_trial_s=0)
    values.update(kw)
    return Plan(**values)


def test_the_search_keeps_the_fastest_layout_and_type_and_stops_past_the_peak():
    device = Device(1024, speed={("int8", 1, 2): 0.5, ("int8_float32", 2, 1): 1.5})
    trials, _ = cal.run(plan(), device)
    choice = choose(trials)
    assert (choice.compute_type, choice.inter_threads, choice.intra_threads) == ("int8_float32", 2, 1)
    assert {(t.inter_threads, t.intra_threads) for t in trials if t.phase == "screen"} == {(2, 1), (1, 2)}
    # Past the peak (1024 tokens) throughput falls by 30%: the sweep stops one step after it.
    long = [t.batch_size for t in trials if t.phase == "curve" and t.prompt_tokens == 160]
    assert max(long) == 8  # 8 x 192 = 1536 tokens: past the peak, the last one tried
    assert 512 < choice.max_batch_tokens <= 1400


def test_a_tie_keeps_the_default_layout_and_type():
    device = Device(1024, speed={("int8_float32", 2, 1): 1.01, ("int8", 1, 2): 1.02})
    choice = choose(cal.run(plan(), device)[0])
    assert (choice.compute_type, choice.inter_threads, choice.intra_threads) == ("int8", 2, 1)


def test_out_of_memory_ends_a_shape_and_explicit_settings_are_not_searched():
    device = Device(100_000)
    trials, _ = cal.run(plan(layouts=[(2, 1)], compute_types=["int8"]), device)
    assert not [c for c in device.calls if c[:3] != ("int8", 2, 1)]
    assert [t for t in trials if t.error and "out of memory" in t.error]
    assert max(t.batch_tokens for t in trials if not t.error) <= 6000


def test_the_plan_follows_the_device_and_the_settings(monkeypatch):
    monkeypatch.setattr(cal, "cpu_count", lambda: 4)
    p = cal.make_plan(device="cpu", context_length=4096, supported=["int8", "int8_float32", "float32"])
    assert p.layouts == [(4, 1), (2, 2), (1, 4)] and p.compute_types == ["int8", "int8_float32"]
    p = cal.make_plan(device="cpu", context_length=4096, inter_threads=2, compute_type="int8")
    assert p.layouts == [(2, 2)] and p.compute_types == ["int8"]
    p = cal.make_plan(device="cuda", context_length=4096, supported=["int8", "int8_float16", "float16"])
    assert p.compute_types == ["int8_float16", "int8"] and max(p.batch_sizes) == 256
    assert max(cal.make_plan(device="cpu", context_length=128).shapes) <= 128 - 32


# --- on the real tiny model ----------------------------------------------------------------


def calibrate_tiny(tiny_model, cache_dir, mode="auto"):
    return cal.for_worker(model="tiny", model_dir=tiny_model, device="cpu", device_index=0, physical_index=0,
                          context_length=256, compute_type="auto", inter_threads=0, intra_threads=0,
                          cache_dir=cache_dir, mode=mode, budget_s=3)


@pytest.mark.slow  # measures the real model three times
def test_a_calibration_is_cached_and_measured_again_when_its_key_changes(tiny_model, tmp_path, monkeypatch):
    first = calibrate_tiny(tiny_model, tmp_path)
    assert first.source == "measured" and first.trials and first.choice.max_batch_tokens > 0
    assert first.key["device_name"] == cal.device_name("cpu") and first.key["weights"] == cal.model_fingerprint(tiny_model)
    started = time.monotonic()
    again = calibrate_tiny(tiny_model, tmp_path)
    assert again.source == "cached" and again.choice == first.choice and time.monotonic() - started < 1
    assert calibrate_tiny(tiny_model, tmp_path, mode="force").source == "measured"
    # Another CTranslate2 version, another processor: measured again.
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "__version__", "0.0-other")
    assert calibrate_tiny(tiny_model, tmp_path).source == "measured"
    monkeypatch.setattr(cal, "device_name", lambda device, index=0: "another CPU x2")
    assert calibrate_tiny(tiny_model, tmp_path).source == "measured"
    assert len(list(tmp_path.glob("tiny-cpu-*.json"))) == 3


@pytest.mark.slow  # measures the model
def test_new_weights_are_measured_again(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert calibrate_tiny(model, tmp_path / "cache").source == "measured"
    assert calibrate_tiny(model, tmp_path / "cache").source == "cached"
    st = (model / "model.bin").stat()
    os.utime(model / "model.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert calibrate_tiny(model, tmp_path / "cache").source == "measured"


@pytest.mark.slow  # measures the model
def test_the_plot_and_table_show_the_curve_and_the_choice(tiny_model, tmp_path):
    result = calibrate_tiny(tiny_model, tmp_path)
    data = cal.plot_data(result)
    assert set(data.lines) == {f"prompts of {n} tokens" for n in result.shapes} and data.chosen == result.choice.max_batch_tokens
    assert all(len(points) >= 2 for points in data.lines.values())
    assert f"max_batch_tokens={result.choice.max_batch_tokens}" in result.table()
    png = cal.plot(result, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_a_worker_calibrates_then_shows_its_limits(make_settings, sqlite_url, tmp_path):
    """A real worker measures the tiny model at start, caches it, serves with the limits it chose,
    and GET /v1/models and /metrics show them; the next start reads the cache."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import make_key
    from tests.support import ApiServer, WorkerProcess, wait_until
    from webapi import create_app

    settings = make_settings(sqlite_url, calibrate="auto", calibration_budget_s=3,
                             calibration_dir=tmp_path / "calibration")
    app = create_app(settings)
    api = ApiServer(app, make_key(sqlite_url)).start()
    try:
        worker = WorkerProcess(settings, "tiny-chat").start()
        try:
            cached = json.loads(next((tmp_path / "calibration").glob("*.json")).read_text())
            chosen = cached["choice"]

            def serving():
                entry = next(m for m in api.http.get(f"{api.url}/v1/models").json()["data"] if m["id"] == "tiny-chat")
                return entry["serving"]

            wait_until(lambda: serving(), timeout=15)
            (entry,) = serving()
            assert entry["source"] == "measured" and entry["device"] == "cpu0"
            assert entry["max_batch_tokens"] == chosen["max_batch_tokens"]
            assert entry["max_batch_size"] == chosen["max_batch_size"]
            assert (entry["compute_type"], entry["inter_threads"]) == (chosen["compute_type"], chosen["inter_threads"])
            text = api.http.get(f"{api.url}/metrics").text
            limits = {s.labels["limit"]: s.value for f in text_string_to_metric_families(text)
                      if f.name == "batchgen_batch_limit" for s in f.samples}
            assert limits["max_batch_tokens"] == chosen["max_batch_tokens"]
            assert "calibrating tiny-chat" in worker.log()
        finally:
            worker.stop()
        again = WorkerProcess(settings, "tiny-chat").start()
        try:
            assert "read from the cache" in again.log()
            wait_until(lambda: any(e["source"] == "cached" for e in serving()), timeout=15)
        finally:
            again.stop()
    finally:
        api.stop()
        app.extensions["batchgen"].close()


def test_a_cached_choice_a_worker_cannot_run_with_is_not_taken(tmp_path):
    """A cache file is read as the device's truth; one edited (or corrupted) to ``inter_threads: 0``
    or ``max_batch_size: 0`` left a worker that served nothing, with no clear error. It is refused,
    with a warning, and the calibration is measured again."""
    key = {"model": "tiny", "device": "cpu", "device_name": "x", "compute_type": "auto"}
    good = cal.Calibration(key=key, trials=[], choice=cal.Choice("int8", 1, 2, 16, 2048, 100.0, 0.5), seconds=1.0,
                           measured_at="2026-12-07T00:00:00Z")
    cal.save(tmp_path, good)
    assert cal.load_cached(tmp_path, key).choice == good.choice
    path = cal.cache_path(tmp_path, key)
    for field, bad in (("inter_threads", 0), ("max_batch_size", 0), ("max_batch_tokens", -5), ("intra_threads", -1),
                       ("inter_threads", 1.5), ("max_batch_size", True), ("compute_type", "int3"),
                       ("batch_seconds", float("nan")), ("tokens_per_s", "fast")):
        data = json.loads(good.to_json())
        data["choice"][field] = bad
        path.write_text(json.dumps(data))
        assert cal.load_cached(tmp_path, key) is None, (field, bad)
    for field, bad in (("inter_threads", 100_000), ("max_batch_size", 10**9)):
        data = json.loads(good.to_json())
        data["choice"][field] = bad
        path.write_text(json.dumps(data))
        assert cal.load_cached(tmp_path, key) is None, (field, bad)
    trial = cal.Trial("int8", 1, 2, 32, 32, 8, 1, 0.5, 100.0)
    data = json.loads(cal.Calibration(key=key, trials=[trial], choice=good.choice, seconds=1.0,
                                      measured_at="x").to_json())
    path.write_text(json.dumps(data))
    assert cal.load_cached(tmp_path, key) is not None
    data["trials"][0]["batch_size"] = "eight"
    path.write_text(json.dumps(data))
    assert cal.load_cached(tmp_path, key) is None
    for text in ("{not json", "[" * 100_000 + "]" * 100_000):
        path.write_text(text)
        assert cal.load_cached(tmp_path, key) is None
