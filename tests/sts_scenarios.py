"""STS scenarios that must run where nothing can leave the machine: each runs inside a fresh network namespace.

Run as ``unshare -n python tests/sts_scenarios.py NAME`` (tests/test_sts_settings.py does this): only lo exists
there, so code that would send STS traffic anywhere but the fake STS on 127.0.0.1 fails at once instead of
reaching AWS. Prints one JSON object.
"""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def sudo_bare_environment():
    """A real unprivileged user, a real sudoers rule: ``sudo imsa start`` (sudo drops AWS_ENDPOINT_URL_STS, the
    proxies and the CA bundle: the service starts with none), then ``imsa assume`` in the user's shell, where
    AWS_ENDPOINT_URL_STS names the fake STS."""
    import pwd
    import shutil
    import tempfile

    from conftest import MFA_CODE, alice_profiles, start_sts, write_profiles

    owner = pwd.getpwnam(os.environ["IMSA_TEST_OWNER"])
    imsa = os.path.join(os.path.dirname(sys.executable), "imsa")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
    sts = start_sts()
    home = tempfile.mkdtemp(prefix="imsa-sudo-home-")
    os.chmod(home, 0o755)
    rule = f"/etc/sudoers.d/imsa-sts-test-{os.getpid()}"
    user = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"]
    result = {}
    pid = None
    try:
        config = write_profiles(os.path.join(home, ".imsa"),
                                alice_profiles(sts, a=("role-a", "sudo-a"), b=("role-b", "sudo-b")))
        for path in (home, config):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        # sudo keeps HOME and the socket path (so the test finds the service); everything else is sudo's default.
        with open(rule, "w") as handle:
            handle.write(f'Defaults:{owner.pw_name} env_keep += "HOME IMSA_CONTROL_SOCKET"\n'
                         f"{owner.pw_name} ALL=(root) NOPASSWD: {imsa} start\n")
        os.chmod(rule, 0o440)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "IMSA_CONFIG": config,
            "IMSA_CONTROL_SOCKET": os.path.join(home, "run", "control.sock"),
            "AWS_CONFIG_FILE": os.path.join(home, "no-config"), "AWS_ENDPOINT_URL_STS": sts.endpoint,
        }

        def as_owner(*argv):
            done = subprocess.run([*user, *argv], capture_output=True, text=True, env=env, cwd=home, timeout=90,
                                  stdin=subprocess.DEVNULL)
            return [done.returncode, done.stdout, done.stderr]

        result["start"] = as_owner("sudo", "-n", imsa, "start")
        if result["start"][0] != 0:
            return result
        pid = json.loads(as_owner(imsa, "status", "--json")[1])["pid"]
        with open(f"/proc/{pid}/environ", "rb") as handle:
            result["service_environment"] = sorted(
                entry.split(b"=", 1)[0].decode() for entry in handle.read().split(b"\0") if entry)
        mark = sts.mark()
        result["assume_a"] = as_owner(imsa, "assume", "a", "--mfa-token", MFA_CODE)
        result["assume_b"] = as_owner(imsa, "assume", "b")  # the same session: only the service calls STS
        result["sts_actions"] = sts.actions(mark)
        result["status"] = as_owner(imsa, "status", "--json")
        result["stop"] = as_owner(imsa, "stop")
        pid = None
        return result
    finally:
        if pid is not None and os.path.exists(f"/proc/{pid}"):  # the service this scenario started, by its pid
            os.kill(pid, signal.SIGTERM)
        os.unlink(rule)
        sts.stop()
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.join(home, "run", "control.sock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
