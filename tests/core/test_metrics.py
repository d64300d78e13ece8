"""core.metrics: what processes publish comes out of /metrics as Prometheus reads it."""

from prometheus_client.parser import text_string_to_metric_families

from core.metrics import Metrics, render


def test_snapshots_of_several_processes_render_as_prometheus_parses_them():
    api, worker = Metrics(), Metrics()
    api.observe("batchgen_submit_seconds", 0.003)
    api.observe("batchgen_submit_seconds", 0.7)
    api.inc("batchgen_http_requests_total", 2, route="/v1/jobs", status="202")
    odd = 'Xeon "Platinum" C:\\cpu\nline two'  # every character the text format must escape
    worker.set("batchgen_worker_info", 1, cpu=odd)
    text = render({"": {}, "api:1": api.snapshot(), "worker:tiny-chat:0": worker.snapshot()})

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["batchgen_http_requests"].type == "counter"
    [(labels, value)] = [(s.labels, s.value) for s in families["batchgen_http_requests"].samples
                         if s.name == "batchgen_http_requests_total"]
    assert labels == {"process": "api:1", "route": "/v1/jobs", "status": "202"} and value == 2
    hist = {(s.name, s.labels.get("le")): s.value for s in families["batchgen_submit_seconds"].samples}
    assert hist[("batchgen_submit_seconds_bucket", "0.005")] == 1
    assert hist[("batchgen_submit_seconds_bucket", "1.0")] == 2 and hist[("batchgen_submit_seconds_bucket", "+Inf")] == 2
    assert hist[("batchgen_submit_seconds_count", None)] == 2
    assert abs(hist[("batchgen_submit_seconds_sum", None)] - 0.703) < 1e-9
    [info] = families["batchgen_worker_info"].samples
    assert info.labels == {"process": "worker:tiny-chat:0", "cpu": odd} and info.value == 1
