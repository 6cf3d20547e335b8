"""`sudo imsa COMMAND` acting as the invoking user.

The end-to-end tests run tests/netns_scenarios.py under `unshare -m -n`: a network namespace of their own, and a
mount namespace whose tmpfs hide the machine's /tmp and /etc/sudoers.d, so the sudoers rule exists for the test
alone.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import needs_root

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMSA = os.path.join(os.path.dirname(sys.executable), "imsa")


def _can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip") or not shutil.which("sudo"):
        return False
    return subprocess.run(["unshare", "-m", "-n", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _can_unshare(), reason="needs root, sudo, ip(8) and unshare -m -n")


def run_scenario(name, owner, timeout=300):
    """Run scenario *name* of tests/netns_scenarios.py in its own mount and network namespaces, for *owner*."""
    done = subprocess.run(
        ["unshare", "-m", "-n", sys.executable, os.path.join(HERE, "netns_scenarios.py"), name],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, IMSA_TEST_OWNER=owner.name),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- item 4: sudo imsa COMMAND acts as the user who ran sudo ---


@needs_namespaces
def test_sudo_status_assume_exec_and_stop_act_on_the_invoking_users_service_as_that_user(isolated_env, local_users):
    owner = local_users[0]
    result = run_scenario("sudo_acts_as_the_invoking_user", owner)
    assert result["start"][0] == 0, result["start"]
    pid = result["pid"]
    code, out, err = result["status"]
    assert code == 1 and f"service:    pid {pid} on 127.0.0.1:" in out, (code, out, err)  # 1: no role yet
    assert "profile:    none" in out
    assert result["assume"][0] == 0, result["assume"]
    assert "profile:    a" in result["status_after"][1]
    # The command runs as the user, with the user's groups only, HOME and USER from the passwd entry.
    code, out, err = result["exec"]
    assert code == 0, err
    ids, names = out.splitlines()
    assert ids == f"uid={owner.uid}({owner.name}) gid={owner.gid}({owner.name}) groups={owner.gid}({owner.name})"
    assert names == f"/nonexistent {owner.name} {owner.name}"
    # Root could read this file; the user cannot, and neither can `sudo imsa`.
    code, out, err = result["root_only"]
    assert (code, out) == (3, "") and err == "imsa: error: /tmp/root-only/.imsa: cannot read: Permission denied\n"
    code, out, err = result["stop"]
    assert code == 0 and err == f"imsa: stopped (pid {pid})\n", err
    assert result["service_gone"] is True


def test_without_sudo_nobody_is_become(monkeypatch):
    from imsa import sudo

    monkeypatch.delenv("SUDO_UID", raising=False)
    assert sudo.become_invoking_user() is None
    assert sudo.become_invoking_user({"SUDO_UID": "0"}) is None
    if os.geteuid() != 0:
        assert sudo.become_invoking_user({"SUDO_UID": str(os.getuid() + 1)}) is None


@needs_root()
def test_sudo_with_a_sudo_uid_of_no_user_is_one_error(tmp_path):
    done = subprocess.run([IMSA, "status"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, SUDO_UID="4000321"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "imsa: error: SUDO_UID=4000321 names no user of this machine\n"
