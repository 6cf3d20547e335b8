"""Tests that need real addresses beyond 127.0.0.1, run inside network namespaces the tests create."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return done.returncode == 0


pytestmark = [pytest.mark.security,
              pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare(1) and ip(8) to make a network namespace")]


def run_scenario(name, timeout=120):
    done = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(HERE, "netns_scenarios.py"), name],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ), stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peers_outside_loopback_are_refused(isolated_env):
    results = run_scenario("peer_filter")
    status, body = results["outsider"]
    assert status == 403 and "peer" in body
    assert results["loopback"][0] == 200
    assert results["listen"][0] == 200


def test_sudo_start_serves_the_real_address_as_the_user_and_stop_removes_the_alias(isolated_env):
    result = run_scenario("real_address")
    assert result["start"][0] == 0, result["start"]
    assert result["alias_before"] is False and result["alias_added"] is True and result["alias_up"] is True
    assert result["listen"] == "169.254.169.254:80"
    assert 0 not in result["server_uids"] and 0 not in result["server_gids"], result
    # Started with root's groups 4 and 27 and unlimited core dumps: the server keeps neither.
    assert result["waiter_groups"] == ["4", "27"], "the precondition holds"
    assert result["server_groups"] == ["65534"]
    # The root process that stays behind only waits to remove the alias: it holds no socket at all.
    assert result["waiter_uid"] == 0 and result["waiter_sockets"] == 0
    assert result["server_core_limit"] == ["0", "0"]
    assert result["server_no_new_privs"] == ["1"]
    assert result["server_bounding_set"] == ["0000000000000000"] and result["server_effective"] == ["0000000000000000"]
    assert result["assume"][0] == 0, result["assume"]
    assert result["aws"][0] == 0, result["aws"]
    assert result["aws"][1] == "arn:aws:sts::123456789012:assumed-role/role-a/netns-a"
    assert result["boto3"][:2] == [0, "arn:aws:sts::123456789012:assumed-role/role-a/netns-a"], result["boto3"]
    assert result["stop"][0] == 0, result["stop"]
    assert result["waiter_gone"] is True
    assert result["alias_after"] is False


def test_sudo_start_touches_no_path_the_user_controls_while_root(isolated_env, local_users):
    # A real sudo with a rule for the user, which also keeps HOME, IMSA_CONTROL_SOCKET and XDG_RUNTIME_DIR: under
    # strace -f, no file syscall imsa makes as root names a path that is (or lies under) one of the user's.
    owner = local_users[0]
    os.environ["IMSA_TEST_OWNER"] = owner.name
    try:
        result = run_scenario("sudo_start_traced")
    finally:
        del os.environ["IMSA_TEST_OWNER"]
    assert result["start"][0] == 0, result["start"]
    assert result["stop"][0] == 0, result["stop"]
    assert result["saw_drop"] and result["root_paths"] > 100, result  # the trace saw imsa as root, then dropped
    assert result["touched"] == [], result["touched"]
    assert result["unresolved"] == [], result["unresolved"]
    assert result["alias_after"] is False
