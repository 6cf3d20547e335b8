"""The CLI's contract: exit codes, one-line errors on stderr, tracebacks only with --debug, and export formats."""

import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys

import boto3
import pytest

from conftest import MFA_CODE, one_error_line, read_terminal, run_imsa, run_without_terminal, with_terminal, write_config
from imsa import cli, formats
from imsa.commands import service as service_commands
from imsa.config import Profile
from imsa.credentials import Credentials

EXPORTED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
            "IMSA_PROFILE", "IMSA_PROFILE_EXPIRATION")


def caller_arn(creds, sts_server):
    """GetCallerIdentity against the fake STS: proves exported credentials are real."""
    client = boto3.client("sts", endpoint_url=sts_server.endpoint, region_name="us-east-1", **creds)
    return client.get_caller_identity()["Arn"]


def parse_sh(text):
    """``export K=V`` / ``unset K`` lines, split as sh would: ({K: V}, [unset names])."""
    values, unset = {}, []
    for line in text.splitlines():
        words = shlex.split(line)
        if words[0] == "export":
            assert len(words) == 2, line
            key, value = words[1].split("=", 1)
            values[key] = value
        else:
            assert words[0] == "unset", line
            unset.extend(words[1:])
    return values, unset


# --- MFA through the CLI, against the fake STS (which accepts only MFA_CODE) ---


def test_wrong_mfa_token_exits_4_with_one_line_about_the_code(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    line = one_error_line(run_imsa("assume", "a", "--mfa-token", "000000"), 4)
    assert "MFA code" in line and "invalid MFA one time pass code.)" in line  # STS's trailing space is trimmed
    assert "again with the current code" in line
    assert sts_env.calls("GetSessionToken", before) == 1  # a given code is not retried
    assert sts_env.calls("AssumeRole", before) == 0


def test_no_terminal_and_no_mfa_token_exits_4_and_says_what_to_do(isolated_env, service, sts_env):
    probe = subprocess.run([sys.executable, "-c", "open('/dev/tty')"], capture_output=True, start_new_session=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    assert probe.returncode != 0, "a new session must have no controlling terminal"
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    line = one_error_line(run_without_terminal("assume", "a"), 4)
    assert "--mfa-token" in line and "mfa_process" in line
    assert sts_env.actions(before) == []


# --- no service running ---


@pytest.mark.parametrize("args", [("assume", "a"), ("status",), ("status", "--json"), ("stop",)])
def test_command_needing_the_service_exits_5_when_none_runs(isolated_env, sts_env, args):
    write_config(isolated_env, sts_env)
    line = one_error_line(run_imsa(*args), 5)
    assert "not running" in line and "imsa start" in line


def test_export_without_a_service_calls_sts_directly_and_says_nothing_is_cached(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert "nothing is cached" in done.stderr and "Traceback" not in done.stderr
    values, _ = parse_sh(done.stdout)
    creds = {"aws_access_key_id": values["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": values["AWS_SECRET_ACCESS_KEY"],
             "aws_session_token": values["AWS_SESSION_TOKEN"]}
    assert caller_arn(creds, sts_env).endswith(":assumed-role/role-a/tester-a")
    assert sts_env.calls("GetSessionToken", before) == 1 and sts_env.calls("AssumeRole", before) == 1


# --- tracebacks only with --debug ---


def test_debug_shows_the_traceback_of_an_error(isolated_env):
    done = run_imsa("--debug", "assume", "a")
    assert done.returncode == 3
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("imsa: error: ")


@pytest.mark.parametrize("profile", ["base", "a"])
def test_regression_debug_printed_the_sts_answers_with_the_session_secret_and_token(isolated_env, sts_env, profile):
    # botocore's DEBUG lines include every raw response: `imsa --debug` printed GetSessionToken's answer, i.e. the
    # MFA session's secret and token (valid for hours), and AssumeRole's. Its wire logs stay off even with --debug.
    write_config(isolated_env, sts_env)
    done = run_imsa("--debug", "export", profile, "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    values, _ = parse_sh(done.stdout)  # base: the MFA session itself; a: role-a's credentials made from it
    assert "imsa: the service is not running" in done.stderr  # the CLI called STS itself, in this process
    for secret in (values["AWS_SECRET_ACCESS_KEY"], values["AWS_SESSION_TOKEN"],
                   sts_env.users["alice"]["aws_secret_access_key"]):
        assert secret not in done.stderr


def test_without_debug_an_error_has_no_traceback(isolated_env):
    one_error_line(run_imsa("assume", "a"), 3)
    one_error_line(run_imsa("-v", "assume", "a"), 3)


def test_unexpected_exception_is_one_line_and_raised_only_with_debug(isolated_env, monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(service_commands, "status", broken)
    assert cli.main(["status"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "imsa: error: unexpected RuntimeError: something broke (run with --debug for details)\n"
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "status"])


def test_interrupt_exits_130(isolated_env, monkeypatch, capsys):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(service_commands, "status", interrupted)
    assert cli.main(["status"]) == 130
    assert capsys.readouterr().err == "imsa: interrupted\n"


def test_missing_profile_argument_is_a_usage_error(isolated_env):
    # With a terminal imsa assume alone offers a list (tests/test_picker.py); without one PROFILE must be named.
    done = run_without_terminal("assume")
    assert "name the PROFILE: imsa assume PROFILE" in one_error_line(done, 2)


# --- export formats (no service: direct STS) ---


def test_export_json_is_credential_process_version_1(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("export", "a", "--format", "json", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert data["Version"] == 1
    expiration = datetime.datetime.strptime(data["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    assert expiration.replace(tzinfo=datetime.timezone.utc) > datetime.datetime.now(datetime.timezone.utc)
    creds = {"aws_access_key_id": data["AccessKeyId"], "aws_secret_access_key": data["SecretAccessKey"],
             "aws_session_token": data["SessionToken"]}
    assert caller_arn(creds, sts_env).endswith(":assumed-role/role-a/tester-a")


def test_export_fish_sets_global_exports(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("export", "a", "--format", "fish", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "set -e AWS_PROFILE;"
    names = [shlex.split(line)[2] for line in lines[:-1]]
    assert all(line.startswith("set -gx ") for line in lines[:-1])
    assert set(names) == set(EXPORTED)
    assert "export " not in done.stdout


def test_export_sh_is_quoted_and_complete_without_region(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    values, unset = parse_sh(done.stdout)
    assert set(values) == set(EXPORTED)  # no AWS_REGION / AWS_DEFAULT_REGION: the profile has none
    assert unset == ["AWS_PROFILE"]
    assert values["IMSA_PROFILE"] == "a"
    assert values["AWS_CREDENTIAL_EXPIRATION"] == values["IMSA_PROFILE_EXPIRATION"]
    evaluated = subprocess.run(
        ["sh", "-c", done.stdout + 'printf "%s\\n" "$AWS_SECRET_ACCESS_KEY" "$IMSA_PROFILE" "${AWS_PROFILE-unset}"'],
        capture_output=True, text=True, env=dict(os.environ, AWS_PROFILE="other"), timeout=30,
    )
    assert evaluated.stdout.splitlines() == [values["AWS_SECRET_ACCESS_KEY"], "a", "unset"]


def test_export_sh_sets_region_when_the_profile_has_one(isolated_env, sts_env):
    write_config(isolated_env, sts_env, extra={"r": {"extends": "a", "region": "eu-west-1"}})
    done = run_imsa("export", "r", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    values, _ = parse_sh(done.stdout)
    assert values["AWS_REGION"] == values["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert set(values) == set(EXPORTED) | {"AWS_REGION", "AWS_DEFAULT_REGION"}


def test_export_sh_quotes_values_a_shell_would_expand(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    nasty = "x'; touch pwned; echo '$(touch pwned2) `touch pwned3` \"q\" \\"
    profile = Profile(name=nasty, region="us-east-1")
    expiration = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    creds = Credentials("ASIA0000000000000001", "se cr$et'\"", "tok/en+==", expiration)
    text = formats.render("sh", profile, creds)
    values, _ = parse_sh(text)
    assert values["IMSA_PROFILE"] == nasty and values["AWS_SECRET_ACCESS_KEY"] == "se cr$et'\""
    evaluated = subprocess.run(
        ["sh", "-c", text + 'printf "%s\\n" "$IMSA_PROFILE" "$AWS_SECRET_ACCESS_KEY"'],
        capture_output=True, text=True, cwd=workdir, timeout=30,
    )
    assert evaluated.stdout.splitlines() == [nasty, "se cr$et'\""]
    assert list(workdir.iterdir()) == []  # nothing the values hold was run


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed")
@pytest.mark.parametrize("value", ["plain", "it's", "back\\slash", "trail\\", "$HOME `x` (y) ;z", "two\\'both"])
def test_fish_quoting_round_trips_through_a_real_fish(value):
    from imsa.shell import fish_quote

    done = subprocess.run(["fish", "--no-config", "-c", f"set -gx V {fish_quote(value)}; printf '%s' $V"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == value


def test_mfa_token_dash_reads_the_code_from_stdin_so_it_never_shows_in_ps(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("assume", "a", "--mfa-token", "-", input=MFA_CODE + "\n")
    assert done.returncode == 0, done.stderr
    assert "new MFA session" in done.stderr
    assert run_imsa("status").returncode == 0


def test_mfa_token_dash_with_no_code_on_stdin_exits_4_with_one_line(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("assume", "a", "--mfa-token", "-", input="")
    assert "stdin is not a 6-digit MFA code" in one_error_line(done, 4)


# --- messages a person meets ---


@pytest.mark.parametrize("key, name", [(b"\x03", "Ctrl-C"), (b"\x04", "Ctrl-D")])
def test_ctrl_c_and_ctrl_d_at_the_mfa_prompt_end_the_prompt_line_first(isolated_env, service, sts_env, key, name):
    write_config(isolated_env, sts_env)
    process, master = with_terminal(["assume", "a"])
    try:
        prompt = read_terminal(master, b": ")
        assert prompt.startswith(b"MFA code for "), prompt
        os.write(master, key)
        stdout, stderr = process.communicate(timeout=60)
        after = read_terminal(master, b"\n", timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    # The terminal shows the key (^C) or nothing (^D), then the line ends: what imsa says next starts a line.
    assert after.rstrip(b"^C").endswith(b"\r\n"), (name, after)
    if key == b"\x03":
        assert (process.returncode, stderr) == (130, "imsa: interrupted\n")
    else:
        assert (process.returncode, stderr) == (4, "imsa: error: no MFA code entered\n")
    assert stdout == ""


def test_every_command_has_an_example_and_its_exit_codes_in_its_help():
    parser = cli.build_parser()
    names = parser._subparsers._group_actions[0].choices  # every command, including ones added later
    assert len(names) >= 8
    for name in list(names) + [None]:
        done = run_imsa(*([name] if name else []), "--help")
        assert done.returncode == 0, (name, done.stderr)
        lines = done.stdout.splitlines()
        example = [line for line in lines if line.startswith("example: ")]
        codes = [line for line in lines if line.startswith("exit codes: ")]
        assert len(example) == 1 and len(codes) == 1, (name, done.stdout)
        assert f"imsa {name or ''}".strip() in example[0], (name, example)
        assert "2 usage" in codes[0] or name in ("stop", "status"), (name, codes)


@pytest.mark.parametrize("args", [("status", "-v"), ("-v", "status"), ("status", "--debug"), ("--debug", "status"),
                                  ("status", "--json", "-v")])
def test_global_flags_are_accepted_before_and_after_the_command(isolated_env, args):
    done = run_imsa(*args)
    assert done.returncode == 5, done.stderr  # parsed: it got as far as looking for the service
    assert "not running" in done.stderr and "usage:" not in done.stderr


@pytest.mark.parametrize("args", [("-v", "export", "a"), ("export", "a", "-v"), ("exec", "a", "-v", "--mode", "static",
                                                                                  "--", "true")])
def test_verbose_after_the_command_shows_what_imsa_does(isolated_env, sts_env, args):
    write_config(isolated_env, sts_env)
    done = run_imsa(*args, "--mfa-token", MFA_CODE) if args[0] != "exec" else run_imsa(*args[:2], "--mfa-token",
                                                                                         MFA_CODE, *args[2:])
    assert done.returncode == 0, done.stderr
    assert "imsa: GetSessionToken for " in done.stderr


def test_debug_after_the_command_shows_the_traceback(isolated_env):
    done = run_imsa("assume", "a", "--debug")
    assert done.returncode == 3
    assert "Traceback" in done.stderr and done.stderr.splitlines()[-1].startswith("imsa: error: ")


def test_regression_an_error_quoting_another_imsa_error_has_one_prefix(isolated_env, monkeypatch, capsys):
    # "imsa: error: the service failed to start: imsa: error: ...": the funnel writes the only prefix, on one line.
    from imsa.errors import ServiceError

    def failing(*_args, **_kwargs):
        raise ServiceError("the service failed to start: imsa: error: cannot bind 127.0.0.1:1: denied\nsecond line")

    monkeypatch.setattr(service_commands, "status", failing)
    assert cli.main(["status"]) == 1
    assert capsys.readouterr().err == (
        "imsa: error: the service failed to start: cannot bind 127.0.0.1:1: denied; second line\n")


def test_ctrl_d_at_the_stderr_prompt_ends_its_line_too(isolated_env, service, sts_env):
    # No controlling terminal (a new session) but stdin and stderr on a terminal: the prompt goes to stderr.
    write_config(isolated_env, sts_env)
    master, slave = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "imsa", "assume", "a"], stdin=slave, stdout=subprocess.PIPE,
                               stderr=slave, start_new_session=True, env=dict(os.environ))
    os.close(slave)
    try:
        prompt = read_terminal(master, b": ")
        assert prompt.startswith(b"MFA code for "), prompt
        os.write(master, b"\x04")
        transcript = read_terminal(master, b"entered\r\n", timeout=30)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        os.close(master)
    assert transcript == b"\r\nimsa: error: no MFA code entered\r\n"
    assert process.returncode == 4
