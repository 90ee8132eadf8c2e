"""Prometheus text, as the server's /metrics serves it, parsed into samples."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from raflora.server.testing import scrape

#: (sample name, label set) -> value: one scrape, every sample (histogram buckets included).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by sample name and label set."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def samples(url: str) -> Samples:
    """Every sample of one scrape of ``url``."""
    return parse_samples(scrape(url))


def sample_value(scraped: Samples, name: str, /, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels``; an AssertionError naming the
    sample if the scrape has none."""
    key = (name, frozenset(labels.items()))
    assert key in scraped, f"{name}{labels} missing from /metrics"
    return scraped[key]


def metric_value(url: str, name: str, /, **labels: str) -> float:
    """Sample ``name`` with exactly ``labels`` from a fresh scrape of ``url``; 0 if absent (a
    labelled counter appears only once it is first incremented)."""
    return samples(url).get((name, frozenset(labels.items())), 0.0)
