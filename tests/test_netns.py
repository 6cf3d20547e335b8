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


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare(1) and ip(8) to make a network namespace")


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
