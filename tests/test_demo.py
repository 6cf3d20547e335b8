"""The README's first command: the demo runs end to end and shows what it claims."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_switches_roles_with_one_mfa_session(isolated_env):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py")], capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "arn:aws:sts::123456789012:assumed-role/role-a/alice-admin" in out
    assert "arn:aws:sts::123456789012:assumed-role/role-b/alice-readonly" in out
    assert "arn:aws:sts::123456789012:assumed-role/role-c/alice-deploy" in out
    assert "STS saw 1 GetSessionToken call(s)" in out
