"""imsa credential-process: the Version 1 JSON contract, the service's session reused, MFA on /dev/tty only."""

import datetime
import json
import os
import subprocess
import sys
import termios

import pytest

from conftest import MFA_CODE, answer_on_terminal, one_error_line, write_config

STAMP = "%Y-%m-%dT%H:%M:%SZ"


def without_terminal(*args, env=None):
    """Run the CLI in a new session (no controlling terminal: /dev/tty cannot be opened), stdin at /dev/null."""
    return subprocess.run(
        [sys.executable, "-m", "imsa", *args], capture_output=True, text=True, env=env or dict(os.environ),
        stdin=subprocess.DEVNULL, start_new_session=True, timeout=60,
    )


def check_process_json(stdout, sts_env, role):
    lines = stdout.splitlines()
    assert len(lines) == 1, "exactly one JSON object on stdout"
    data = json.loads(lines[0])
    assert data["Version"] == 1
    assert set(data) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration", "AccountId"}
    assert data["AccountId"] == sts_env.account
    expiration = datetime.datetime.strptime(data["Expiration"], STAMP).replace(tzinfo=datetime.timezone.utc)
    assert expiration - datetime.datetime.now(datetime.timezone.utc) >= datetime.timedelta(minutes=25)
    import boto3

    arn = boto3.client("sts", endpoint_url=sts_env.endpoint, region_name="us-east-1",
                       aws_access_key_id=data["AccessKeyId"], aws_secret_access_key=data["SecretAccessKey"],
                       aws_session_token=data["SessionToken"]).get_caller_identity()["Arn"]
    assert arn.endswith(f":assumed-role/{role}/tester-{role[-1]}")
    return data


def test_the_services_session_is_reused_without_a_terminal(active_service, sts_env):
    before = sts_env.mark()
    done = without_terminal("credential-process", "c")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    check_process_json(done.stdout, sts_env, "role-c")
    assert sts_env.calls("GetSessionToken", before) == 0
    # IMDS still serves the profile it served.
    assert active_service.client.status()["active"]["profile"] == "a"


def test_no_session_and_no_terminal_exits_4_and_says_to_assume_first(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    line = one_error_line(without_terminal("credential-process", "c"), 4)
    assert "run `imsa assume c` in a terminal first" in line
    assert sts_env.actions(before) == []


def test_botocore_shows_the_one_line_reason(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    (isolated_env / ".aws" / "config").write_text(
        f"[profile c]\ncredential_process = {sys.executable} -m imsa credential-process c\n"
    )
    script = (
        "import boto3, botocore.exceptions\n"
        "try:\n"
        "    boto3.Session(profile_name='c').get_credentials()\n"
        "except botocore.exceptions.CredentialRetrievalError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ))
    assert "run `imsa assume c` in a terminal first" in done.stdout, done.stderr


def test_without_the_service_and_without_a_terminal_exits_5(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    line = one_error_line(without_terminal("credential-process", "c"), 5)
    assert "imsa start" in line and "imsa assume c" in line


def test_without_the_service_mfa_process_still_works(isolated_env, sts_env):
    write_config(isolated_env, sts_env, extra={
        "auto": {"extends": "c", "mfa_process": f"{sys.executable} -c \"print('{MFA_CODE}')\""},
    })
    before = sts_env.mark()
    done = without_terminal("credential-process", "auto")
    assert done.returncode == 0, done.stderr
    assert "not running" in done.stderr
    check_process_json(done.stdout, sts_env, "role-c")
    assert sts_env.calls("GetSessionToken", before) == 1


def test_a_missing_profile_is_a_configuration_error(active_service):
    line = one_error_line(without_terminal("credential-process", "nope"), 3)
    assert "no profile 'nope'" in line


@pytest.mark.skipif(not hasattr(termios, "TIOCSCTTY"), reason="needs TIOCSCTTY to give a child a terminal")
def test_with_a_terminal_it_asks_there_and_hands_the_session_to_the_service(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    process, prompts, stdout, stderr = answer_on_terminal(["credential-process", "c"], [MFA_CODE])
    assert "MFA code for" in prompts[0], prompts
    assert process.returncode == 0, stderr
    assert "MFA code" not in stdout
    check_process_json(stdout, sts_env, "role-c")
    # The session now lives in the service: another profile of the same source needs no code and no terminal.
    done = without_terminal("credential-process", "d")
    assert done.returncode == 0, done.stderr
    check_process_json(done.stdout, sts_env, "role-d")
    assert sts_env.calls("GetSessionToken", before) == 1
