"""Seeing a session's end coming: warnings from the CLI and the service at IMSA_WARN_BEFORE, the time left in
status and list, and ``imsa status --short`` for a prompt.

End to end, a fake STS hands out 40-second MFA sessions and 60-second roles, so each warning window opens within
seconds; the refresher's own timing is checked on a store with an injected clock.
"""

import datetime
import logging
import os
import re
import subprocess
import threading

import pytest

from conftest import MFA_CODE, one_error_line, run_imsa, start_service, start_sts, stop_process, write_config

from imsa import expiry
from imsa.credentials import Credentials, parse_time
from imsa.server.store import RoleSpec, Store

SESSION_LIFETIME = 40
ROLE_LIFETIME = 60
FINGERPRINT = "0" * 32


@pytest.fixture
def short_sts(monkeypatch):
    """A fake STS whose sessions last SESSION_LIFETIME seconds and roles ROLE_LIFETIME."""
    server = start_sts(extra_args=("--session-lifetime", str(SESSION_LIFETIME), "--role-lifetime", str(ROLE_LIFETIME)))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", server.endpoint)
    yield server
    server.stop()


@pytest.fixture
def short_service(short_sts, isolated_env):
    write_config(isolated_env, short_sts)
    running = start_service()
    yield running
    stop_process(running.process)
    os.unlink(running.log_path)


def logged_at(line):
    """The time of a service log line (``TIME imsa[PID] LEVEL LOGGER: message``)."""
    return datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z")


def test_the_service_warns_when_the_window_opens_and_not_before(short_service, monkeypatch):
    monkeypatch.setenv("IMSA_WARN_BEFORE", "0.5")  # 30 s: the window opens about 10 s into a 40 s session
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert "warning: the session" not in done.stderr  # 40 s left: not yet
    ends = parse_time(short_service.client.status()["sessions"][0]["expiration"])
    log = short_service.wait_for_log(" ends in ", timeout=SESSION_LIFETIME + 10)
    line = next(line for line in log.splitlines() if " ends in " in line)
    assert " WARNING imsa.server.store: session " in line
    assert "a use it" in line.replace("(", "") and "until imsa assume a" in line
    # Logged once the window had opened (the log has whole seconds), and before the end.
    opened = ends - datetime.timedelta(seconds=30)
    assert opened - datetime.timedelta(seconds=1) <= logged_at(line) < ends
    assert log.count(" ends in ") == 1


def test_assume_and_export_warn_on_stderr_within_the_window(short_service, monkeypatch):
    monkeypatch.setenv("IMSA_WARN_BEFORE", "2")  # 2 min: more than either lifetime
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert re.search(r"imsa: warning: the session from .+: \d+s left, until \S+Z; the service serves a until then",
                     done.stderr), done.stderr
    done = run_imsa("export", "b", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert re.search(r"imsa: warning: the credentials of b: \d+s left, until \S+Z; run imsa export b again",
                     done.stderr), done.stderr
    assert "warning" not in done.stdout


def test_no_warning_outside_the_window_or_when_turned_off(short_service, monkeypatch):
    monkeypatch.setenv("IMSA_WARN_BEFORE", "0")
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0 and " left, until " not in done.stderr, done.stderr
    monkeypatch.setenv("IMSA_WARN_BEFORE", "0.1")  # 6 s, less than what is left
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0 and " left, until " not in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "3000"])
def test_a_bad_window_is_a_configuration_error(isolated_env, sts_env, monkeypatch, value):
    write_config(isolated_env, sts_env)
    monkeypatch.setenv("IMSA_WARN_BEFORE", value)
    line = one_error_line(run_imsa("export", "a", "--mfa-token", MFA_CODE), 3)
    assert "IMSA_WARN_BEFORE" in line and "must be minutes" in line


def test_status_shows_each_held_session_and_short_one_line(short_service, monkeypatch):
    monkeypatch.setenv("IMSA_WARN_BEFORE", "2")
    done = run_imsa("status", "--short")
    assert (done.returncode, done.stdout) == (1, "-\n")
    assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
    done = run_imsa("status", "--short")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"a \d+s\n", done.stdout), done.stdout
    assert done.stderr == ""
    done = run_imsa("status")
    held = [line for line in done.stdout.splitlines() if line.startswith("held:")]
    assert len(held) == 1 and re.search(r"\(\d+s left, ending soon\)$", held[0]), done.stdout
    listed = run_imsa("list")
    assert re.search(r"^a .* held \(\d+s left\)$", listed.stdout, re.M), listed.stdout


def test_status_short_says_expired_once_the_session_has_ended():
    """Without a service-side clock to move, the text is checked on a status answer."""
    from imsa.commands.prompt import short_line

    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    active = {"profile": "a", "valid": True, "session_expiration": "2030-01-01T01:05:00Z"}
    assert short_line({"active": active}, now) == "a 1h05m"
    assert short_line({"active": dict(active, valid=False)}, now) == "a expired"
    assert short_line({"active": dict(active, session_expiration=None)}, now) == "a expired"
    assert short_line({"active": None}, now) == "-"


# --- the refresher's timing, on a clock the test moves ---


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def session_credentials(expiration):
    return Credentials("ASIA0000000000000001", "secret", "token", expiration)


def test_the_store_warns_once_at_the_window_and_wakes_for_it(caplog):
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    clock = Clock(start)
    store = Store(assume=lambda session, spec: session_credentials(start + datetime.timedelta(hours=1)), clock=clock)
    ends = start + datetime.timedelta(hours=1)
    window = datetime.timedelta(minutes=10)
    store.put_session(FINGERPRINT, session_credentials(ends), kind="credentials", label="keys ****0001",
                      warn_before=window)
    store.activate(RoleSpec.from_json({"profile": "p", "fingerprint": FINGERPRINT}))
    caplog.set_level(logging.WARNING, logger="imsa.server.store")
    assert store.refresh_once() <= ends - window  # the refresher wakes for the window's start at the latest
    assert " ends in " not in caplog.text
    clock.now = ends - window - datetime.timedelta(seconds=1)
    store.refresh_once()
    assert " ends in " not in caplog.text
    clock.now = ends - window
    store.refresh_once()
    assert "session 00000000 from keys ****0001 ends in 10m, at 2030-01-01T01:00:00Z (p use it)" in caplog.text
    store.refresh_once()
    assert caplog.text.count(" ends in ") == 1
    # A new session on the same source is warned about again, at its own window.
    store.put_session(FINGERPRINT, session_credentials(ends + datetime.timedelta(hours=1)), warn_before=window)
    store.refresh_once()
    assert caplog.text.count(" ends in ") == 1
    clock.now = ends + datetime.timedelta(hours=1) - window
    store.refresh_once()
    assert caplog.text.count(" ends in ") == 2


def test_time_left_reads_well():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    after = now.__add__
    assert [expiry.left(after(datetime.timedelta(seconds=s)), now) for s in (0, 40, 60, 3599, 3900)] == \
        ["expired", "40s", "1m", "59m", "1h05m"]


def test_the_readme_prompt_snippet_shows_profile_and_time_left():
    """The bash prompt snippet of the README, run in bash with an export's IMSA_PROFILE_EXPIRATION."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    snippet = re.search(r"```sh\n(# imsa prompt.*?)```", readme, re.S).group(1)
    ends = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=42, seconds=30))
    env = dict(os.environ, IMSA_PROFILE="dev", IMSA_PROFILE_EXPIRATION=ends.strftime("%Y-%m-%dT%H:%M:%SZ"))
    done = subprocess.run(["bash", "--norc", "-c", snippet + "\n_imsa_prompt"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"\[dev 4[12]m\] ", done.stdout), done.stdout
    env["IMSA_PROFILE_EXPIRATION"] = "2001-01-01T00:00:00Z"
    done = subprocess.run(["bash", "--norc", "-c", snippet + "\n_imsa_prompt"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.stdout == "[dev expired] "
    env.pop("IMSA_PROFILE_EXPIRATION")
    done = subprocess.run(["bash", "--norc", "-c", snippet + "\n_imsa_prompt"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.stdout == ""


def test_status_short_without_a_service_is_one_error_line(isolated_env):
    line = one_error_line(run_imsa("status", "--short"), 5)
    assert "not running" in line


def test_status_short_through_the_parser_says_the_same(short_service, monkeypatch):
    """``imsa -v status --short`` takes the parser's way, not the prompt's shortcut: the same line."""
    assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
    fast, parsed = run_imsa("status", "--short"), run_imsa("status", "--short", "-v")
    assert fast.stdout.split()[0] == parsed.stdout.split()[0] == "a"
    assert re.fullmatch(r"a \d+s\n", parsed.stdout) and parsed.returncode == fast.returncode == 0


def test_the_desktop_notification_runs_the_notifier_with_the_message(tmp_path, monkeypatch):
    """Where a session bus and the notifier are there, the warning is also shown on the desktop; else nothing runs."""
    record = tmp_path / "notified"
    notifier = tmp_path / "notify-send"
    notifier.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}.part && mv {record}.part {record}\n")
    notifier.chmod(0o755)
    monkeypatch.setattr(expiry, "NOTIFIER", str(notifier))
    assert not expiry.notify("imsa: session ending", "text", environ={})  # no session bus: not even tried
    assert expiry.notify("imsa: session ending", "session 0000 ends in 5m", environ={"DBUS_SESSION_BUS_ADDRESS": "x"})
    for _ in range(200):  # the notifier runs in a thread of its own: polled, at most 10 s
        if record.exists():
            break
        threading.Event().wait(0.05)
    assert record.read_text().splitlines() == ["--app-name=imsa", "imsa: session ending", "session 0000 ends in 5m"]
