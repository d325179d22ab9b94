"""Histograms, counters and the Prometheus text they render to.

The rendered text is parsed back with a small, strict parser of text format
0.0.4 (the grammar Prometheus' own ``expfmt`` accepts), so that a format slip
fails here rather than in a scraper.
"""

from __future__ import annotations

import math
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nlbproxy.metrics import (
    LATENCY_BUCKETS,
    Histogram,
    HostStats,
    ListenerStats,
    PrometheusWriter,
    status_classes,
)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{.*\}})? (\S+)$")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def parse_labels(text: str) -> dict[str, str]:
    """``{a="x",b="y\\"z"}`` -> dict; raises ValueError on anything else."""
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"labels not braced: {text!r}")
    labels: dict[str, str] = {}
    i, end = 1, len(text) - 1
    while i < end:
        m = _LABEL_NAME.match(text, i)
        if m is None or text[m.end():m.end() + 2] != '="':
            raise ValueError(f"bad label at {i}: {text!r}")
        name, i = m.group(), m.end() + 2
        value = []
        while True:
            if i >= end:
                raise ValueError(f"unterminated label value: {text!r}")
            c = text[i]
            if c == '"':
                i += 1
                break
            if c == "\\":
                if text[i + 1] not in _ESCAPES:
                    raise ValueError(f"bad escape at {i}: {text!r}")
                value.append(_ESCAPES[text[i + 1]])
                i += 2
                continue
            if c == "\n":
                raise ValueError("raw newline in label value")
            value.append(c)
            i += 1
        if name in labels:
            raise ValueError(f"label {name} repeated")
        labels[name] = "".join(value)
        if i < end:
            if text[i] != ",":
                raise ValueError(f"expected ',' at {i}: {text!r}")
            i += 1
    return labels


def parse_exposition(text: str) -> dict[str, dict]:
    """Families by name: ``{"type", "help", "samples": [(name, labels, value)]}``.

    Enforces what scrapers enforce: HELP then TYPE once per family, before its
    samples; samples of a family contiguous; histogram series named
    ``_bucket``/``_sum``/``_count``; the text ends with a newline.
    """
    if not text.endswith("\n"):
        raise ValueError("exposition must end with a newline")
    families: dict[str, dict] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            if name in families:
                raise ValueError(f"family {name} declared twice")
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if name != current or families[name]["type"] is not None:
                raise ValueError(f"TYPE out of place: {line!r}")
            if kind not in ("counter", "gauge", "histogram", "summary", "untyped"):
                raise ValueError(f"unknown type {kind!r}")
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            if m is None:
                raise ValueError(f"bad sample line {line!r}")
            sample, labels, value = m.groups()
            if current is None:
                raise ValueError(f"sample before any family: {line!r}")
            family = families[current]
            allowed = {current}
            if family["type"] == "histogram":
                allowed = {current + s for s in ("_bucket", "_sum", "_count")}
            if sample not in allowed:
                raise ValueError(f"sample {sample} outside its family {current}")
            family["samples"].append(
                (sample, parse_labels(labels) if labels else {}, float(value)))
    return families


class HistogramTests(SynchronousTestCase):
    def test_empty(self) -> None:
        h = Histogram()
        self.assertIsNone(h.quantile(0.5))
        self.assertEqual(list(h.cumulative())[-1], ("+Inf", 0))
        self.assertEqual(h.total, 0.0)

    def test_bounds_are_inclusive(self) -> None:
        # Prometheus buckets are "less than or equal": an observation equal to
        # a bound counts in that bucket.
        h = Histogram()
        h.observe(0.005)
        buckets = dict(h.cumulative())
        self.assertEqual(buckets["0.0025"], 0)
        self.assertEqual(buckets["0.005"], 1)

    def test_cumulative(self) -> None:
        h = Histogram()
        for seconds in (0.0001, 0.003, 0.003, 0.2, 7.0, 60.0):
            h.observe(seconds)
        pairs = list(h.cumulative())
        self.assertEqual([b for b, _ in pairs], [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"])
        counts = [n for _, n in pairs]
        self.assertEqual(counts, sorted(counts))
        buckets = dict(pairs)
        self.assertEqual(buckets["0.0005"], 1)
        self.assertEqual(buckets["0.005"], 3)
        self.assertEqual(buckets["0.25"], 4)
        self.assertEqual(buckets["10.0"], 5)
        self.assertEqual(buckets["+Inf"], 6)
        self.assertEqual(h.count, 6)
        self.assertAlmostEqual(h.total, 67.2061)

    def test_quantile(self) -> None:
        h = Histogram()
        for _ in range(90):
            h.observe(0.004)
        for _ in range(10):
            h.observe(0.9)
        self.assertEqual(h.quantile(0.5), 0.005)
        self.assertEqual(h.quantile(0.9), 0.005)
        self.assertEqual(h.quantile(0.95), 1.0)
        self.assertEqual(h.quantile(1.0), 1.0)

    def test_quantile_past_last_bound(self) -> None:
        h = Histogram()
        h.observe(LATENCY_BUCKETS[-1] * 2)
        self.assertEqual(h.quantile(0.5), math.inf)

    @given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
    def test_cumulative_property(self, observations: list[float]) -> None:
        h = Histogram()
        for seconds in observations:
            h.observe(seconds)
        for bound, count in h.cumulative():
            limit = math.inf if bound == "+Inf" else float(bound)
            self.assertEqual(count, sum(1 for o in observations if o <= limit))


class StatsTests(SynchronousTestCase):
    def test_requests_sum_status_classes(self) -> None:
        stats = HostStats()
        stats.responses[2] = 5
        stats.responses[5] = 2
        self.assertEqual(stats.requests, 7)
        self.assertEqual(list(status_classes(stats.responses)),
                         [("1xx", 0), ("2xx", 5), ("3xx", 0), ("4xx", 0), ("5xx", 2)])

    def test_listener_reject(self) -> None:
        stats = ListenerStats()
        stats.reject(431)
        stats.reject(431)
        stats.reject(503)
        self.assertEqual(stats.rejected, {431: 2, 503: 1})


class PrometheusWriterTests(SynchronousTestCase):
    def test_families_grouped_with_help_and_type(self) -> None:
        w = PrometheusWriter()
        w.add("x_total", "counter", "Xs.", 1, pool="a")
        w.add("up", "gauge", "Up.", 1, pool="a")
        w.add("x_total", "counter", "Xs.", 2, pool="b")
        text = w.render()
        self.assertEqual(text, (
            "# HELP x_total Xs.\n"
            "# TYPE x_total counter\n"
            'x_total{pool="a"} 1\n'
            'x_total{pool="b"} 2\n'
            "# HELP up Up.\n"
            "# TYPE up gauge\n"
            'up{pool="a"} 1\n'
        ))
        families = parse_exposition(text)
        self.assertEqual(families["x_total"]["samples"],
                         [("x_total", {"pool": "a"}, 1.0), ("x_total", {"pool": "b"}, 2.0)])

    def test_no_labels(self) -> None:
        w = PrometheusWriter()
        w.add("plain", "gauge", "Plain.", 0.5)
        self.assertIn("\nplain 0.5\n", w.render())

    def test_label_escaping(self) -> None:
        w = PrometheusWriter()
        w.add("m", "gauge", "M.", 1, host='a"b\\c\nd')
        self.assertIn('m{host="a\\"b\\\\c\\nd"} 1\n', w.render())
        [(_, labels, _)] = parse_exposition(w.render())["m"]["samples"]
        self.assertEqual(labels, {"host": 'a"b\\c\nd'})

    @given(st.text(), st.text())
    def test_label_values_round_trip(self, pool: str, host: str) -> None:
        w = PrometheusWriter()
        w.add("m_total", "counter", "M.", 3, pool=pool, host=host)
        [(_, labels, value)] = parse_exposition(w.render())["m_total"]["samples"]
        self.assertEqual(labels, {"pool": pool, "host": host})
        self.assertEqual(value, 3.0)

    def test_histogram(self) -> None:
        h = Histogram()
        h.observe(0.003)
        h.observe(0.2)
        w = PrometheusWriter()
        w.add_histogram("d_seconds", "D.", h, pool="p", host="[::1]:80")
        w.add_histogram("d_seconds", "D.", Histogram(), pool="p", host="10.0.0.2:80")
        family = parse_exposition(w.render())["d_seconds"]
        self.assertEqual(family["type"], "histogram")
        first = [s for s in family["samples"] if s[1].get("host") == "[::1]:80"]
        buckets = [(labels["le"], v) for name, labels, v in first if name == "d_seconds_bucket"]
        self.assertEqual(len(buckets), len(LATENCY_BUCKETS) + 1)
        self.assertEqual(buckets[-1], ("+Inf", 2.0))
        self.assertEqual(dict(buckets)["0.005"], 1.0)
        sums = {name: v for name, labels, v in first if name != "d_seconds_bucket"}
        self.assertEqual(sums["d_seconds_count"], 2.0)
        self.assertAlmostEqual(sums["d_seconds_sum"], 0.203)
        # le is the last label, after the series' own labels.
        line = next(line for line in w.render().splitlines() if "_bucket" in line)
        self.assertTrue(line.startswith('d_seconds_bucket{pool="p",host="[::1]:80",le='), line)

    def test_large_values_exact(self) -> None:
        w = PrometheusWriter()
        w.add("bytes_total", "counter", "B.", 123_456_789_012)
        [(_, _, value)] = parse_exposition(w.render())["bytes_total"]["samples"]
        self.assertEqual(value, 123_456_789_012)

    def test_parser_rejects_malformed(self) -> None:
        for text in ('m{a="x} 1\n', "m 1", 'm{a="\\q"} 1\n', "# TYPE m gauge\nm 1\n"):
            with self.assertRaises(ValueError, msg=text):
                parse_exposition(text)
