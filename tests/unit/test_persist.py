"""--persist edits the user's config file in place: comments, key order and style survive."""

from __future__ import annotations

import re

from tests.support.daemon import Vswitchd
from vswitch.config import load

CONFIG = """\
# The lab switch.  Ask Ana before changing the ports.
control_socket: {sock}
persist: true
ports:
  # Tenant A's VM; its MAC is pinned below.
  - name: vm1
    type: vhost-user
    path: {dir}/vm1.sock   # QEMU connects here
  - name: spare      # kept for the next VM
    type: "null"
  - name: gone
    type: "null"
fdb:
  aging_seconds: 300   # the default, written out on purpose
"""
# Mixed styles with comments, which ruamel.yaml cannot write back intact.
MIXED = """\
# The lab switch.
control_socket: /tmp/vs-persist.sock
persist: true
ports:
  # Tenant A's VM.
  - {{name: vm1, type: vhost-user, path: {dir}/vm1.sock}}   # QEMU connects here
  - name: spare      # kept for the next VM
    type: "null"
  - {{name: gone, type: "null"}}
fdb:
  aging_seconds: 300   # the default, written out on purpose
"""


def test_changes_are_written_without_losing_comments_or_order(tmp_path):
    d = Vswitchd(tmp_path, ports=[])
    d.config_path.write_text(CONFIG.format(sock=d.control_socket, dir=tmp_path))
    original = d.config_path.read_text()
    d.write_config = False
    with d:
        d.ctl("add-port", "vm2", "--type", "vhost-user", "--path", str(tmp_path / "vm2.sock"))
        d.ctl("del-port", "gone")
        d.ctl("set", "fdb-aging", "60")
    text = d.config_path.read_text()
    # Every comment is still there, in its place, and the untouched lines are as they were.
    for line in original.splitlines():
        if "gone" in line or "aging_seconds" in line or line == '    type: "null"' and "gone" in original:
            continue
        assert line in text.splitlines(), f"{line!r} lost:\n{text}"
    assert text.index("\ncontrol_socket:") < text.index("\npersist:") < text.index("\nports:") < text.index("\nfdb:")
    assert "gone" not in text
    assert re.search(r"^  aging_seconds: 60 +# the default, written out on purpose$", text, re.M), text
    # The new port went at the end of the list, without the defaults the file never had.
    assert text.index("vm2") > text.index("spare")
    assert "mtu" not in text and "max_entries" not in text
    cfg = load(str(d.config_path))
    assert [p["name"] for p in cfg.ports] == ["vm1", "spare", "vm2"] and cfg.fdb_aging_seconds == 60


def test_a_layout_ruamel_cannot_keep_is_rewritten_plainly_and_still_right(tmp_path, caplog):
    """An end-of-line comment on a block mapping between flow mappings in the ports list comes
    out of ruamel.yaml as a broken line: the file is written plainly instead, and correct."""
    from vswitch.config import _updated_yaml

    path = tmp_path / "vswitchd.yaml"
    path.write_text(MIXED.format(dir=tmp_path))
    cfg = load(str(path))
    cfg.fdb_aging_seconds = 60
    text = _updated_yaml(str(path), cfg)
    assert "could not keep the file's comments and layout; rewritten plainly" in caplog.text
    path.write_text(text)
    again = load(str(path))
    assert [p["name"] for p in again.ports] == ["vm1", "spare", "gone"] and again.fdb_aging_seconds == 60
