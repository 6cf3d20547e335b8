"""Every delivery format of ``imsa export``, each consumed by the tool it is for: bash, zsh and fish evaluate the
shell exports, boto3 and the AWS SDK for JavaScript v3 take the ``boto``/``js`` constructor arguments, botocore
runs the ``json`` as a credential_process, node reads the ``dotenv`` file, and boto3 and the AWS CLI read the
profile written into a credentials file, whose other bytes stay as they were.

Each consumer then asks the fake STS who it is: the role's ARN proves the credentials arrived whole.
"""

import datetime
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import MFA_CODE, one_error_line, run_imsa, write_config
from jsclient import JS_DIR, WHOAMI, node, whoami  # noqa: F401 (node is a fixture)

from imsa import formats
from imsa.config import Profile
from imsa.credentials import Credentials

AWS = os.path.join(os.path.dirname(sys.executable), "aws")
FROM_EXPORT = os.path.join(JS_DIR, "fromexport.mjs")
# Who boto3 is in the environment it runs in, and what the export left in that environment.
WHOAMI_PY = ("import boto3, os; print(boto3.client('sts').get_caller_identity()['Arn']); "
             "print(*(os.environ.get(name, '-') for name in ('IMSA_PROFILE', 'AWS_REGION', 'AWS_PROFILE')))")
# A credentials file as people keep them: comments, blank lines, odd spacing, a last line without its newline.
OTHER_PROFILES = (
    b"# my keys; do not share\n"
    b"[default]\n"
    b"aws_access_key_id = AKIAEXAMPLEDEFAULT00\n"
    b"aws_secret_access_key=secret/default+key\n"
    b"\n"
    b";  old style comment\n"
    b"[work]   \n"
    b"aws_access_key_id   =   AKIAEXAMPLEWORK00000\n"
    b"aws_secret_access_key = work\n"
    b"# trailing comment, no newline at the end"
)


@pytest.fixture
def exporter(isolated_env, sts_env):
    """~/.imsa with profile r (role-a, region eu-west-1); a function running ``imsa export r ARGS...``."""
    write_config(isolated_env, sts_env, extra={"r": {"extends": "a", "region": "eu-west-1"}})

    def export(*args):
        done = run_imsa("export", "r", "--mfa-token", MFA_CODE, *args)
        assert done.returncode == 0, done.stderr
        return done
    return export


def role_a(sts_env):
    return f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/tester-a"


def whoami_in(shell_argv, text, env=None):
    """Run *text* then boto3's WHOAMI_PY in a real shell; (ARN, IMSA_PROFILE, AWS_REGION, AWS_PROFILE)."""
    script = text + f"\n{sys.executable} -c \"{WHOAMI_PY}\"\n"
    done = subprocess.run([*shell_argv, script], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, AWS_PROFILE="stale", **(env or {})))
    assert done.returncode == 0, (done.stdout, done.stderr)
    arn, rest = done.stdout.splitlines()
    return (arn, *rest.split())


@pytest.mark.parametrize("shell, fmt", [("bash", "sh"), ("zsh", "sh"), ("fish", "fish")])
def test_shell_exports_are_evaluated_by_the_real_shell(exporter, sts_env, shell, fmt):
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed (.ci/run installs it)")
    text = exporter("--format", fmt).stdout
    assert whoami_in([shell, "-c"], text) == (role_a(sts_env), "r", "eu-west-1", "-")
    # And the way back, in the same shell.
    undo = run_imsa("export", "--unset", "--format", fmt).stdout
    script = text + undo + "\nenv\n"
    done = subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=60)
    names = {line.split("=", 1)[0] for line in done.stdout.splitlines()}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "IMSA_PROFILE", "AWS_REGION"}


@pytest.mark.skipif(not shutil.which("pwsh"), reason="PowerShell is not installed (Debian has no package for it)")
def test_powershell_exports_are_evaluated_by_pwsh(exporter, sts_env):
    text = exporter("--format", "powershell").stdout
    assert whoami_in(["pwsh", "-NoProfile", "-Command"], text.replace("\n", ";\n"))[0] == role_a(sts_env)


def test_powershell_quoting_doubles_single_quotes_only():
    profile = Profile(name="it's $(x) `y`", region=None)
    creds = Credentials("ASIA0000000000000001", "se'cret", "token",
                        datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc))
    text = formats.render("powershell", profile, creds)
    assert "$Env:IMSA_PROFILE = 'it''s $(x) `y`'" in text.splitlines()
    assert "$Env:AWS_SECRET_ACCESS_KEY = 'se''cret'" in text.splitlines()
    assert text.splitlines()[-1] == "Remove-Item Env:AWS_PROFILE -ErrorAction SilentlyContinue"


def test_json_is_run_by_botocore_as_a_credential_process(exporter, sts_env, isolated_env, tmp_path):
    saved = tmp_path / "creds.json"
    saved.write_text(exporter("--format", "json").stdout)
    config = isolated_env / ".aws" / "config"
    config.write_text(f"[profile fromjson]\ncredential_process = /bin/cat {saved}\nregion = us-east-1\n")
    done = subprocess.run([sys.executable, "-c", "import boto3; print(boto3.Session(profile_name='fromjson')"
                           ".client('sts').get_caller_identity()['Arn'])"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == role_a(sts_env)


def test_boto_is_a_session_boto3_builds(exporter, sts_env):
    text = exporter("--format", "boto").stdout
    assert text.startswith("boto3.session.Session(")
    program = ("import boto3, sys; session = eval(sys.stdin.read()); "
               "print(session.region_name); print(session.client('sts').get_caller_identity()['Arn'])")
    done = subprocess.run([sys.executable, "-c", program], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["eu-west-1", role_a(sts_env)]


def test_js_is_a_client_configuration_the_js_sdk_takes(exporter, sts_env, node, tmp_path):
    saved = tmp_path / "config.js"
    saved.write_text(exporter("--format", "js").stdout)
    got = whoami([node, FROM_EXPORT, str(saved)], dict(os.environ, WHOAMI_STS_ENDPOINT=sts_env.endpoint))
    assert got["Arn"] == role_a(sts_env)
    assert got["region"] == "eu-west-1"
    assert got["expiration"].endswith("Z")


def test_dotenv_is_read_by_node_env_file(exporter, sts_env, node, tmp_path):
    saved = tmp_path / "aws.env"
    saved.write_text(exporter("--format", "dotenv").stdout)
    env = dict(os.environ, WHOAMI_STS_ENDPOINT=sts_env.endpoint, AWS_EC2_METADATA_DISABLED="true")
    got = whoami([node, f"--env-file={saved}", WHOAMI], env)
    assert got["Arn"] == role_a(sts_env)
    assert "AWS_ACCESS_KEY_ID" in got["env"] and "AWS_SESSION_TOKEN" in got["env"]


# --- credentials files ---


def credentials_path(home):
    return home / ".aws" / "credentials"


def boto3_in_profile(name, env=None):
    """The ARN boto3 gets for profile *name* of the credentials file."""
    program = (f"import boto3; print(boto3.Session(profile_name={name!r}, region_name='us-east-1')"
               ".client('sts').get_caller_identity()['Arn'])")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def aws_cli_in_profile(name, sts_env, env=None):
    """The ARN the AWS CLI gets for profile *name* (--endpoint-url: the CLI's own way to the fake STS)."""
    done = subprocess.run([AWS, "sts", "get-caller-identity", "--profile", name, "--region", "us-east-1",
                           "--endpoint-url", sts_env.endpoint, "--output", "json"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["Arn"]


def test_a_credentials_file_profile_is_read_by_boto3_and_the_aws_cli_and_erased_byte_for_byte(
        exporter, sts_env, isolated_env):
    path = credentials_path(isolated_env)
    path.write_bytes(OTHER_PROFILES)
    done = exporter("--to-credentials-file", "imsa-r")
    assert done.stdout == ""
    assert "wrote [imsa-r]" in done.stderr and "imsa export --erase imsa-r" in done.stderr
    written = path.read_bytes()
    assert written.startswith(OTHER_PROFILES)  # (the last line got its newline, before imsa's lines)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert boto3_in_profile("imsa-r") == role_a(sts_env)
    assert aws_cli_in_profile("imsa-r", sts_env) == role_a(sts_env)

    # Written again: replaced where it is, nothing else moves.
    exporter("--to-credentials-file", "imsa-r")
    again = path.read_bytes()
    assert again.count(b"[imsa-r]") == 1 and again.startswith(OTHER_PROFILES)

    done = run_imsa("export", "--erase", "imsa-r")
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == OTHER_PROFILES + b"\n"


def test_erase_in_a_file_ending_with_a_newline_gives_back_every_byte(exporter, isolated_env):
    path = credentials_path(isolated_env)
    original = OTHER_PROFILES + b"\n[last]\naws_access_key_id = AKIAEXAMPLELAST00000\n"
    path.write_bytes(original)
    exporter("--to-credentials-file")  # NAME defaults to the profile's: r
    assert b"\n[r]\n" in path.read_bytes()
    assert run_imsa("export", "--erase", "r").returncode == 0
    assert path.read_bytes() == original


def test_a_dedicated_file_prints_the_exports_that_use_it(exporter, sts_env, tmp_path):
    dedicated = tmp_path / "private" / "creds"
    done = exporter("--to-credentials-file", "work-r", "--file", str(dedicated))
    assert stat.S_IMODE(dedicated.stat().st_mode) == 0o600
    assert stat.S_IMODE(dedicated.parent.stat().st_mode) == 0o700
    arn, _, _, profile = whoami_in(["bash", "-c"], done.stdout, env={"AWS_DEFAULT_REGION": "us-east-1"})
    assert (arn, profile) == (role_a(sts_env), "work-r")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(dedicated)}
    assert aws_cli_in_profile("work-r", sts_env, env) == role_a(sts_env)
    assert run_imsa("export", "--erase", "work-r", "--file", str(dedicated)).returncode == 0
    assert dedicated.read_bytes() == b""


@pytest.mark.security
def test_a_profile_imsa_did_not_write_is_never_overwritten_or_erased(exporter, isolated_env):
    path = credentials_path(isolated_env)
    path.write_bytes(OTHER_PROFILES)
    line = one_error_line(run_imsa("export", "r", "--mfa-token", MFA_CODE, "--to-credentials-file", "work"), 1)
    assert "[work] in" in line and "not written by imsa" in line
    line = one_error_line(run_imsa("export", "--erase", "default"), 1)
    assert "not written by imsa" in line
    assert path.read_bytes() == OTHER_PROFILES


def test_an_edited_imsa_profile_is_left_alone(exporter, isolated_env):
    path = credentials_path(isolated_env)
    exporter("--to-credentials-file", "mine")
    path.write_bytes(path.read_bytes() + b"region = us-east-1\n")
    before = path.read_bytes()
    line = one_error_line(run_imsa("export", "--erase", "mine"), 1)
    assert "edited since imsa wrote it (region added)" in line
    assert path.read_bytes() == before


def test_a_name_whose_config_profile_has_a_role_is_refused(exporter, isolated_env):
    (isolated_env / ".aws" / "config").write_text("[profile r]\nrole_arn = arn:aws:iam::123456789012:role/x\n"
                                                  "source_profile = default\n")
    line = one_error_line(run_imsa("export", "r", "--mfa-token", MFA_CODE, "--to-credentials-file"), 3)
    assert "has role_arn" in line and "--to-credentials-file imsa-r" in line


def test_erasing_what_is_not_there_says_so_and_succeeds(isolated_env):
    done = run_imsa("export", "--erase", "nothing")
    assert done.returncode == 0 and "nothing to remove" in done.stderr


@pytest.mark.parametrize("args, message", [
    (("export", "--unset", "--format", "json"), "--unset prints shell lines"),
    (("export", "--erase", "x", "--to-credentials-file"), "--erase goes alone"),
    (("export", "r", "--erase", "x"), "--erase takes no PROFILE"),
    (("export", "r", "--file", "/tmp/x"), "--file goes with"),
    (("export", "r", "--to-credentials-file", "--format", "boto"), "--to-credentials-file prints shell lines"),
])
def test_delivery_options_that_do_not_go_together_are_usage_errors(isolated_env, args, message):
    assert message in one_error_line(run_imsa(*args), 2)
