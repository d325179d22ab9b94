"""Merging workers' admin documents: counters summed, shared farm state taken once."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.metrics import PrometheusWriter
from nlbproxy.workers.aggregate import merge_metrics, merge_states


def _host(requests: int, active: int, sessions: int, p50: float | None, health: str = "up") -> dict:
    return {
        "health": health, "directive": "draining", "load": 40, "capacity": 10, "weight": 1,
        "active_requests": active, "requests": requests, "sessions": sessions,
        "connections": {"open": 2, "idle": 1},
        "latency": {"count": requests, "p50": p50, "p90": p50, "p99": None},
    }


def _state(requests: int, active: int, sessions: int, p50: float | None, rejected: dict) -> dict:
    return {
        "unit": "u",
        "pools": {"app": {"affinity": "none", "hosts": {"10.0.0.1:80": _host(requests, active, sessions, p50)}}},
        "listeners": {"web": {"connections": requests, "open_connections": active, "requests": requests,
                              "rejected": rejected, "routing_failures": 1}},
    }


class MergeStatesTests(SynchronousTestCase):
    def test_counters_add_shared_state_kept(self) -> None:
        merged = merge_states([
            _state(10, 1, 3, 0.01, {"400": 1}),
            _state(5, 2, 4, 0.05, {"400": 2, "503": 1}),
        ])
        host = merged["pools"]["app"]["hosts"]["10.0.0.1:80"]
        self.assertEqual(host["requests"], 15)
        self.assertEqual(host["active_requests"], 3)
        self.assertEqual(host["sessions"], 4)
        self.assertEqual(host["connections"], {"open": 4, "idle": 2})
        self.assertEqual(host["latency"], {"count": 15, "p50": 0.05, "p90": 0.05, "p99": None})
        self.assertEqual((host["health"], host["directive"], host["load"]), ("up", "draining", 40))
        listener = merged["listeners"]["web"]
        self.assertEqual(listener["requests"], 15)
        self.assertEqual(listener["routing_failures"], 2)
        self.assertEqual(listener["rejected"], {"400": 3, "503": 1})

    def test_one_document_is_itself_and_inputs_are_not_changed(self) -> None:
        first = _state(1, 0, 0, None, {})
        second = _state(2, 0, 0, None, {})
        self.assertEqual(merge_states([first]), first)
        merge_states([first, second])
        self.assertEqual(first["pools"]["app"]["hosts"]["10.0.0.1:80"]["requests"], 1)

    def test_a_pool_only_one_worker_has(self) -> None:
        other = {"pools": {"extra": {"affinity": "none", "hosts": {}}}, "listeners": {}}
        merged = merge_states([_state(1, 0, 0, None, {}), other])
        self.assertIn("extra", merged["pools"])

    def test_nothing_to_merge(self) -> None:
        with self.assertRaises(ValueError):
            merge_states([])


def _page(requests: int, up: int, open_: int) -> str:
    w = PrometheusWriter()
    w.add("nlbproxy_requests_total", "counter", "Responses.", requests, pool="app", code="2xx")
    w.add("nlbproxy_host_up", "gauge", "Up.", up, pool="app")
    w.add("nlbproxy_upstream_connections", "gauge", "Open.", open_, pool="app", state="open")
    return w.render()


class MergeMetricsTests(SynchronousTestCase):
    def test_counters_and_resource_gauges_add_farm_gauges_do_not(self) -> None:
        text = merge_metrics([_page(10, 1, 2), _page(7, 1, 3)])
        lines = text.splitlines()
        self.assertIn('nlbproxy_requests_total{pool="app",code="2xx"} 17', lines)
        self.assertIn('nlbproxy_host_up{pool="app"} 1', lines)
        self.assertIn('nlbproxy_upstream_connections{pool="app",state="open"} 5', lines)
        self.assertEqual(lines.count("# TYPE nlbproxy_requests_total counter"), 1)
        self.assertIn("# HELP nlbproxy_requests_total Responses.", lines)

    def test_families_left_out(self) -> None:
        text = merge_metrics([_page(1, 1, 1)], leave_out=frozenset({"nlbproxy_requests_total"}))
        self.assertNotIn("nlbproxy_requests_total", text)
        self.assertIn("nlbproxy_host_up", text)

    def test_histograms_add_bucket_by_bucket(self) -> None:
        page = (
            "# HELP d Durations.\n# TYPE d histogram\n"
            'd_bucket{le="0.1"} 1\nd_bucket{le="+Inf"} 2\nd_sum 0.25\nd_count 2\n'
        )
        lines = merge_metrics([page, page]).splitlines()
        self.assertEqual(lines[2:], ['d_bucket{le="0.1"} 2', 'd_bucket{le="+Inf"} 4', "d_sum 0.5", "d_count 4"])

    def test_special_values_and_junk_lines(self) -> None:
        page = "# TYPE g gauge\ng +Inf\nnot a sample line at all!\n"
        self.assertEqual(merge_metrics([page]), "# TYPE g gauge\ng +Inf\n")
