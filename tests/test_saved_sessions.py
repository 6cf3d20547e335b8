"""Sessions that survive a restart: imsa stop + start, and SIGKILL + start, serve the role again with no MFA and no
GetSessionToken; imsa logout forgets sessions in the service and in the saved files; expired ones never return."""

import datetime
import json
import os
import signal
import time

import pytest

from conftest import (
    MFA_CODE, http, run_imsa, run_without_terminal, service_run_dir, start_service, stop_process, write_config,
)
from imsa import secrets
from imsa.credentials import Credentials
from imsa.server import saved
from imsa.server.store import Store

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
PASSPHRASE = "service passphrase"


@pytest.fixture
def service_env(isolated_env, sts_env):
    """The service's environment: the file store with its passphrase, and state and store directories of the
    service's user (the suite may run as root, and the service as nobody)."""
    base = service_run_dir("imsa-saved-")
    env = dict(os.environ, IMSA_SECRET_STORE="file", IMSA_FILE_PASSPHRASE=PASSPHRASE,
               IMSA_SECRETS_DIR=os.path.join(base, "keys"), IMSA_STATE_DIR=os.path.join(base, "state"))
    yield env
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def served_role(service, timeout=20):
    """The role name IMDS lists once it serves one (polled, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, token = http(service.host, service.port, "PUT", "/latest/api/token", {TTL: "60"})
        assert status == 200
        status, _, body = http(service.host, service.port, "GET", "/latest/meta-data/iam/security-credentials/",
                               {"X-aws-ec2-metadata-token": token.decode()})
        if status == 200:
            return body.decode().strip()
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing served within {timeout} s")
        time.sleep(0.1)


def test_sessions_survive_stop_start_and_sigkill(isolated_env, sts_env, service_env):
    write_config(isolated_env, sts_env)
    service = start_service(["--keep-sessions"], env=service_env)
    try:
        before = sts_env.mark()
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        assert sts_env.calls("GetSessionToken", before) == 1
        saved_files = os.listdir(service_env["IMSA_STATE_DIR"])
        assert len(saved_files) == 2  # the session and the active profile
        for name in saved_files:  # sealed: no key id of the session in clear
            assert "ASIA" not in open(os.path.join(service_env["IMSA_STATE_DIR"], name)).read()
        stopped = run_imsa("stop")
        assert stopped.returncode == 0, stopped.stderr
        service.process.wait(timeout=10)

        service = start_service(["--keep-sessions"], env=service_env)
        assert served_role(service) == "role-a"
        # A profile on the same session needs no MFA either: with no terminal, a prompt would fail.
        switched = run_without_terminal("assume", "b")
        assert switched.returncode == 0, switched.stderr
        status = run_imsa("status")
        assert "sessions:   saved in" in status.stdout

        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=10)
        service = start_service(["--keep-sessions"], env=service_env)
        assert served_role(service) == "role-b"
        assert sts_env.calls("GetSessionToken", before) == 1

        out = run_imsa("logout", "--all")
        assert out.returncode == 0, out.stderr
        assert os.listdir(service_env["IMSA_STATE_DIR"]) == []
        assert service.client.status()["sessions"] == [] and service.client.status()["active"] is None
        again = run_without_terminal("assume", "a")
        assert again.returncode == 4 and "MFA code is needed" in again.stderr
    finally:
        stop_process(service.process)


def test_without_keep_sessions_a_file_store_keeps_sessions_in_memory(isolated_env, sts_env, service_env):
    write_config(isolated_env, sts_env)
    service = start_service(env=service_env)
    try:
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(service_env["IMSA_STATE_DIR"])
    finally:
        stop_process(service.process)


def test_keep_sessions_without_a_passphrase_refuses_to_start(isolated_env, sts_env, service_env):
    del service_env["IMSA_FILE_PASSPHRASE"]
    with pytest.raises(RuntimeError, match="cannot keep sessions across restarts"):
        start_service(["--keep-sessions"], env=service_env)


def test_logout_of_one_profile_forgets_only_its_session(isolated_env, sts_env, service_env, monkeypatch):
    write_config(isolated_env, sts_env, extra={
        "bob": {"aws_access_key_id": sts_env.users["bob"]["aws_access_key_id"],
                "aws_secret_access_key": sts_env.users["bob"]["aws_secret_access_key"],
                "mfa_serial_number": "arn:aws:iam::123456789012:mfa/bob"}})
    service = start_service(["--keep-sessions"], env=service_env)
    try:
        assert run_imsa("assume", "bob", "--mfa-token", MFA_CODE).returncode == 0
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
        assert len(service.client.status()["sessions"]) == 2
        out = run_imsa("logout", "bob")
        assert out.returncode == 0, out.stderr
        sessions = service.client.status()["sessions"]
        assert len(sessions) == 1 and service.client.status()["active"]["profile"] == "a"
        assert len([n for n in os.listdir(service_env["IMSA_STATE_DIR"]) if n != saved.ACTIVE_NAME]) == 1
    finally:
        stop_process(service.process)


def credentials(expiration):
    return Credentials("ASIAEXAMPLEEXAMPLE12", "secret-of-the-session", "token-of-the-session", expiration)


def test_an_expired_session_is_never_restored(tmp_path):
    saver = saved.SavedSessions(str(tmp_path / "state"), os.urandom(32))
    saver.check_directory()
    now = datetime.datetime.now(datetime.timezone.utc)
    first = Store()
    first.saver = saver
    settings = None
    first.put_session("a" * 32, credentials(now + datetime.timedelta(hours=1)), settings)
    first.put_session("b" * 32, credentials(now + datetime.timedelta(seconds=2)), settings)
    assert len(os.listdir(saver.directory)) == 2
    for name in os.listdir(saver.directory):
        text = open(os.path.join(saver.directory, name)).read()
        assert "secret-of-the-session" not in text and "token-of-the-session" not in text
    later = Store(clock=lambda: now + datetime.timedelta(seconds=5))
    assert later.restore(saver) is None
    assert later.session("a" * 32) is not None and later.session("b" * 32) is None
    assert os.listdir(saver.directory) == ["a" * 32 + saved.SESSION_SUFFIX]


def test_a_saved_file_renamed_over_another_does_not_open(tmp_path):
    saver = saved.SavedSessions(str(tmp_path / "state"), os.urandom(32))
    saver.check_directory()
    now = datetime.datetime.now(datetime.timezone.utc)
    saver.save_session("a" * 32, "credentials", credentials(now + datetime.timedelta(hours=1)).to_json(), None, None)
    os.rename(os.path.join(saver.directory, "a" * 32 + ".session"), os.path.join(saver.directory, "b" * 32 + ".session"))
    assert saver.load() == ([], None)


def test_the_session_key_is_in_the_store_not_beside_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv(secrets.STORE_VARIABLE, "file")
    monkeypatch.setenv(secrets.PASSPHRASE_VARIABLE, PASSPHRASE)
    monkeypatch.setenv(secrets.DIRECTORY_VARIABLE, str(tmp_path / "keys"))
    monkeypatch.setenv(saved.STATE_VARIABLE, str(tmp_path / "state"))
    secrets._opened.clear()
    try:
        saver = saved.open_for_service(keep=True)
        key = saver._key
        assert saved.session_key(secrets.open_store(interactive=False)) == key
        data = json.load(open(os.path.join(tmp_path / "keys", os.listdir(tmp_path / "keys")[0])))
        assert data["item"] == secrets.SESSION_KEY_ITEM and "ciphertext" in data
        assert os.listdir(tmp_path / "state") == []
    finally:
        secrets._opened.clear()
