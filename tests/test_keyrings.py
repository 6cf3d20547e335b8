"""imsa add -> imsa assume with real OS keyring backends: Secret Service (gnome-keyring on a D-Bus session bus of
the test's own) and ``pass`` (with a throw-away GNUPGHOME). Nothing here is the user's: every daemon is started
by the test, on its own bus or home, and stopped by its pid (gpg-agent through gpgconf --kill)."""

import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from conftest import MFA_CODE, MFA_SERIAL, run_imsa, start_service, stop_process
from imsa import secrets
from test_secrets import add_on_terminal, files_holding, own_sts  # noqa: F401 (own_sts is a fixture)

KEYRING_PASSWORD = "throw-away-keyring-password"


def needs(*programs):
    missing = [program for program in programs if not shutil.which(program)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (.ci/run installs them)")


@pytest.fixture
def secret_service(monkeypatch, isolated_env):
    """A D-Bus session bus of this test's own with gnome-keyring's Secret Service on it, unlocked."""
    runtime = tempfile.mkdtemp(prefix="imsa-bus-")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, XDG_DATA_HOME=str(isolated_env / ".local" / "share"))
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True, env=env)
    address = bus.stdout.readline().strip()
    assert address, "dbus-daemon printed no address"
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    daemon = subprocess.Popen(["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    daemon.stdin.write(KEYRING_PASSWORD.encode())
    daemon.stdin.close()
    for name in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_DATA_HOME"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv(secrets.STORE_VARIABLE, "keyring")
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.SecretService.Keyring")
    # The service (IMSA_CONTROL_SOCKET) must not look for its socket in this runtime directory.
    secrets._opened.clear()
    yield runtime
    secrets._opened.clear()
    stop_process(daemon)
    stop_process(bus)
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def password_store(monkeypatch, isolated_env):
    """``pass`` initialised with a new GnuPG key without a passphrase, in directories of this test's own."""
    gnupg = tempfile.mkdtemp(prefix="imsa-gpg-")
    store = str(isolated_env / ".password-store")
    env = dict(os.environ, GNUPGHOME=gnupg, PASSWORD_STORE_DIR=store)
    quiet = dict(env=env, check=True, capture_output=True, timeout=120)
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
                    "imsa test <imsa-test@example.invalid>", "ed25519", "sign", "never"], **quiet)
    listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], text=True, **quiet).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-add-key",
                    fingerprint, "cv25519", "encr", "never"], **quiet)
    subprocess.run(["pass", "init", fingerprint], **quiet)
    monkeypatch.setenv("GNUPGHOME", gnupg)
    monkeypatch.setenv("PASSWORD_STORE_DIR", store)
    monkeypatch.setenv(secrets.STORE_VARIABLE, "keyring")
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring_pass.PasswordStoreBackend")
    secrets._opened.clear()
    yield store
    secrets._opened.clear()
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True, timeout=30)
    shutil.rmtree(gnupg, ignore_errors=True)


def add_then_assume(isolated_env, own_sts, monkeypatch, store_name):
    """imsa add carol's keys, imsa assume a role from them; then no file holds carol's secret."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", own_sts.endpoint)
    carol = own_sts.users["carol"]
    stderr = add_on_terminal("work", carol["aws_access_key_id"], carol["aws_secret_access_key"],
                             "--mfa-serial", MFA_SERIAL)
    assert f"in OS keyring ({store_name})" in stderr
    assert yaml.safe_load((isolated_env / ".imsa").read_text())["work"]["secret_store"] is True
    with open(isolated_env / ".imsa", "a") as out:
        out.write(f"role:\n  extends: work\n  role_arn: {own_sts.roles['role-b']}\n")
    service = start_service()
    try:
        done = run_imsa("assume", "role", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        status = run_imsa("status", "--json")
        assert store_name in status.stdout
    finally:
        stop_process(service.process)
        os.unlink(service.log_path)
    return carol["aws_secret_access_key"]


@needs("dbus-daemon", "gnome-keyring-daemon")
def test_add_then_assume_with_secret_service(secret_service, isolated_env, own_sts, monkeypatch):  # noqa: F811
    secret = add_then_assume(isolated_env, own_sts, monkeypatch, "keyring.backends.SecretService.Keyring")
    roots = [str(isolated_env), secret_service, os.path.dirname(os.path.dirname(os.environ["IMSA_CONTROL_SOCKET"])),
             "/tmp"]
    assert files_holding(secret, roots, since=own_sts.started) == []
    # It is in the keyring: the Secret Service gives it back to imsa.
    assert secrets.get_keys("work")[1] == secret


@needs("pass", "gpg", "gpgconf")
def test_add_then_assume_with_pass(password_store, isolated_env, own_sts, monkeypatch):  # noqa: F811
    secret = add_then_assume(isolated_env, own_sts, monkeypatch, "keyring_pass.PasswordStoreBackend")
    stored = [name for _, _, names in os.walk(password_store) for name in names if name.endswith(".gpg")]
    assert stored, "pass holds no item"
    roots = [str(isolated_env), os.environ["GNUPGHOME"], "/tmp"]
    assert files_holding(secret, roots, since=own_sts.started) == []
