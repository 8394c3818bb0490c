#!/usr/bin/env bash
# Install vswitch from this checkout (editable), building its C fast path.
#
#   tools/install.sh            # the switch: vswitchd, vswitchctl, vswitch-cni
#   tools/install.sh test       # plus the test extra (pytest, scapy)
#   tools/install.sh service    # the switch, and vswitchd as a systemd service (deploy/vswitchd.service):
#                               # the unit in $UNIT_DIR (/etc/systemd/system), the config in
#                               # $CONFIG_DIR (/etc/vswitch, a copy of configs/default.yaml if none)
#
# Run as root on Debian 12. Idempotent and quiet when there is nothing to do.
# It installs the C toolchain and Python headers cffi needs when they are
# missing, then `pip install -e .` into $PYTHON (default python3). An
# externally managed system Python (PEP 668) gets a virtualenv in .venv
# instead; tools/run-switch and tools/run-tests use it. Prints the path of
# the Python it installed into on its last line.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRA=${1:-}
# libxdp-dev, libbpf-dev: AF_XDP's headers (libxdp itself is loaded only when an af-xdp port opens).
BUILD_PACKAGES=(gcc libc6-dev python3-dev python3-venv libxdp-dev libbpf-dev)

STEP_NAME=install
# shellcheck source=tools/steps.sh
. "$REPO/tools/steps.sh"

missing=()
for pkg in "${BUILD_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run "apt-get update" apt-get update -q
    run "apt-get install" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "$PY not found"
if [ -x "$REPO/.venv/bin/python" ]; then
    PY=$REPO/.venv/bin/python
elif ! "$PY" -c 'import sys, sysconfig, os; sys.exit(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    run "python -m venv" "$PY" -m venv "$REPO/.venv"
    PY=$REPO/.venv/bin/python
fi

# cffi compiles the fast path against this interpreter's headers.
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    die "Python.h for $PY is missing (Debian: python3-dev): the C fast path cannot be built"

# Up to date means: vswitch imports from this checkout and its C build
# matches the sources (vswitch.native checks), and the extra's tools import.
imports="import vswitch, vswitch.native, yaml, psutil, cffi, prometheus_client, ruamel.yaml"
[ "$EXTRA" = test ] && imports="$imports, pytest, pytest_timeout, scapy, matplotlib, atheris"
installed_ok() {
    (cd /tmp && "$PY" - "$REPO" <<PYEOF
import pathlib, sys
$imports  # noqa
import os, sysconfig
# An install from before a console script was added lacks it: pip writes scripts only when it installs.
scripts = sysconfig.get_path("scripts")
if not all(os.path.exists(os.path.join(scripts, s)) for s in ("vswitchd", "vswitchctl", "vswitch-cni")):
    sys.exit(1)
sys.exit(pathlib.Path(vswitch.__file__).resolve().parent != pathlib.Path(sys.argv[1]) / "vswitch")
PYEOF
    ) >/dev/null 2>&1
}
if ! installed_ok; then
    # An old in-place build must not shadow the one pip is about to make.
    rm -f "$REPO"/vswitch/_native.*.so
    target=$REPO
    [ "$EXTRA" = test ] && target="$REPO[$EXTRA]"
    run "pip install -e $target" "$PY" -m pip install -q -e "$target"
    installed_ok || {
        (cd /tmp && "$PY" -c 'import vswitch.native') >&2 || true
        die "vswitch is installed but does not import from $REPO (see the error above)"
    }
fi
if [ "$EXTRA" = service ]; then
    UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
    CONFIG_DIR=${CONFIG_DIR:-/etc/vswitch}
    mkdir -p "$UNIT_DIR" "$CONFIG_DIR"
    [ -e "$CONFIG_DIR/vswitchd.yaml" ] || cp "$REPO/configs/default.yaml" "$CONFIG_DIR/vswitchd.yaml"
    # The interpreter itself, not a shim or a name on PATH: systemd runs it without a shell.
    interpreter=$("$PY" -c 'import sys; print(sys.executable)')
    sed -e "s|@VSWITCHD@|$interpreter -m vswitch.daemon|" -e "s|@REPO@|$REPO|" \
        -e "s|/etc/vswitch/vswitchd.yaml|$CONFIG_DIR/vswitchd.yaml|" \
        "$REPO/deploy/vswitchd.service" > "$UNIT_DIR/vswitchd.service"
    # Only where systemd runs this machine; the unit is in place either way.
    if [ -d /run/systemd/system ]; then
        run "systemctl daemon-reload" systemctl daemon-reload
    fi
    echo "installed $UNIT_DIR/vswitchd.service (config $CONFIG_DIR/vswitchd.yaml): systemctl enable --now vswitchd" >&2
fi
echo "$PY"
