"""The AWS SDK for JavaScript v3 as a real client: its packages, pinned by tests/js/package-lock.json, installed
into tests/js/node_modules with ``npm ci`` once per run, and tests/js/whoami.mjs run with node.

Without node or npm the tests that need them skip, except under CI (``CI`` set), where .ci/run installs both and
a missing one fails the run instead: a skip there would mean the JS SDK silently went untested.
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import in_ci

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
WHOAMI = os.path.join(JS_DIR, "whoami.mjs")
# Exactly what package-lock.json pins; no audit or funding requests to the registry.
NPM_CI = ("ci", "--no-audit", "--no-fund")
# A cold npm cache downloads the SDK's packages (a few MB); a bound, not an expectation.
NPM_CI_TIMEOUT = 600
WHOAMI_TIMEOUT = 60


@pytest.fixture(scope="session")
def node():
    """The path of node, once tests/js/node_modules holds what package-lock.json pins (``npm ci``, once per run)."""
    found = {name: shutil.which(name) for name in ("node", "npm")}
    missing = [name for name, path in found.items() if not path]
    if missing:
        reason = f"{' and '.join(missing)} not found: the AWS SDK for JavaScript v3 client needs node and npm"
        if in_ci():
            pytest.fail(reason + " (under CI this fails: .ci/run installs nodejs and npm)", pytrace=False)
        pytest.skip(reason)
    try:
        done = subprocess.run([found["npm"], *NPM_CI], cwd=JS_DIR, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=NPM_CI_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm ci in {JS_DIR} did not finish within {NPM_CI_TIMEOUT} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"npm ci in {JS_DIR} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}",
                    pytrace=False)
    return found["node"]


def whoami(argv, env):
    """Run *argv* (which ends with node and WHOAMI) in a new session (no terminal: nothing can prompt) with *env*;
    the JSON line whoami.mjs printed."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          start_new_session=True, timeout=WHOAMI_TIMEOUT)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])
