"""Prometheus metrics: `metrics: {listen: HOST:PORT}` serves /metrics.

The exposition format is prometheus_client's (text, or OpenMetrics when the
scraper asks for it): a custom collector turns the switch's counters into
metric families at each scrape.  The counters are read as the control plane
reads them for `vswitchctl show`: plain loads of the C structs' 64-bit
counters, never a lock the PMD threads take.

The HTTP side is a few lines on the switch's own asyncio loop rather than
prometheus_client's threaded server: the collector walks the switch's
ports, which only the event-loop thread may touch (ports come and go
there), so a scrape runs between two control-plane steps, never beside one.
"""

from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from vswitch.config import parse_listen

log = logging.getLogger(__name__)

PREFIX = "vswitch"
REQUEST_TIMEOUT_S = 5.0


def by_direction(rows: list[dict]) -> list[dict]:
    """Per-queue rows as Port.queue_stats describes them (one per queue and direction); a row that
    counts both directions at once (rx_packets, tx_packets ... as AF_XDP's) becomes two."""
    out = []
    for q in rows:
        if "direction" in q:
            out.append(q)
            continue
        for direction in ("rx", "tx"):
            out.append({"queue": q["queue"], "direction": direction,
                        **{k: q.get(f"{direction}_{k}", 0) for k in ("packets", "bytes", "dropped", "errors")}})
    return out


class SwitchCollector:
    """Reads the switch's counters at each scrape (a prometheus_client custom collector)."""

    def __init__(self, switch):
        self.switch = switch

    def collect(self):
        yield from self._ports()
        yield from self._pmds()
        yield from self._fdb()

    def _ports(self):
        def counter(name, doc, labels):
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        port_labels = ["port", "type"]
        rx_packets = counter("port_rx_packets", "Frames the switch received from the port.", port_labels)
        rx_bytes = counter("port_rx_bytes", "Bytes the switch received from the port.", port_labels)
        tx_packets = counter("port_tx_packets", "Frames the switch sent to the port.", port_labels)
        tx_bytes = counter("port_tx_bytes", "Bytes the switch sent to the port.", port_labels)
        dropped = counter("port_dropped", "Frames dropped, by direction (rx: from the port, tx: to it) "
                          "and reason.", port_labels + ["direction", "reason"])
        errors = counter("port_errors", "Frames refused as bad, by direction and reason.",
                         port_labels + ["direction", "reason"])
        not_captured = counter("port_capture_dropped", "Frames a capture of the port missed because its "
                               "reader was slow (they were forwarded all the same).", port_labels)
        rarp_sent = counter("port_rarp_sent", "RARP frames the switch sent as if from the port, one per "
                            "vhost-user SEND_RARP (a migrated guest without GUEST_ANNOUNCE).", port_labels)
        link = GaugeMetricFamily(f"{PREFIX}_port_link_up", "1 while the port's link is up.", labels=port_labels)
        # Ports that poll a kernel socket of their own (vxlan) and back off when it is empty.
        polls = {key: counter(f"port_{key}", doc, port_labels) for key, doc in (
            ("rx_polls", "Receive calls the port made on its socket."),
            ("rx_empty_polls", "Receive calls that found nothing."),
            ("rx_polls_skipped", "Receive bursts that skipped the socket while backing off after an empty "
                                 "call."))}
        queue_labels = port_labels + ["queue", "direction"]
        q_packets = counter("queue_packets", "Frames per queue and direction.", queue_labels)
        q_bytes = counter("queue_bytes", "Bytes per queue and direction.", queue_labels)
        q_dropped = counter("queue_dropped", "Frames dropped per queue and direction.", queue_labels)
        q_errors = counter("queue_errors", "Frames refused as bad per queue and direction.", queue_labels)

        for port in list(self.switch.ports.values()):
            ids = [port.name, port.type]
            s = port.stats()
            generic = port.c.stats
            rx_packets.add_metric(ids, s["rx_packets"])
            rx_bytes.add_metric(ids, s["rx_bytes"])
            tx_packets.add_metric(ids, s["tx_packets"])
            tx_bytes.add_metric(ids, s["tx_bytes"])
            link.add_metric(ids, 1 if port.link_up else 0)
            # The port type's stats fold the generic reasons in; take them out again.
            dropped.add_metric(ids + ["tx", "link_down"], generic.tx_dropped_down)
            dropped.add_metric(ids + ["tx", "mtu"], generic.tx_dropped_mtu)
            dropped.add_metric(ids + ["tx", "port"], s["tx_dropped"] - generic.tx_dropped_down - generic.tx_dropped_mtu)
            dropped.add_metric(ids + ["rx", "port"], s["rx_dropped"])
            dropped.add_metric(ids + ["rx", "vlan"], generic.vlan_dropped)
            dropped.add_metric(ids + ["rx", "policing"], generic.police_dropped)
            dropped.add_metric(ids + ["rx", "mirror_output"], generic.mirror_output_dropped)
            not_captured.add_metric(ids, port.counters()["capture_dropped"])
            rarp_sent.add_metric(ids, generic.rarp_sent)
            for key, family in polls.items():
                if key in s:
                    family.add_metric(ids, s[key])
            errors.add_metric(ids + ["tx", "bad_offload_header"], generic.tx_dropped_offload)
            errors.add_metric(ids + ["tx", "port"], s["tx_errors"] - generic.tx_dropped_offload)
            reasons = port.error_counts()
            for reason, count in sorted(reasons.items()):
                errors.add_metric(ids + ["rx", reason], count)
            errors.add_metric(ids + ["rx", "port"], s["rx_errors"] - sum(reasons.values()))
            for q in by_direction(port.queue_stats()):
                qids = ids + [str(q["queue"]), q["direction"]]
                q_packets.add_metric(qids, q["packets"])
                q_bytes.add_metric(qids, q["bytes"])
                q_dropped.add_metric(qids, q["dropped"])
                q_errors.add_metric(qids, q["errors"])
        yield from (rx_packets, rx_bytes, tx_packets, tx_bytes, dropped, errors, not_captured, rarp_sent, link,
                    q_packets, q_bytes, q_dropped, q_errors, *polls.values())

    def _pmds(self):
        labels = ["pmd", "cpu"]
        families = {
            "busy_cycles": CounterMetricFamily(f"{PREFIX}_pmd_busy_cycles", "TSC cycles in passes that moved "
                                               "frames.", labels=labels),
            "idle_cycles": CounterMetricFamily(f"{PREFIX}_pmd_idle_cycles", "TSC cycles in passes that moved "
                                               "none.", labels=labels),
            "packets": CounterMetricFamily(f"{PREFIX}_pmd_packets", "Frames received.", labels=labels),
            "bursts": CounterMetricFamily(f"{PREFIX}_pmd_bursts", "Non-empty receive bursts "
                                          "(packets / bursts = frames per burst).", labels=labels),
            "sleeps": CounterMetricFamily(f"{PREFIX}_pmd_sleeps", "Times the thread went to sleep.",
                                          labels=labels),
            "kick_wakeups": CounterMetricFamily(f"{PREFIX}_pmd_kick_wakeups", "Sleeps ended by a port's "
                                                "notification.", labels=labels),
            "yields": CounterMetricFamily(f"{PREFIX}_pmd_yields", "Times the thread gave up its CPU after a "
                                          "light pass (pmd.yield).", labels=labels),
            "yield_sleeps": CounterMetricFamily(f"{PREFIX}_pmd_yield_sleeps", "Sleeps after empty passes whose "
                                                "yields ran no other thread (pmd.yield).", labels=labels),
            "shared_sleeps": CounterMetricFamily(f"{PREFIX}_pmd_shared_sleeps", "Early sleeps after empty passes "
                                                 "on a CPU another thread wants (pmd.yield).", labels=labels),
        }
        max_gap = GaugeMetricFamily(f"{PREFIX}_pmd_max_gap_seconds", "Longest time between two passes of "
                                    "the PMD loop, sleeps left out, since start or `pmd-stats --reset-gap`.",
                                    labels=labels)
        per_burst = GaugeMetricFamily(f"{PREFIX}_pmd_packets_per_burst", "Mean frames per non-empty burst "
                                      "since start.", labels=labels)
        for pmd in self.switch.pmds:
            s = pmd.stats()
            ids = [str(s["pmd"]), "" if s["cpu"] is None else str(s["cpu"])]
            for key, family in families.items():
                family.add_metric(ids, s[key])
            per_burst.add_metric(ids, s["packets_per_burst"])
            max_gap.add_metric(ids, s["max_gap_us"] / 1e6)
        yield from families.values()
        yield per_burst
        yield max_gap

    def _fdb(self):
        s = self.switch.fib.stats()
        yield GaugeMetricFamily(f"{PREFIX}_fdb_entries", "MAC table entries.", value=s["entries"])
        yield GaugeMetricFamily(f"{PREFIX}_fdb_max_entries", "MAC table capacity (fdb.max_entries).",
                                value=s["max_entries"])
        for key, doc in (("learned", "MACs learned."), ("moved", "MACs that moved to another port."),
                         ("aged", "Entries aged out."), ("evicted", "Entries evicted for room."),
                         ("refused", "MACs not learned: their hash bucket was full.")):
            yield CounterMetricFamily(f"{PREFIX}_fdb_{key}", doc, value=s[key])


class MetricsServer:
    """GET /metrics on the switch's event loop."""

    def __init__(self, switch, listen: str):
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SwitchCollector(switch))
        self.server: asyncio.base_events.Server | None = None
        self.scrapes = 0

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"metrics: cannot listen on {self.host}:{self.port}: {reason}") from None
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            method, path, *_ = lines[0].split(" ") + ["", ""]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if method != "GET":
                await self._reply(writer, "405 Method Not Allowed", "text/plain", b"GET /metrics\n")
            elif path.split("?")[0] != "/metrics":
                await self._reply(writer, "404 Not Found", "text/plain", b"the metrics are at /metrics\n")
            else:
                encoder, content_type = choose_encoder(headers.get("accept", ""))
                self.scrapes += 1
                body = encoder(self.registry)
                await self._reply(writer, "200 OK", content_type, body)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass   # a client that went away or never finished its request
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: str, content_type: str, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
