#!/usr/bin/env bash
# Prepare a Debian 12 machine to run every vswitch test, including the system
# tests with real peers (DPDK testpmd, QEMU guests, network namespaces).
#
# Run as root. Idempotent: each step checks first and does nothing when its
# work is already done, so tools/run-tests calls it on every run. Quiet on
# success; on failure it prints what failed with the command's full output and
# exits non-zero.
#
#   * apt packages (apt-get update only when one is missing);
#   * 1024 hugepages of 2 MB for DPDK (testpmd --in-memory);
#   * the BPF filesystem at /sys/fs/bpf (libxdp's dispatcher, AF_XDP ports);
#   * the project itself, editable, with its test extra (pip install -e '.[test]'),
#     rebuilt when the C sources changed.
#
# Environment: PYTHON (default python3) is the interpreter to install into. If
# it is an externally managed system Python (PEP 668), a virtualenv is made in
# .venv instead and tools/run-tests uses it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HUGEPAGES=1024

# What the tests need, by Debian package: the DPDK testpmd peer, OVS-DPDK (a
# peer in the benchmark's smoke test; the system OVS service is never used), QEMU guests
# and their initramfs, namespaces and traffic tools, perf (the benchmark's
# --profile), AF_XDP headers, a C
# toolchain with Python headers for the cffi extension, clang with its
# libFuzzer and sanitizer runtimes for the fuzzers (tools/fuzz.py), and
# libvirt for tests/system/test_libvirt.py: libvirt-daemon-system rather than
# only libvirt-daemon (libvirtd, its QEMU driver) and libvirt-clients (virsh),
# because its QEMU driver refuses to start unless the user libvirt-qemu exists,
# and only libvirt-daemon-system's install script creates it (and its group).
# The test runs its own libvirtd; the system one is never used.
# valgrind: callgrind counts the PMD's instructions (tests/unit/test_capture_cost.py).
# containernetworking-plugins: the host-local IPAM plugin (/usr/lib/cni) that
# tests/system/test_cni.py hands vswitch-cni's addressing to.
PACKAGES=(
    dpdk-dev coreutils
    openvswitch-switch openvswitch-switch-dpdk
    qemu-system-x86 busybox-static
    iproute2 iperf3 tcpdump linux-perf iputils-ping ethtool systemd-container
    libxdp-dev libbpf-dev xdp-tools
    gcc libc6-dev python3-dev python3-venv
    clang libclang-rt-14-dev
    libvirt-daemon-system libvirt-clients
    valgrind
    containernetworking-plugins
)

STEP_NAME=setup-test-env
# shellcheck source=tools/steps.sh
. "$REPO/tools/steps.sh"

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and reserves hugepages)"

# --- apt packages --------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
# The QEMU guest kit (tools/vmkit.py) downloads the kernel package with apt, so
# the package lists must be there even when nothing needs installing.
no_lists() { ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; }
if [ ${#missing[@]} -gt 0 ] || no_lists; then
    export DEBIAN_FRONTEND=noninteractive
    run "apt-get update" apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-test-env: installing ${missing[*]}"
    run "apt-get install" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
for tool in dpdk-testpmd stdbuf qemu-system-x86_64 busybox ip iperf3 tcpdump perf gcc ethtool xdp-loader libvirtd virsh ovs-vswitchd ovsdb-server valgrind callgrind_annotate; do
    command -v "$tool" >/dev/null || die "$tool is still missing after installing packages"
done
[ -x /usr/lib/cni/host-local ] || die "/usr/lib/cni/host-local is still missing after installing packages"

# --- hugepages -----------------------------------------------------------
meminfo() { awk -v key="$1:" '$1 == key { print $2 }' /proc/meminfo; }
if [ "$(meminfo HugePages_Total)" -lt "$HUGEPAGES" ]; then
    echo "$HUGEPAGES" >/proc/sys/vm/nr_hugepages
    if [ "$(meminfo HugePages_Total)" -lt "$HUGEPAGES" ]; then
        # Fragmented memory: free the page cache, compact, and try once more.
        sync
        echo 3 >/proc/sys/vm/drop_caches
        echo 1 >/proc/sys/vm/compact_memory
        echo "$HUGEPAGES" >/proc/sys/vm/nr_hugepages
    fi
    total=$(meminfo HugePages_Total)
    [ "$total" -ge "$HUGEPAGES" ] ||
        die "asked for $HUGEPAGES hugepages, the kernel reserved $total (grep -i huge /proc/meminfo)"
fi

# --- BPF filesystem ------------------------------------------------------
# libxdp's dispatcher (several XDP programs on one interface) pins its
# programs there; without it libxdp attaches the AF_XDP program alone.
if ! mountpoint -q /sys/fs/bpf; then
    run "mount the BPF filesystem" mount -t bpf bpf /sys/fs/bpf
fi

# --- Python: the project, editable, with its test extra --------------------
# tools/install.sh is the one place that knows how (also used by tools/run-switch).
PY=$(bash "$REPO/tools/install.sh" test | tail -n 1)

# --- QEMU guest kit ----------------------------------------------------------
# The guest kernel is downloaded here rather than in the middle of a test, so a
# machine that cannot get it fails early and says so.
if ! (cd "$REPO" && "$PY" -m tools.vmkit build) >"$LOG" 2>&1; then
    run "apt-get update" apt-get update -q
    run "QEMU guest kit (python -m tools.vmkit build)" bash -c "cd '$REPO' && '$PY' -m tools.vmkit build"
fi
