"""The MAC learning table (fib.c) through its C API and the Python view."""

import pytest

from vswitch.fib import FibError, MacTable, format_mac, parse_mac
from vswitch.native import ffi, lib


def key(mac: str, vlan: int = 0) -> int:
    return lib.vs_fib_key(parse_mac(mac), vlan)


def mac_n(n: int) -> str:
    return format_mac(0x020000000000 | n)


@pytest.fixture
def table():
    t = MacTable(max_entries=16, aging_seconds=300)
    yield t
    t.close()


def learn(t: MacTable, mac: str, port: int, now: int = 1000):
    lib.vs_fib_lock(t.c)
    lib.vs_fib_learn(t.c, key(mac), port, now)
    lib.vs_fib_unlock(t.c)


def test_learn_and_lookup(table):
    learn(table, "02:00:00:00:00:01", 3)
    assert table.lookup("02:00:00:00:00:01") == 3
    assert table.lookup("02:00:00:00:00:02") is None
    assert table.stats()["learned"] == 1


def test_key_keeps_mac_and_vlan_apart():
    assert key("02:00:00:00:00:01", 0) != key("02:00:00:00:00:01", 5)
    assert format_mac(key("aa:bb:cc:dd:ee:ff", 7)) == "aa:bb:cc:dd:ee:ff"


def test_entry_moves_to_new_port(table):
    learn(table, "02:00:00:00:00:01", 1)
    learn(table, "02:00:00:00:00:01", 2)
    assert table.lookup("02:00:00:00:00:01") == 2
    assert table.stats()["moved"] == 1
    assert len(table.entries()) == 1


def test_aging_removes_only_idle_entries(table):
    table.aging_seconds = 10
    now = lib.vs_now_sec()
    learn(table, "02:00:00:00:00:01", 1, now - 20)
    learn(table, "02:00:00:00:00:02", 1, now)
    assert table.age() == 1
    assert table.lookup("02:00:00:00:00:01") is None
    assert table.lookup("02:00:00:00:00:02") == 1
    assert table.stats()["aged"] == 1


def test_static_entries_are_not_learned_over_or_aged(table):
    table.add_static("02:00:00:00:00:09", 4)
    learn(table, "02:00:00:00:00:09", 1, 0)
    assert table.lookup("02:00:00:00:00:09") == 4
    table.aging_seconds = 1
    assert table.age() == 0
    [entry] = table.entries()
    assert entry.static and entry.port_no == 4
    assert table.flush() == 0  # a flush keeps static entries
    assert table.flush(include_static=True) == 1


def test_flooding_port_cannot_evict_other_ports(table):
    # Port 1 owns three entries; port 2 then floods random source MACs.
    for i in range(3):
        learn(table, mac_n(i), 1)
    for i in range(100, 1100):
        learn(table, mac_n(i), 2)
    assert all(table.lookup(mac_n(i)) == 1 for i in range(3))
    assert len(table.entries()) == 16
    assert table.stats()["evicted"] == 1000 - 13


def test_eviction_takes_the_oldest_of_the_largest_port(table):
    for i in range(10):
        learn(table, mac_n(i), 1, now=1000 + i)
    for i in range(10, 16):
        learn(table, mac_n(i), 2, now=1000 + i)
    learn(table, mac_n(99), 3, now=2000)
    assert table.lookup(mac_n(0)) is None  # port 1's oldest
    assert table.lookup(mac_n(1)) == 1
    assert table.lookup(mac_n(99)) == 3


def test_flush_by_port(table):
    learn(table, mac_n(1), 1)
    learn(table, mac_n(2), 2)
    assert table.flush(1) == 1
    assert table.lookup(mac_n(1)) is None and table.lookup(mac_n(2)) == 2


def test_set_max_evicts_down_to_the_new_limit(table):
    for i in range(16):
        learn(table, mac_n(i), i % 4)
    table.max_entries = 4
    assert len(table.entries()) == 4
    with pytest.raises(FibError):
        table.max_entries = 0


def test_remove(table):
    learn(table, mac_n(1), 1)
    assert table.remove(mac_n(1))
    assert not table.remove(mac_n(1))


def test_many_entries_stay_consistent():
    t = MacTable(max_entries=8192)
    try:
        for i in range(20000):
            learn(t, mac_n(i * 7919), i % 5)
        entries = t.entries()
        assert len(entries) == 8192
        assert len({e.mac for e in entries}) == 8192
        for e in entries[:500]:
            assert t.lookup(e.mac) == e.port_no
    finally:
        t.close()


@pytest.mark.parametrize("bad", ["", "02:00:00:00:00", "zz:00:00:00:00:00", "0200.0000.0001"])
def test_bad_mac_is_refused(table, bad):
    with pytest.raises(FibError):
        table.add_static(bad, 1)


def test_struct_sizes_match_the_header():
    # The header is the one declaration: cffi and the compiler must agree on it.
    assert ffi.sizeof("struct virtq_desc") == 16
    assert ffi.sizeof("struct virtq_used_elem") == 8
    assert ffi.offsetof("struct vs_fib_entry", "port_no") == 16


def test_control_plane_learn_moves_an_entry(table):
    learn(table, "02:00:00:00:00:01", 1)
    table.learn("02:00:00:00:00:01", 5)
    assert table.lookup("02:00:00:00:00:01") == 5
    assert table.stats()["moved"] == 1
