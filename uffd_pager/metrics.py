"""The pager's Prometheus metrics, read from what it counts anyway.

The fault path is hot (a fault costs 10-20 us end to end), so nothing here
runs per fault: a scrape reads the counters the C fill state keeps per
region (`FillRange.counters()`, its fault-latency histogram) and what the
region records keep, and sums them per store kind. A region's counters go
with it, so what released regions had counted is kept in `_retired`: the
counters never go down.

The latency histogram is the C fill path's (native/fill.c): from the
pager reading a fault message to the page filled, in power-of-two buckets
(bucket k: under 2^k us), timed only for regions tracked here (`track`), so
a pager without --metrics does not pay for the clock. The time a fault
waits in the kernel's queue and its wake-ups are the kernel's, unseen here.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from uffd_pager.served import ServedRegion

# Labels of a store kind: the URL scheme, and whether its pages are encrypted.
Kind = tuple[str, str]
_KIND_LABELS = ("store", "encrypted")


def kind_of(region: ServedRegion) -> Kind:
    return region.store_kind, "true" if region.encrypted else "false"


@dataclass
class _Totals:
    """The monotonic counts of one store kind's regions."""

    faults: int = 0
    evictions: int = 0
    bytes_written: int = 0
    fault_errors: int = 0
    writeback_errors: int = 0
    latency_ns: int = 0
    buckets: list[int] = field(default_factory=list)

    def add(self, region: ServedRegion) -> None:
        counters = region.fill.counters()
        self.faults += counters["faults"]
        self.evictions += counters["evictions"]
        self.bytes_written += region.writeback["bytes_written"]
        self.fault_errors += region.errors
        self.writeback_errors += region.writeback["writeback_errors"]
        buckets, total_ns = region.fill.latency()
        self.latency_ns += total_ns
        self.buckets = [a + b for a, b in zip(self.buckets, buckets)] if self.buckets else buckets


@dataclass(frozen=True)
class PagerGauges:
    """What the pager as a whole holds at the moment of a scrape."""

    connections: int
    tenants: int
    stores: int
    internal_errors: int  # a counter: exceptions of its own that reached its loop
    restarts: int  # a counter: 1 once this pager took regions over from one that died


class PagerMetrics(Collector):
    """A custom collector over the pager's regions (see the module's doc)."""

    def __init__(self, regions: Callable[[], Iterable[ServedRegion]], gauges: Callable[[], PagerGauges]) -> None:
        self._regions = regions
        self._gauges = gauges
        self._retired: dict[Kind, _Totals] = {}

    def track(self, region: ServedRegion) -> None:
        """A new region (a client's, or a forked child's): its faults are timed."""
        region.fill.timing = True

    def retire(self, region: ServedRegion) -> None:
        """A released region: what it counted stays in the totals."""
        self._retired.setdefault(kind_of(region), _Totals()).add(region)

    def collect(self) -> Iterator[Metric]:
        totals = {kind: replace(t, buckets=list(t.buckets)) for kind, t in self._retired.items()}
        resident: dict[Kind, int] = {}
        dirty: dict[Kind, int] = {}
        regions: dict[Kind, int] = {}
        for region in list(self._regions()):
            kind = kind_of(region)
            totals.setdefault(kind, _Totals()).add(region)
            resident[kind] = resident.get(kind, 0) + region.fill.counters()["resident_pages"]
            dirty[kind] = dirty.get(kind, 0) + region.dirty_pages()
            regions[kind] = regions.get(kind, 0) + 1

        def per_kind(family: CounterMetricFamily | GaugeMetricFamily,
                     values: dict[Kind, int]) -> CounterMetricFamily | GaugeMetricFamily:
            for kind in totals:
                family.add_metric(kind, values.get(kind, 0))
            return family

        def counter(name: str, doc: str, value: Callable[[_Totals], int]) -> CounterMetricFamily:
            return per_kind(CounterMetricFamily(name, doc, labels=_KIND_LABELS),
                            {kind: value(t) for kind, t in totals.items()})

        yield counter("uffd_pager_faults", "Fault messages read from clients' userfaultfds.", lambda t: t.faults)
        latency = HistogramMetricFamily(
            "uffd_pager_fault_latency_seconds",
            "Faults served, by the time from the pager reading the fault to its page filled.", labels=_KIND_LABELS)
        for kind, t in totals.items():
            latency.add_metric(kind, _cumulative(t.buckets), t.latency_ns / 1e9)
        yield latency
        yield per_kind(GaugeMetricFamily("uffd_pager_regions", "Regions served (forked children's included).",
                                         labels=_KIND_LABELS), regions)
        yield per_kind(GaugeMetricFamily("uffd_pager_resident_pages", "Pages filled and still in clients' memory.",
                                         labels=_KIND_LABELS), resident)
        yield per_kind(GaugeMetricFamily("uffd_pager_dirty_pages", "Pages written and not yet written back.",
                                         labels=_KIND_LABELS), dirty)
        yield counter("uffd_pager_evictions", "Pages dropped by page-out to keep regions under their caps.",
                      lambda t: t.evictions)
        yield counter("uffd_pager_writeback_bytes", "Bytes written back to stores.", lambda t: t.bytes_written)
        errors = CounterMetricFamily("uffd_pager_errors", "Pages that could not be filled (poisoned: the access "
                                     "got SIGBUS), and failed write-backs.", labels=(*_KIND_LABELS, "kind"))
        for kind, t in totals.items():
            errors.add_metric((*kind, "fault"), t.fault_errors)
            errors.add_metric((*kind, "writeback"), t.writeback_errors)
        yield errors
        gauges = self._gauges()
        yield CounterMetricFamily("uffd_pager_internal_errors", "Exceptions of the pager's own that reached its "
                                  "event loop (logged; it serves on).", value=gauges.internal_errors)
        yield CounterMetricFamily("uffd_pager_restarts", "Times this pager took over from one that died.",
                                  value=gauges.restarts)
        yield GaugeMetricFamily("uffd_pager_connections", "Client connections.", value=gauges.connections)
        yield GaugeMetricFamily("uffd_pager_tenants", "Client uids holding regions.", value=gauges.tenants)
        yield GaugeMetricFamily("uffd_pager_stores", "Backing stores open.", value=gauges.stores)


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    """The C histogram (bucket k: under 2^k us, the last: slower) as
    Prometheus buckets: cumulative, by upper bound in seconds."""
    out: list[tuple[str, float]] = []
    running = 0
    for k, count in enumerate(buckets[:-1]):
        running += count
        out.append((repr((1 << k) / 1e6), running))
    out.append(("+Inf", running + (buckets[-1] if buckets else 0)))
    return out
