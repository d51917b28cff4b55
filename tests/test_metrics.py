"""Tests for linescan.metrics: metric names, isolation, and a real HTTP scrape."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from linescan.ingest import REJECT_REASONS
from linescan.metrics import STAGES, Metrics, MetricsServer

EXPECTED = {
    "linescan_frames_received": "counter",
    "linescan_frames_rejected": "counter",
    "linescan_frames_dropped": "counter",
    "linescan_lines_inspected": "counter",
    "linescan_lines_dropped": "counter",
    "linescan_tiles_inferred": "counter",
    "linescan_batch_size": "histogram",
    "linescan_stage_seconds": "histogram",
    "linescan_latency_seconds": "histogram",
    "linescan_frame_latency_seconds": "histogram",
    "linescan_queue_depth": "gauge",
    "linescan_web_edge_px": "gauge",
    "linescan_stride_px": "gauge",
    "linescan_engine_tiles_per_second": "gauge",
    "linescan_sustainable_lines_per_second": "gauge",
    "linescan_defects": "counter",
    "linescan_lines_per_metre": "gauge",
    "linescan_repeating_defects": "counter",
    "linescan_repeating_series": "gauge",
    "linescan_pictures": "counter",
    "linescan_picture_bytes": "counter",
    "linescan_http_auth_failures": "counter",
    "linescan_events_published": "counter",
    "linescan_segments": "counter",
    "linescan_sequence_gaps": "counter",
    "linescan_model": "info",
    "linescan_ready": "gauge",
    "linescan_engine_errors": "counter",
    "linescan_auth_failures": "counter",
    "linescan_disconnects": "counter",
    "linescan_events_journaled": "counter",
    "linescan_journal_errors": "counter",
    "linescan_replay_requests": "counter",
    "linescan_events_replayed": "counter",
}


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


@pytest.fixture
def serve(metrics: Metrics) -> Iterator[Callable[[Callable[[], bool]], str]]:
    servers: list[MetricsServer] = []

    def start(ready: Callable[[], bool]) -> str:
        server = MetricsServer(metrics.registry, "127.0.0.1", 0, ready)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def test_every_metric_is_declared_with_prefix_and_type(metrics: Metrics) -> None:
    """The registry holds exactly the documented linescan_ metrics, with their types."""
    families = {family.name: family.type for family in metrics.registry.collect()}
    assert families == EXPECTED


def test_known_labels_start_at_zero(metrics: Metrics) -> None:
    """Every reject reason and stage is exported at 0 before anything happens."""
    get_value = metrics.registry.get_sample_value
    for reason in REJECT_REASONS:
        assert get_value("linescan_frames_rejected_total", {"reason": reason}) == 0
    for stage in STAGES:
        assert get_value("linescan_stage_seconds_count", {"stage": stage}) == 0


def test_registries_are_independent() -> None:
    """Two Metrics on two registries neither collide nor share values."""
    first = Metrics(CollectorRegistry(), process=False)
    second = Metrics(CollectorRegistry(), process=False)
    first.frames_received_total.labels("cam0").inc(3)
    assert (
        first.registry.get_sample_value("linescan_frames_received_total", {"camera": "cam0"}) == 3
    )
    assert (
        second.registry.get_sample_value("linescan_frames_received_total", {"camera": "cam0"})
        is None
    )


def test_model_info_is_one_series(metrics: Metrics) -> None:
    """set_model_info exports linescan_model_info with the model's labels and value 1."""
    metrics.set_model_info(
        model="fabric", loss="ssim", latent=100, patch=128, precision="fp32", backend="torch"
    )
    labels = {
        "model": "fabric",
        "loss": "ssim",
        "latent": "100",
        "patch": "128",
        "precision": "fp32",
        "backend": "torch",
    }
    assert metrics.registry.get_sample_value("linescan_model_info", labels) == 1


def test_process_metrics_are_optional() -> None:
    """process=True adds the process_* collector to the daemon's registry."""
    names = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    assert "process_resident_memory_bytes" in names


def test_scrape_over_http(metrics: Metrics, serve: Callable[[Callable[[], bool]], str]) -> None:
    """GET /metrics returns the Prometheus text format with current values."""
    base = serve(lambda: True)
    metrics.frames_received_total.labels("cam0").inc(2)
    metrics.batch_size.observe(16)
    status, content_type, body = get(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("linescan_frames_received_total", (("camera", "cam0"),))] == 2
    assert samples[("linescan_batch_size_count", ())] == 1


def test_openmetrics_is_negotiated(serve: Callable[[Callable[[], bool]], str]) -> None:
    """A scraper asking for OpenMetrics gets it."""
    base = serve(lambda: True)
    status, content_type, body = get(base + "/metrics", accept="application/openmetrics-text")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_health_and_readiness(serve: Callable[[Callable[[], bool]], str]) -> None:
    """/healthz is 200 always; /readyz follows ready(); other paths are 404."""
    state = {"ready": False}
    base = serve(lambda: state["ready"])
    assert get(base + "/healthz")[::2] == (200, b"ok\n")
    assert get(base + "/readyz")[0] == 503
    state["ready"] = True
    assert get(base + "/readyz")[::2] == (200, b"ready\n")
    assert get(base + "/readyz?verbose=1")[0] == 200
    assert get(base + "/")[0] == 404
    assert get(base + "/metricsx")[0] == 404


def test_failing_readiness_probe_is_not_ready(serve: Callable[[Callable[[], bool]], str]) -> None:
    """A ready() that raises answers 503, and the server keeps serving."""

    def broken() -> bool:
        raise RuntimeError("engine gone")

    base = serve(broken)
    assert get(base + "/readyz")[0] == 503
    assert get(base + "/healthz")[0] == 200


def test_head_requests_have_no_body(serve: Callable[[Callable[[], bool]], str]) -> None:
    """HEAD answers with headers only."""
    base = serve(lambda: True)
    request = urllib.request.Request(base + "/healthz", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert response.read() == b""


def test_stop_releases_the_port(metrics: Metrics) -> None:
    """After stop() the port refuses connections, and stop() may be called twice."""
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, lambda: True)
    with pytest.raises(RuntimeError):
        _ = server.port
    server.start()
    port = server.port
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
