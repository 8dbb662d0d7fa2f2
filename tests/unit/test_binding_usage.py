"""Usage over a window from cumulative reports, and what extproc reports from its metrics."""

from __future__ import annotations

import pytest

from controller.binding_usage import Totals, UsageBook, usage_status
from crdgol.envoy_health import BackendHealth
from crdgol.pb import policy_pb2 as pb
from extproc.metrics import Metrics, RequestLabels
from extproc.usage_report import usage_from

B = "team-a/chat"


class Clock:
    def __init__(self) -> None:
        self.now = 100_000.0

    def __call__(self) -> float:
        return self.now


def report(reporter: str, started_at: float, requests: int, *, tokens: int = 0, spend: float = 0.0, health: dict[str, str] | None = None) -> pb.UsageReport:
    usage = [pb.BackendUsage(binding=B, backend="a", requests=requests, input_tokens=tokens, spend=spend)]
    verdicts = [pb.ClusterHealth(cluster=c, healthy=not r, reason=r) for c, r in (health or {}).items()]
    return pb.UsageReport(reporter=reporter, started_at=started_at, usage=usage, health=verdicts)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_replica_that_started_within_the_window_counts_from_zero(clock: Clock) -> None:
    book = UsageBook(600, clock=clock)
    book.record(report("r1", clock.now - 30, 7, tokens=70, spend=0.5))
    assert book.usage(B) == Totals(requests=7, input_tokens=70, spend=0.5)
    assert book.usage("team-a/other") is None


def test_usage_slides_with_the_window(clock: Clock) -> None:
    book = UsageBook(600, clock=clock)
    started = clock.now
    for minute in range(30):  # 10 requests a minute for half an hour
        clock.now = started + 60 * minute
        book.record(report("r1", started, 10 * minute))
    # Over the last 10 minutes: 100 requests (give or take one sample step of 10 s).
    assert book.usage(B) is not None and 90 <= book.usage(B).requests <= 110  # type: ignore[union-attr]
    clock.now += 600  # no report for a window: what it counted has left the window
    assert book.usage(B) is None


def test_replicas_add_up_and_a_restarted_one_counts_from_its_new_start(clock: Clock) -> None:
    book = UsageBook(600, clock=clock)
    book.record(report("r1", clock.now - 10, 5))
    book.record(report("r2", clock.now - 10, 3))
    clock.now += 10
    book.record(report("r2-restarted", clock.now, 2))
    assert book.usage(B) == Totals(requests=10)


def test_after_a_controller_restart_the_window_fills_from_the_first_report(clock: Clock) -> None:
    book = UsageBook(600, clock=clock)
    book.record(report("old", clock.now - 86_400, 1_000_000))  # counted mostly before the window
    assert book.usage(B) == Totals()
    clock.now += 20
    book.record(report("old", clock.now - 86_420, 1_000_004))
    assert book.usage(B) == Totals(requests=4)


def test_samples_stay_bounded_whatever_the_report_rate(clock: Clock) -> None:
    book = UsageBook(600, clock=clock)
    for i in range(10_000):
        clock.now += 0.5
        book.record(report("r1", 0, i))
    # 10,000 reports: about one sample per step (window / 60), plus the baseline and the newest.
    assert len(book._reporters["r1"].samples) <= 66


def test_one_replica_seeing_a_backend_ejected_makes_it_unhealthy_until_that_replica_goes_quiet(clock: Clock) -> None:
    book = UsageBook(600, stale_after=30, clock=clock)
    book.record(report("r1", 0, 1, health={"c1": "", "c2": ""}))
    book.record(report("r2", 0, 1, health={"c1": "ejected"}))
    assert book.health() == {"c1": BackendHealth(False, "ejected"), "c2": BackendHealth(True, "")}
    clock.now += 20
    book.record(report("r1", 0, 1, health={"c1": "", "c2": ""}))
    clock.now += 15  # r2 last heard 35 s ago
    assert book.health() == {"c1": BackendHealth(True, ""), "c2": BackendHealth(True, "")}


def test_the_status_document_holds_money_as_a_decimal_string() -> None:
    doc = usage_status(Totals(requests=3, failed=1, input_tokens=30, output_tokens=9, spend=0.0045), 3600)
    assert doc == {"windowSeconds": 3600, "requests": 3, "failedRequests": 1, "inputTokens": 30, "outputTokens": 9, "spend": "0.004500"}


def test_extproc_reports_what_its_metrics_counted_per_binding_and_backend() -> None:
    m = Metrics()
    a = RequestLabels("team-a/acme", B, "be-a", "chat", "chat", "gpt")
    b = RequestLabels("team-a/globex", B, "be-b", "chat", "chat", "claude")
    for labels, status in ((a, 200), (a, 200), (b, 503)):
        m.record_usage(labels, 10, 4)
        m.record_duration(labels, status, 0.1)
    m.spend.labels(a.tenant, B, "be-a").inc(0.25)
    m.record_duration(RequestLabels("", "", "", "chat", "x", ""), 401, 0.001)  # refused before a binding
    rows = {(u.binding, u.backend): u for u in usage_from(m.registry)}
    assert set(rows) == {(B, "be-a"), (B, "be-b")}
    ra, rb = rows[B, "be-a"], rows[B, "be-b"]
    assert (ra.requests, ra.failed, ra.input_tokens, ra.output_tokens, ra.spend) == (2, 0, 20, 8, 0.25)
    assert (rb.requests, rb.failed, rb.input_tokens, rb.output_tokens) == (1, 1, 10, 4)
