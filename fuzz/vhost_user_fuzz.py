"""Fuzzer for the vhost-user message handlers (vswitch/vhost/connection.py,
device.py and protocol.py), with atheris when it is installed, else a seeded
random loop.

Each input is a session: a front-end on one end of a socketpair sends a
sequence of messages built from the input (mostly well-formed requests with
chosen fields, some mutated, some raw bytes, some split across sends or sent
two at a time) with real fds attached (memfds as guest memory, eventfds,
pipes, sockets, /dev/null; sometimes too many or too few).  The back-end
handles them exactly as in the daemon (VhostUserConnection._on_readable on a
registered but never-run asyncio loop), and each input may start with a
valid handshake so that the fuzzer works on a running device.

Invariants checked after every message, beyond "no exception escapes":
  - no internal error was logged (an exception the back-end did not expect);
  - the C side matches the back-end: a vring is enabled in C exactly when
    the back-end says it started, with the size it was given, and its desc,
    avail and used rings lie wholly inside a region mapped for this session;
  - dev.mem is the back-end's current memory table (NULL without one);
  - started rings survive the ring engine (a dequeue or an enqueue burst
    over whatever the guest memory holds).
And after each session, once the connection is closed: no fd and no
mapping is left behind, and every vring is disabled.

Counts go to FUZZ_STATS_FILE (messages, sessions) every half second.

    python fuzz/vhost_user_fuzz.py [--engine atheris|random] [libFuzzer flags, e.g. -max_total_time=20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import pathlib
import random
import socket
import struct
import sys
import time

# The package under test: this checkout, or (tools/fuzz.py --sanitized-python)
# a copy whose fast path was built with VSWITCH_SANITIZE=1.
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("VSWITCH_FUZZ_PKG") or str(ROOT))

QUEUES = 2
MEM_SIZE = 64 << 10             # each guest memory file
UVA_BASE = 0x7F0000000000
GPA_BASE = 0x100000
MAX_MESSAGES = 48               # per input

STATS_FILE = os.environ.get("FUZZ_STATS_FILE")


class Reader:
    """The fuzzer's bytes as the choices of one session; zeros once used up."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return 0

    def uint(self, nbytes: int) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += len(chunk)
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little")

    def bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def pick(self, seq):
        return seq[self.u8() % len(seq)]


class InternalErrors(logging.Handler):
    """Collects what the back-end logs with a traceback: a bug, not bad input."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.exc_info or "internal error" in record.getMessage():
            self.records.append(record)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Session:
    """One back-end and the front-end end of its socket."""

    def __init__(self, native, backend_mod, protocol):
        self.ffi, self.lib = native.ffi, native.lib
        self.protocol = protocol
        self.loop = asyncio.new_event_loop()       # registered with, never run
        self.dev = self.ffi.new("struct vs_vhost_dev *")
        self.lib.vs_vhost_dev_init(self.dev, QUEUES)
        self.backend = backend_mod.VhostUserBackend(
            "fuzz0", "/nonexistent/fuzz.sock", "server", QUEUES, self.dev, lambda: None,
            lambda kind, fields: None, loop=self.loop, on_rarp=lambda mac: None, iommu=True)
        self.front: socket.socket | None = None
        self.pkts = self.ffi.new("struct vs_pkt[32]")
        self.frame = self.ffi.new("struct vs_pkt *")
        self.frame_bytes = self.ffi.new("uint8_t[]", bytes(range(64)) * 2)
        self.frame.nsegs = 1
        self.frame.len = 128
        self.frame.segs[0].addr = self.frame_bytes
        self.frame.segs[0].len = 128
        self.frame_ptrs = self.ffi.new("struct vs_pkt *[1]", [self.frame])
        self.messages = 0

    def connect(self) -> None:
        front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        front.setblocking(False)
        self.front = front
        self.backend.connection.attach(back)

    def disconnect(self) -> None:
        if self.backend.connected:
            self.backend.connection.close("fuzz session over")
        if self.front is not None:
            self.front.close()
            self.front = None

    def send(self, chunks: list[bytes], fds: list[int], drain: bool) -> None:
        if not self.backend.connected:
            self.disconnect()
            self.connect()
        for i, chunk in enumerate(chunks):
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds and i == 0 else []
            try:
                self.front.sendmsg([chunk], anc)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError):
                break
            self.backend.connection._on_readable()
            if not self.backend.connected:
                break
        if drain and self.front is not None:
            try:
                while self.front.recv(65536):
                    pass
            except (BlockingIOError, ConnectionResetError, OSError):
                pass

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        ffi, lib, device = self.ffi, self.lib, self.backend.device
        spans = []
        for region in device._regions:
            base = int(ffi.cast("uintptr_t", region.buffer))
            spans.append((base, base + len(region.mapping)))
        if device._memtable is None:
            assert self.dev.mem == ffi.NULL, "dev.mem set without a memory table"
        else:
            assert self.dev.mem == device._memtable, "dev.mem is not the device's memory table"
            for i in range(self.dev.mem.nregions):
                r = self.dev.mem.regions[i]
                host = int(ffi.cast("uintptr_t", r.host_addr))
                assert any(lo <= host and host + r.size <= hi for lo, hi in spans), \
                    f"memory region {i} (size {r.size:#x}) is not inside a mapping"

        # Rings must lie inside one region as the front-end described it (not merely
        # inside our mapping, which is rounded up to whole pages).
        regions = []
        if self.dev.mem != ffi.NULL:
            for i in range(self.dev.mem.nregions):
                r = self.dev.mem.regions[i]
                host = int(ffi.cast("uintptr_t", r.host_addr))
                regions.append((host, host + r.size))

        def inside(ptr, length):
            addr = int(ffi.cast("uintptr_t", ptr))
            return any(lo <= addr and addr + length <= hi for lo, hi in regions)

        for ring in device._rings:
            vr = self.dev.vrings[ring.index]
            enabled = bool(vr.enabled)
            assert enabled == ring.started, f"vring {ring.index}: C enabled {enabled}, back-end started {ring.started}"
            if not ring.started:
                continue
            size = vr.size
            assert size == ring.size, f"vring {ring.index}: C size {size}, back-end {ring.size}"
            packed = bool(vr.packed)
            assert packed == bool(device.features >> self.protocol.VIRTIO_F_RING_PACKED & 1), \
                f"vring {ring.index}: layout packed={packed}, features {device.features:#x}"
            if packed:
                pk = vr.pk
                assert inside(pk.desc, 16 * size), f"vring {ring.index}: packed desc outside guest memory"
                assert inside(pk.driver_event, 4), f"vring {ring.index}: driver event outside guest memory"
                assert inside(pk.device_event, 4), f"vring {ring.index}: device event outside guest memory"
                assert pk.avail_idx < size and pk.used_idx < size, f"vring {ring.index}: index past the ring"
            else:
                assert inside(vr.desc, 16 * size), f"vring {ring.index}: desc outside guest memory"
                assert inside(vr.avail, 4 + 2 * size + 2), f"vring {ring.index}: avail outside guest memory"
                assert inside(vr.used, 4 + 8 * size + 2), f"vring {ring.index}: used outside guest memory"
            # The ring engine on whatever the guest memory holds, through the engine of the ring's layout.
            ptr = self.dev.vrings + ring.index
            if not lib.vs_vring_is_enabled(ptr):
                continue
            dequeue, done, enqueue = ((lib.vs_packed_dequeue_burst, lib.vs_packed_dequeue_done,
                                       lib.vs_packed_enqueue_burst) if packed else
                                      (lib.vs_vring_dequeue_burst, lib.vs_vring_dequeue_done,
                                       lib.vs_vring_enqueue_burst))
            if ring.index % 2:
                n = dequeue(self.dev, ptr, self.pkts, 32)
                done(self.dev, ptr, self.pkts, n)
            else:
                enqueue(self.dev, ptr, self.frame_ptrs, 1)

    def check_closed(self, baseline_fds: set[str]) -> None:
        device = self.backend.device
        assert not device._regions and device._memtable is None, "mappings left after disconnect"
        assert self.dev.mem == self.ffi.NULL, "dev.mem left after disconnect"
        for i in range(2 * QUEUES):
            assert not self.dev.vrings[i].enabled, f"vring {i} enabled after disconnect"
        leaked = open_fds() - baseline_fds
        # listdir's own fd may show up; anything else is a leak.
        leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not leaked, f"fds left open after disconnect: " + ", ".join(
            f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(leaked))


class Generator:
    """Turns a Reader into messages and fds."""

    def __init__(self, protocol, messages):
        self.p = protocol
        self.messages = messages
        P = protocol.Request
        self.handled = sorted(messages)
        self.all_requests = list(P)
        self.ring_uvas = [UVA_BASE + 0x1000, UVA_BASE + 0x3000, UVA_BASE + 0x5000, UVA_BASE + 0x7000]

    def memfd(self, r: Reader, size: int) -> int:
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        seed = r.uint(4)
        if seed & 1:
            # Random ring contents: the engine must cope with them too.
            rnd = random.Random(seed)
            os.pwrite(fd, rnd.randbytes(min(size, 0x9000)), 0)
        return fd

    def fd_of_kind(self, r: Reader, kind: int, opened: list[int]) -> int:
        kind %= 6
        if kind <= 2:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == 3:
            rd, wr = os.pipe2(os.O_CLOEXEC)
            opened.append(rd)
            fd = wr
        elif kind == 4:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = self.memfd(r, r.pick([0, 4096, MEM_SIZE]))
        opened.append(fd)
        return fd

    def region(self, r: Reader, i: int):
        mode = r.u8()
        if mode < 0xC0:
            size = MEM_SIZE if mode & 1 else 4096 * (1 + r.u8() % 16)
            return self.p.MemoryRegion(GPA_BASE + i * MEM_SIZE, size, UVA_BASE + i * MEM_SIZE,
                                       0 if mode & 2 else 4096 * (r.u8() % 4))
        return self.p.MemoryRegion(r.uint(8), r.uint(8) if mode & 1 else r.uint(3), r.uint(8), r.uint(8) if mode & 2 else 0)

    def message(self, r: Reader, opened: list[int]):
        """One message: (bytes, fds)."""
        p = self.p
        mode = r.u8()
        if mode < 0xB0:
            request = r.pick(self.handled)
        elif mode < 0xD0:
            request = r.pick(self.all_requests)
        else:
            request = r.uint(4) if mode > 0xF0 else r.u8()
        flags = p.VERSION
        fl = r.u8()
        if fl & 1:
            flags |= p.FLAG_NEED_REPLY
        if fl >= 0xF0:
            flags = r.uint(4)

        payload = b""
        fds: list[int] = []
        rule = self.messages.get(request) if isinstance(request, p.Request) or request in self.messages else None
        if rule is not None:
            shape = rule.payload
            if shape is p.Payload.U64:
                v = r.u8()
                if request == p.Request.SET_FEATURES:
                    offered = p.OFFERED_FEATURES | p.bits(p.VIRTIO_F_ACCESS_PLATFORM)   # the port has iommu: true
                    value = offered & r.uint(8) if v < 0xE0 else r.uint(8)
                elif request == p.Request.SET_PROTOCOL_FEATURES:
                    value = p.OFFERED_PROTOCOL_FEATURES & r.uint(4) if v < 0xE0 else r.uint(8)
                elif request == p.Request.SET_STATUS:
                    value = r.u8() if v < 0xE0 else r.uint(8)
                else:
                    value = r.uint(2) if v < 0xE0 else r.uint(8)
                payload = p.pack_u64(value)
            elif shape is p.Payload.VRING_STATE:
                index = r.u8() % 5 if r.u8() < 0xF0 else r.uint(4)
                v = r.u8()
                num = 1 << (v % 10) if v < 0x80 else (v & 1 if v < 0xC0 else r.uint(4))
                payload = p.pack_vring_state(index, num)
            elif shape is p.Payload.VRING_ADDR:
                index = r.u8() % 5
                v = r.u8()
                if v < 0xA0:
                    desc, avail, used = (self.ring_uvas[(v + k) % 4] + 0x100 * (r.u8() % 4) * (v & 1)
                                         for k in range(3))
                elif v < 0xC0:
                    # Just before a page boundary, where the regions above may end: rings straddling it.
                    desc, avail, used = (UVA_BASE + (MEM_SIZE if r.u8() & 1 else 4096 * (1 + r.u8() % 16))
                                         - 16 * (r.u8() % 64) for _ in range(3))
                else:
                    desc, avail, used = r.uint(8), r.uint(8), r.uint(8)
                payload = p.pack_vring_addr(index, desc, used, avail, flags=r.u8() & 1, log=0)
            elif shape is p.Payload.VRING_FD:
                v = r.u8()
                nofd = bool(v & 1)
                value = (r.u8() % 5) | (p.VRING_NOFD if nofd else 0)
                if v >= 0xF0:
                    value = r.uint(8)
                payload = p.pack_u64(value)
                if not nofd:
                    fds.append(self.fd_of_kind(r, r.u8(), opened))
            elif shape is p.Payload.IOTLB:
                # Mostly pages of the regions below, sometimes anything (wraps, size 0, bad perm and type).
                v = r.u8()
                iova = GPA_BASE + 4096 * (r.u8() % 32) if v < 0xC0 else r.uint(8)
                size = 4096 * (1 + r.u8() % 4) if v & 1 == 0 else r.uint(8)
                uaddr = UVA_BASE + 4096 * (r.u8() % 32) if v & 2 == 0 else r.uint(8)
                perm = 1 + r.u8() % 3 if v & 4 == 0 else r.u8()
                kind = 2 + r.u8() % 2 if v & 8 == 0 else r.u8()
                payload = p.pack_iotlb_msg(iova, size, uaddr, perm, kind)
            elif shape is p.Payload.MEMORY:
                n = 1 + r.u8() % 3
                regions = [self.region(r, i) for i in range(n)]
                payload = p.pack_memory_table(regions)
                for reg in regions:
                    size = reg.mmap_offset + reg.size
                    fd_size = size if size <= 8 * MEM_SIZE and r.u8() < 0xE0 else r.pick([0, 4096, MEM_SIZE])
                    fds.append(self.memfd(r, fd_size))
                    opened.append(fds[-1])
            elif shape is p.Payload.MEMORY_REGION:
                # ADD_MEM_REG / REM_MEM_REG: one region, its memfd for ADD (and sometimes a stray one for REM).
                reg = self.region(r, r.u8() % 4)
                payload = p.pack_memory_region(reg)
                if rule.fds is p.Fds.ONE or r.u8() >= 0xF0:
                    size = reg.mmap_offset + reg.size
                    fds.append(self.memfd(r, size if size <= 8 * MEM_SIZE and r.u8() < 0xE0 else
                                          r.pick([0, 4096, MEM_SIZE])))
                    opened.append(fds[-1])
            if rule.fds is p.Fds.ONE and shape is not p.Payload.MEMORY_REGION:
                fds.append(self.fd_of_kind(r, r.u8(), opened))
        else:
            payload = r.bytes(r.u8() % 40)

        # Mutations: the payload, the fds, the size field.
        m = r.u8()
        if m >= 0xE0:
            payload = bytearray(payload or b"\0")
            for _ in range(1 + m % 4):
                payload[r.u8() % len(payload)] = r.u8()
            payload = bytes(payload)
        elif m >= 0xD8:
            payload = payload[:r.u8() % (len(payload) + 1)]
        elif m >= 0xD0:
            payload += r.bytes(r.u8() % 16)
        m = r.u8()
        if m >= 0xF0:
            fds.append(self.fd_of_kind(r, r.u8(), opened))
        elif m >= 0xE8 and fds:
            fds.pop()
        elif m == 0xE7:
            fds.extend(self.fd_of_kind(r, 0, opened) for _ in range(9))
        size = len(payload) if r.u8() < 0xF8 else r.uint(2) % 5000
        header = p.HEADER.pack(int(request) & 0xFFFFFFFF, flags & 0xFFFFFFFF, size)
        return header + payload, fds

    def handshake(self, r: Reader, opened: list[int]):
        """A valid session start: features, memory, two rings of queue pair 0."""
        p = self.p
        R = p.Request
        out = [(p.encode_message(R.GET_FEATURES), []),
               (p.encode_message(R.SET_FEATURES, p.pack_u64(
                   (p.OFFERED_FEATURES | p.bits(p.VIRTIO_F_ACCESS_PLATFORM)) & (r.uint(8) | p.bits(
                   p.VHOST_USER_F_PROTOCOL_FEATURES)))), []),
               (p.encode_message(R.SET_PROTOCOL_FEATURES, p.pack_u64(p.OFFERED_PROTOCOL_FEATURES)), [])]
        fd = self.memfd(r, MEM_SIZE)
        opened.append(fd)
        region = p.MemoryRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)
        out.append((p.encode_message(R.SET_MEM_TABLE, p.pack_memory_table([region])), [fd]))
        for index in (0, 1):
            size = 1 << (1 + r.u8() % 8)
            base = self.ring_uvas[2 * index]
            out += [(p.encode_message(R.SET_VRING_NUM, p.pack_vring_state(index, size)), []),
                    (p.encode_message(R.SET_VRING_ADDR, p.pack_vring_addr(index, base, base + 0x1000, base + 0x800)), []),
                    (p.encode_message(R.SET_VRING_BASE, p.pack_vring_state(index, r.uint(2))), [])]
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            opened += [kick, call]
            out += [(p.encode_message(R.SET_VRING_KICK, p.pack_vring_fd(index)), [kick]),
                    (p.encode_message(R.SET_VRING_CALL, p.pack_vring_fd(index)), [call]),
                    (p.encode_message(R.SET_VRING_ENABLE, p.pack_vring_state(index, 1)), [])]
        return out


class Harness:
    def __init__(self):
        from vswitch import native
        from vswitch.vhost import backend as backend_mod, guestmem, protocol
        from vswitch.vhost.device import MESSAGES

        logging.getLogger("vswitch").setLevel(logging.ERROR)
        logging.getLogger("vswitch").propagate = False
        self.errors = InternalErrors()
        logging.getLogger("vswitch").addHandler(self.errors)
        self.session = Session(native, backend_mod, protocol)
        self.gen = Generator(protocol, MESSAGES)
        self.inputs = 0
        self.last_stats = 0.0
        # The fault handler's process-wide wake-up eventfd is made once, on first use: make it now.
        guestmem.install()
        self.baseline = open_fds()

    def one(self, data: bytes) -> None:
        r = Reader(data)
        s = self.session
        opened: list[int] = []
        try:
            s.connect()
            messages = self.gen.handshake(r, opened) if r.u8() & 1 else []
            while len(messages) < MAX_MESSAGES and r.left > 0:
                messages.append(self.gen.message(r, opened))
            pending = None
            for data_, fds in messages:
                how = r.u8()
                if pending is not None:
                    # Two messages in one send; fds with the first.
                    s.send([pending[0] + data_], pending[1] + fds, drain=True)
                    pending = None
                elif how >= 0xF0 and not fds:
                    pending = (data_, fds)
                    continue
                elif how >= 0xE0 and len(data_) > 1:
                    cut = 1 + r.u8() % (len(data_) - 1)
                    s.send([data_[:cut], data_[cut:]], fds, drain=how != 0xEF)
                else:
                    s.send([data_], fds, drain=how != 0xDF)
                s.messages += 1
                self.check_errors()
                s.check()
            if pending is not None:
                s.send([pending[0]], pending[1], drain=True)
                s.messages += 1
        finally:
            for fd in opened:
                try:
                    os.close(fd)
                except OSError:
                    pass
            s.disconnect()
        self.check_errors()
        s.check_closed(self.baseline)
        self.inputs += 1
        self.maybe_write_stats()

    def check_errors(self) -> None:
        if self.errors.records:
            rec = self.errors.records[0]
            text = logging.Formatter().format(rec)
            raise AssertionError(f"the back-end logged an internal error: {text}")

    def maybe_write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if STATS_FILE and (force or now - self.last_stats > 0.5):
            self.last_stats = now
            tmp = STATS_FILE + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"inputs {self.inputs}\nmessages {self.session.messages}\n")
            os.replace(tmp, STATS_FILE)


def run_random(harness: Harness, seconds: float, seed: int, seed_dirs: list[str] = ()) -> None:
    """A seeded mutational loop: the seed files first, then random inputs and
    mutations of earlier ones."""
    rnd = random.Random(seed)
    pool: list[bytes] = [f.read_bytes() for d in seed_dirs for f in sorted(pathlib.Path(d).glob("*"))
                         if f.is_file()]
    queue = list(pool)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if queue:
            data = queue.pop(0)
        elif pool and rnd.random() < 0.5:
            data = bytearray(rnd.choice(pool))
            for _ in range(rnd.randint(1, 8)):
                if data:
                    data[rnd.randrange(len(data))] = rnd.randrange(256)
            data = bytes(data)
        else:
            data = rnd.randbytes(rnd.randint(1, 1024))
        try:
            harness.one(data)
        except Exception:
            print(f"vhost_user_fuzz: failing input (hex): {data.hex()}", file=sys.stderr)
            raise
        if len(pool) < 256:
            pool.append(data)
        else:
            pool[rnd.randrange(256)] = data
    harness.maybe_write_stats(force=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["atheris", "random"], default=None,
                        help="default: atheris if installed, else random")
    parser.add_argument("--seconds", type=float, default=20.0, help="random engine: how long")
    parser.add_argument("--seed", type=int, default=1, help="random engine: seed")
    parser.add_argument("--reproduce", metavar="HEX", help="run one input given in hex, and stop")
    parser.add_argument("corpus", nargs="*", help="random engine: seed directories (atheris: corpus directories)")
    args, rest = parser.parse_known_args(argv)
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if args.reproduce:
        Harness().one(bytes.fromhex(args.reproduce))
        print("vhost_user_fuzz: input passed")
        return 0
    if engine == "random":
        run_random(Harness(), args.seconds, args.seed, args.corpus)
        return 0

    import atheris
    with atheris.instrument_imports(include=["vswitch.vhost"]):
        import vswitch.vhost.backend  # noqa: F401
        import vswitch.vhost.connection  # noqa: F401
        import vswitch.vhost.device  # noqa: F401
        import vswitch.vhost.protocol  # noqa: F401
    harness = Harness()

    def test_one_input(data: bytes) -> None:
        harness.one(data)

    atheris.Setup([sys.argv[0]] + rest + args.corpus, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
