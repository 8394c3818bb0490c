"""The ring engines' work per frame on the benchmark's virtio paths, counted
in instructions by valgrind's callgrind over tools/ring_cost.py (two vhost
ports with their rings laid out as DPDK virtio-user lays them out), which is
exact where cycle counts on a shared host are not.  README "Throughput per
virtio path" has the figures."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import IN_CI
from tests.support.callgrind import require_valgrind
from tools import ring_cost

PASSES = 20


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """counted(path, size): tools.ring_cost's callgrind figures, each configuration run once."""
    require_valgrind()
    out = tmp_path_factory.mktemp("ring-cost")
    cache: dict[tuple[str, int], dict] = {}

    def get(path: str, size: int) -> dict:
        if (path, size) not in cache:
            cache[path, size] = ring_cost.callgrind(path, size, PASSES, str(out))
        return cache[path, size]
    return get


@pytest.mark.parametrize("size", [64, 1518])
def test_mergeable_buffers_leave_a_frame_that_fits_one_buffer_on_the_same_path(counted, size):
    """With mergeable RX buffers a frame that fits the driver's buffer takes the
    one-descriptor path, as without them: the same instructions on both sides."""
    with_mrg, without = counted("packed", size), counted("packed-no-mrg", size)
    print(f"{size} B instructions per frame, packed with / without mergeable buffers: "
          f"enqueue {with_mrg['enqueue']:.1f} / {without['enqueue']:.1f}, "
          f"dequeue {with_mrg['dequeue']:.1f} / {without['dequeue']:.1f}")
    assert with_mrg["enqueue"] > 0 and with_mrg["dequeue"] > 0
    assert abs(with_mrg["enqueue"] - without["enqueue"]) < 0.5
    assert abs(with_mrg["dequeue"] - without["dequeue"]) < 0.5


@pytest.mark.parametrize("size", [64, 1518])
def test_a_packed_pass_costs_no_more_than_a_split_one(counted, size):
    """Packed rings take one-descriptor chains four at a time, one cache line
    (packed_ring.c batch_*): with that a pass forwards a frame in fewer
    instructions than on split rings (one at a time, it took 30 more)."""
    packed, split = counted("packed", size), counted("split", size)
    print(f"{size} B instructions per frame, packed / split: pass {packed['pass']:.1f} / {split['pass']:.1f}, "
          f"dequeue {packed['dequeue']:.1f} / {split['dequeue']:.1f}, "
          f"enqueue {packed['enqueue']:.1f} / {split['enqueue']:.1f}")
    assert 0 < packed["pass"] <= split["pass"]


@pytest.mark.parametrize("path", ["split", "packed"])
def test_the_receive_header_is_compared_without_a_library_call(counted, path):
    """The header compare (ring_internal.h fill_net_hdr) runs on every frame; a
    memcmp() call for 12 bytes cost more than the rest of the header's work."""
    functions = counted(path, 64)["functions"]
    assert functions.get("vs_pmd_poll_once", 0) > 0, sorted(functions)
    assert not {f: n for f, n in functions.items() if "memcmp" in f}


def test_the_packed_ring_divides_nowhere():
    """A ring position moves on by a shift, not by t / size: the size is not a
    constant, so that is an integer division (tens of cycles), and it ran up to
    three times per frame."""
    objdump = shutil.which("objdump")
    if objdump is None:
        if IN_CI:
            pytest.fail("objdump is missing although the build needs binutils")
        pytest.skip("objdump not found (Debian package binutils)")
    import vswitch.native  # noqa: F401  (refuses a stale build)
    import vswitch._native
    so = vswitch._native.__file__
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", so], check=True, capture_output=True,
                         text=True).stdout
    found = {}
    for fn in ("vs_packed_dequeue_burst", "vs_packed_dequeue_done", "vs_packed_enqueue_burst"):
        body = re.search(rf"^[0-9a-f]+ <{fn}>:\n(.*?)\n\n", asm, re.M | re.S)
        assert body, fn
        found[fn] = re.findall(r"\t(i?div\w*)\s", body.group(1))
    assert found == {fn: [] for fn in found}
