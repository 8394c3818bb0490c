"""What an idle vxlan port costs the PMD: a never-sleeping vswitchd (pmd.sleep
false) whose only port is a vxlan port on loopback, sampled over a window;
prints passes per second, TSC cycles per idle pass and, where the port counts
them, recvmmsg calls per second (README "Cheaper empty polls").

    python3 -m tools.vxlan_idle [--seconds 2] [--label NAME]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.support.daemon import Vswitchd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--label", default="")
    args = p.parse_args()
    ports = [{"name": "vx", "type": "vxlan", "local_ip": "127.0.0.1", "remote": ["127.0.0.2"], "vni": 5001,
              "dst_port": 47999, "underlay_mtu": 1500}]
    with tempfile.TemporaryDirectory() as tmp, \
            Vswitchd(Path(tmp), ports=ports, extra={"pmd": {"sleep": False}}) as d:
        time.sleep(0.5)
        a, pa = d.ctl("pmd-stats")["pmds"][0], d.port("vx")["stats"]
        t0 = time.monotonic()
        time.sleep(args.seconds)
        t1 = time.monotonic()
        b, pb = d.ctl("pmd-stats")["pmds"][0], d.port("vx")["stats"]
        loops = b["loops"] - a["loops"]
        out = {"label": args.label, "passes_per_s": round(loops / (t1 - t0)),
               "cycles_per_idle_pass": round((b["idle_cycles"] - a["idle_cycles"]) / max(loops, 1), 1)}
        if "rx_polls" in pb:
            out["recvmmsg_per_s"] = round((pb["rx_polls"] - pa["rx_polls"]) / (t1 - t0))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
