"""Fencing: ``imds: false`` keeps a profile off the global endpoint, ``confirm: true`` asks on the terminal each time.

Real CLI processes against a live service; the confirmation through a pseudo-terminal, and without any terminal.
"""

import json

import pytest

from conftest import (
    MFA_CODE, answer_on_terminal, control_post, one_error_line, run_imsa, run_without_terminal, write_config,
)
from imsa import config
from imsa.errors import EXIT_CONFIG, EXIT_ERROR, ConfigError

PROMPT_END = b"[y/N] "


def fenced_config(home, sts_env):
    """Profiles a..d, plus f (imds: false), g (extends f), h (extends f, imds: true again) and c2 (confirm: true)."""
    roles = sts_env.roles
    return write_config(home, sts_env, extra={
        "f": {"extends": "base", "role_arn": roles["role-b"], "role_session_name": "fenced", "imds": False},
        "g": {"extends": "f"},
        "h": {"extends": "f", "imds": True},
        "c2": {"extends": "base", "role_arn": roles["role-c"], "role_session_name": "asked", "confirm": True},
    })


def test_assume_refuses_a_fenced_profile_before_asking_for_mfa(isolated_env, service, sts_env):
    """imsa assume f: one line naming imsa exec and imsa export, exit 3, nothing asked of STS, nothing served."""
    fenced_config(isolated_env, sts_env)
    mark = sts_env.mark()
    line = one_error_line(run_imsa("assume", "f", "--mfa-token", MFA_CODE), EXIT_CONFIG)
    assert "imds: false" in line and "imsa exec f -- COMMAND" in line and 'imsa export f' in line
    assert sts_env.actions(mark) == []
    assert service.client.status()["active"] is None
    # Inherited through extends, and undone by the nearest profile that says so.
    one_error_line(run_imsa("assume", "g", "--mfa-token", MFA_CODE), EXIT_CONFIG)
    done = run_imsa("assume", "h", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr


def test_a_fenced_profile_still_goes_to_one_command_or_shell(isolated_env, service, sts_env):
    """export and exec give a fenced profile's role to one shell or command, as the refusal says."""
    fenced_config(isolated_env, sts_env)
    done = run_imsa("export", "f", "--format", "json", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["AccessKeyId"]
    done = run_imsa("exec", "f", "--", "sh", "-c", 'test -n "$AWS_CONTAINER_CREDENTIALS_FULL_URI"')
    assert done.returncode == 0, done.stderr


def test_the_service_refuses_to_activate_a_spec_marked_off_the_global_endpoint(service):
    """A caller that skips the CLI's check (an older CLI, a script) is refused by the service itself."""
    spec = {"profile": "f", "fingerprint": "0" * 32, "role_arn": "arn:aws:iam::123456789012:role/role-b",
            "imds": False}
    status, body = control_post(service.socket, "/activate", spec)
    assert status == 403, body
    assert b"imds: false" in body
    assert service.client.status()["active"] is None
    status, body = control_post(service.socket, "/activate", dict(spec, imds="no"))
    assert status == 400 and b"'imds' must be true or false" in body


def test_fencing_keys_must_be_booleans(isolated_env, sts_env):
    """imds: "no" is an error naming the file, profile and key, not a truthy string."""
    write_config(isolated_env, sts_env, extra={"f": {"extends": "base", "imds": "no"}})
    with pytest.raises(ConfigError, match=r"profile 'f', key 'imds': must be true or false"):
        config.resolve("f")


@pytest.mark.parametrize("argv", [
    ["export", "c2", "--mfa-token", MFA_CODE],
    ["exec", "c2", "--mfa-token", MFA_CODE, "--", "true"],
    ["credential-process", "c2"],
])
def test_confirm_without_a_terminal_refuses_and_names_the_command(isolated_env, active_service, sts_env, argv):
    """No terminal to ask on: one error line, exit 1, naming the command to run in a terminal; nothing printed."""
    fenced_config(isolated_env, sts_env)
    line = one_error_line(run_without_terminal(*argv), EXIT_ERROR)
    command = f"imsa {argv[0]} c2" + (" -- true" if argv[0] == "exec" else "")
    assert "confirm: true" in line and line.endswith(f"run it in one: {command}")


def test_confirm_asks_on_the_terminal_each_time(isolated_env, active_service, sts_env):
    """Through a pty: yes gives the credentials, no (or anything else) refuses; asked again on every run."""
    fenced_config(isolated_env, sts_env)
    process, prompts, stdout, stderr = answer_on_terminal(["export", "c2", "--format", "json", "--mfa-token",
                                                           MFA_CODE], ["y"], until=PROMPT_END)
    assert process.returncode == 0, stderr
    assert "give c2's credentials" in prompts[0] and "`imsa export c2`" in prompts[0]
    assert json.loads(stdout)["AccessKeyId"]

    process, prompts, stdout, stderr = answer_on_terminal(["export", "c2", "--mfa-token", MFA_CODE], ["n"],
                                                          until=PROMPT_END)
    assert process.returncode == EXIT_ERROR and stdout == ""
    assert "imsa: error: not confirmed" in stderr

    process, prompts, stdout, stderr = answer_on_terminal(["credential-process", "c2"], ["yes"], until=PROMPT_END)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["Version"] == 1

    process, prompts, stdout, stderr = answer_on_terminal(["exec", "c2", "--", "sh", "-c", "echo ran"], ["y"],
                                                          until=PROMPT_END)
    assert process.returncode == 0, stderr
    assert "`imsa exec c2 -- sh -c 'echo ran'`" in prompts[0] and stdout == "ran\n"
    # A profile without the key is never asked about.
    done = run_without_terminal("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr


def test_confirm_is_asked_even_when_the_session_is_held_and_the_profile_was_resolved_before(
        isolated_env, active_service, sts_env):
    """The held-session fast path of export/credential-process (imsa/commands/fast.py) answers from the profile
    cache: a confirm: true profile must never be answered there, or the question is skipped."""
    fenced_config(isolated_env, sts_env)
    process, _, stdout, stderr = answer_on_terminal(["export", "c2", "--mfa-token", MFA_CODE], ["y"],
                                                    until=PROMPT_END)
    assert process.returncode == 0 and "AWS_ACCESS_KEY_ID" in stdout, stderr
    for argv in (["credential-process", "c2"], ["export", "c2"], ["export", "c2", "--format", "json"]):
        line = one_error_line(run_without_terminal(*argv), EXIT_ERROR)
        assert "confirm: true" in line
    done = run_without_terminal("export", "a")  # a profile without the key: answered, by whichever path
    assert done.returncode == 0 and "AWS_ACCESS_KEY_ID" in done.stdout, done.stderr
