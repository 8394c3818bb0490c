"""The Prometheus endpoint (`metrics: {listen: HOST:PORT}`), scraped and parsed as Prometheus would."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.support.daemon import Vswitchd
from tests.support.frames import BROADCAST, frame, mac, wait_for
from vswitch.config import ConfigError, parse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def samples(text: str, parser=parse_text) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} for every sample of every family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser(text) for s in family.samples}


@pytest.fixture
def switch(tmp_path):
    port = free_port()
    ports = [{"name": f"vm{i}", "type": "vhost-user", "path": str(tmp_path / f"vm{i}.sock")} for i in range(2)]
    with Vswitchd(tmp_path, ports=ports, extra={"metrics": {"listen": f"127.0.0.1:{port}"}}) as d:
        guests = d.connect_guests(["vm0", "vm1"])
        yield d, guests, f"http://127.0.0.1:{port}/metrics"
        for fe in guests:
            fe.close()


def test_counters_of_ports_queues_pmds_and_the_fdb(switch):
    d, (g0, g1), url = switch
    for _ in range(3):
        g0.send_frame(0, frame(BROADCAST, mac(1)))
    assert len(g1.receive(0, 3, timeout=2)) == 3
    g1.send_frame(0, frame(mac(1), mac(2), b"x" * 100))
    assert len(g0.receive(0, 1, timeout=2)) == 1
    # A malformed chain from vm0: counted as an error with its reason.
    ring = g0.tx_ring(0)
    ring.write_desc(200, 0xdead00000000, 64, 0, 0)
    ring.publish_raw(200)
    g0.kick(ring.index)
    wait_for(lambda: d.port("vm0")["stats"]["rx_errors"] == 1, what="the error counted")

    content_type, text = scrape(url)
    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(text)
    vm0, vm1 = (("port", "vm0"), ("type", "vhost-user")), (("port", "vm1"), ("type", "vhost-user"))
    assert got[("vswitch_port_rx_packets_total", vm0)] == 3
    assert got[("vswitch_port_tx_packets_total", vm1)] == 3
    assert got[("vswitch_port_rx_packets_total", vm1)] == 1
    assert got[("vswitch_port_tx_bytes_total", vm0)] == len(frame(mac(1), mac(2), b"x" * 100))
    assert got[("vswitch_port_link_up", vm0)] == 1
    assert got[("vswitch_port_capture_dropped_total", vm0)] == 0
    assert got[("vswitch_port_errors_total", tuple(sorted(vm0 + (("direction", "rx"),
                                                                 ("reason", "buffer outside guest memory")))))] == 1
    assert got[("vswitch_port_errors_total", tuple(sorted(vm0 + (("direction", "rx"), ("reason", "port")))))] == 0
    assert got[("vswitch_port_dropped_total", tuple(sorted(vm1 + (("direction", "tx"),
                                                                  ("reason", "link_down")))))] == 0
    queue = tuple(sorted(vm0 + (("queue", "0"), ("direction", "rx"))))
    assert got[("vswitch_queue_packets_total", queue)] == 3
    pmd = next(k for k in got if k[0] == "vswitch_pmd_packets_total")
    assert got[pmd] == 4
    assert got[("vswitch_fdb_learned_total", ())] == 2 and got[("vswitch_fdb_entries", ())] == 2
    for name in ("vswitch_pmd_busy_cycles_total", "vswitch_pmd_idle_cycles_total", "vswitch_pmd_sleeps_total",
                 "vswitch_pmd_packets_per_burst", "vswitch_fdb_moved_total", "vswitch_fdb_aged_total",
                 "vswitch_fdb_evicted_total", "vswitch_fdb_max_entries"):
        assert any(k[0] == name for k in got), f"{name} missing"


def test_openmetrics_when_asked_and_a_port_removed_leaves_the_scrape(switch):
    d, _, url = switch
    content_type, text = scrape(url, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    got = samples(text, parse_openmetrics)
    assert ("vswitch_port_link_up", (("port", "vm1"), ("type", "vhost-user"))) in got
    d.ctl("del-port", "vm1")
    assert not any(dict(labels).get("port") == "vm1" for _, labels in samples(scrape(url)[1]))


def test_other_paths_and_methods_are_refused(switch):
    _, _, url = switch
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=5)
    assert err.value.code == 405
    # A client that connects and says nothing does not hold the endpoint up.
    host, port = url.split("/")[2].split(":")
    with socket.create_connection((host, int(port))):
        assert scrape(url)[1]


@pytest.mark.parametrize("metrics, error", [
    ({"listen": "9477"}, "metrics.listen: '9477' must be HOST:PORT"),
    ({"listen": "127.0.0.1:99999"}, "with a port from 1 to 65535"),
    ({"listen": 9477}, "metrics.listen: 9477 must be HOST:PORT"),
    ({"port": 9477}, "metrics: unknown key 'port'"),
])
def test_bad_metrics_config(metrics, error):
    with pytest.raises(ConfigError) as exc:
        parse({"metrics": metrics}, "my.yaml")
    assert any(error in p for p in exc.value.problems), exc.value.problems


def test_a_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Vswitchd(tmp_path, ports=[], extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
        with pytest.raises(RuntimeError) as exc:
            d.start()
        assert f"vswitchd: metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in str(exc.value)


def test_rows_counting_both_directions_become_two():
    """AF_XDP's per-queue rows count receive and transmit in one row; the metrics split them."""
    from vswitch.metrics import by_direction

    rows = by_direction([{"queue": 1, "rx_packets": 5, "rx_bytes": 300, "rx_dropped": 1, "tx_packets": 7,
                          "tx_bytes": 420, "tx_errors": 2, "tx_ring_full": 3},
                         {"queue": 0, "direction": "rx", "packets": 1, "bytes": 60, "dropped": 0, "errors": 0}])
    assert rows == [{"queue": 1, "direction": "rx", "packets": 5, "bytes": 300, "dropped": 1, "errors": 0},
                    {"queue": 1, "direction": "tx", "packets": 7, "bytes": 420, "dropped": 0, "errors": 2},
                    {"queue": 0, "direction": "rx", "packets": 1, "bytes": 60, "dropped": 0, "errors": 0}]


def test_vxlan_polls_and_pmd_yields_are_scraped(tmp_path):
    """The VXLAN port's receive-poll counters and the PMD's yields, each between two readings of the
    control socket taken around the scrape (the PMD never sleeps here, so they move all the time)."""
    port = free_port()
    vx = {"name": "vx", "type": "vxlan", "local_ip": "127.0.0.1", "remote": ["127.0.0.2"], "vni": 5,
          "dst_port": free_udp_port()}
    extra = {"metrics": {"listen": f"127.0.0.1:{port}"}, "pmd": {"sleep": False, "yield": True}}
    with Vswitchd(tmp_path, ports=[vx], extra=extra) as d:
        wait_for(lambda: d.port("vx")["stats"]["rx_polls_skipped"] > 0, what="the port's receive backoff")
        before_port, before_pmd = d.port("vx")["stats"], d.ctl("pmd-stats")["pmds"][0]
        got = samples(scrape(f"http://127.0.0.1:{port}/metrics")[1])
        after_port, after_pmd = d.port("vx")["stats"], d.ctl("pmd-stats")["pmds"][0]
    ids = (("port", "vx"), ("type", "vxlan"))
    for key in ("rx_polls", "rx_empty_polls", "rx_polls_skipped"):
        assert before_port[key] <= got[(f"vswitch_port_{key}_total", ids)] <= after_port[key], key
    pmd = next(labels for name, labels in got if name == "vswitch_pmd_yields_total")
    assert 0 < before_pmd["yields"] <= got[("vswitch_pmd_yields_total", pmd)] <= after_pmd["yields"]
    for key in ("yield_sleeps", "shared_sleeps"):
        assert before_pmd[key] <= got[(f"vswitch_pmd_{key}_total", pmd)] <= after_pmd[key], key
    # Ports without receive polls of their own have no such series.
    assert all(dict(labels)["type"] == "vxlan" for name, labels in got if name == "vswitch_port_rx_polls_total")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
