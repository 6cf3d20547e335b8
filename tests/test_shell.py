"""The shell set-up a new user meets, in real shells: the region hook (``imsa shell-init``), completion
(``imsa completion``), ``imsa export --unset`` and the shell ``imsa exec PROFILE`` starts.

The AWS CLI v2 is not on PyPI and cannot be installed by the suite: the region path is tested with boto3 and the
AWS CLI v1 (the hook sets AWS_REGION, which the v2 reads first, and AWS_DEFAULT_REGION).
"""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import MFA_CODE, run_imsa, write_config
from ptyshell import IMSA, SHELL_ARGV, PtyShell, shell_user  # noqa: F401  (shell_user is a fixture)
from imsa import shell
from imsa.commands import common, exec as commands_exec
from imsa.config import Profile

SHELLS = ("bash", "zsh", "fish")
AWS = "aws sts get-caller-identity --query Arn --output text"
BOTO3 = ('python -c "import boto3; s = boto3.Session(); '
         "print('boto3', s.region_name, s.client('sts').get_caller_identity()['Arn'])\"")
HOOK = {"bash": 'eval "$(imsa shell-init bash)"', "zsh": 'eval "$(imsa shell-init zsh)"',
        "fish": "imsa shell-init fish | source"}
SET_REGION = {"bash": "export AWS_REGION=eu-central-1", "zsh": "export AWS_REGION=eu-central-1",
              "fish": "set -gx AWS_REGION eu-central-1"}
UNSET_REGION = {"bash": "unset AWS_REGION", "zsh": "unset AWS_REGION", "fish": "set -e AWS_REGION"}
SHOW_REGION = 'echo "region=[$AWS_REGION/$AWS_DEFAULT_REGION]"'
# What imsa export sets (and --unset removes): the credentials, IMSA_PROFILE*, and the profile's region.
NAMES = "AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_CREDENTIAL_EXPIRATION|IMSA_PROFILE|" \
        "IMSA_PROFILE_EXPIRATION|AWS_REGION|AWS_DEFAULT_REGION"


def needs(kind):
    return pytest.mark.skipif(not shutil.which(kind), reason=f"{kind} is not installed (.ci/run installs it)")


# --- the region hook ---


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=needs(kind)) for kind in SHELLS])
def test_region_hook_makes_boto3_and_the_aws_cli_v1_work_after_assume(shell_user, kind):
    endpoint = shell_user.start_dev_service()
    sh = shell_user.shell(kind, shell_user.with_endpoint(endpoint))
    try:
        # As a new user met it: the profile has a region, IMDS serves it, and yet boto3 and the AWS CLI v1 have none.
        shown, code = sh.run(f"command imsa assume r --mfa-token {MFA_CODE}")
        assert code == 0 and "this shell has no AWS region" in shown and HOOK[kind] in shown, shown
        shown, code = sh.run(AWS)
        assert code != 0 and "You must specify a region" in shown, shown
        shown, code = sh.run(BOTO3)
        assert code != 0 and "NoRegionError" in shown, shown

        assert sh.run(HOOK[kind])[1] == 0
        shown, code = sh.run(AWS)
        assert code == 0 and "assumed-role/role-d/shell-r" in shown, shown
        shown, code = sh.run(BOTO3)
        assert code == 0 and "boto3 us-west-2 arn:aws:sts::123456789012:assumed-role/role-d/shell-r" in shown, shown

        # At each prompt: `command imsa` bypasses the hook's function, so the next prompt alone brings the change.
        assert sh.run("command imsa assume a")[1] == 0
        assert "region=[/]" in sh.run(SHOW_REGION)[0]
        assert sh.run("command imsa assume r")[1] == 0
        assert "region=[us-west-2/us-west-2]" in sh.run(SHOW_REGION)[0]
        # Right after the command, through the hook's imsa function (which also keeps imsa assume quiet about it).
        shown, code = sh.run(f"imsa assume a && {SHOW_REGION}")
        assert code == 0 and "region=[/]" in shown and "has no AWS region" not in shown, shown
        shown, code = sh.run(f"imsa assume r && {SHOW_REGION}")
        assert code == 0 and "region=[us-west-2/us-west-2]" in shown and "warning" not in shown, shown

        # A region the person set is theirs: the hook leaves it, and imsa assume says it differs from the profile's.
        sh.run(SET_REGION[kind])
        shown, code = sh.run(f"imsa assume r && {SHOW_REGION}")
        assert code == 0 and "region=[eu-central-1/us-west-2]" in shown and "not us-west-2" in shown, shown
        sh.run(UNSET_REGION[kind])
        assert "region=[us-west-2/us-west-2]" in sh.run(SHOW_REGION)[0]

        # No service, no region from it.
        shown, code = sh.run(f"imsa stop && {SHOW_REGION}")
        assert code == 0 and "region=[/]" in shown, shown
    finally:
        sh.close()


def test_the_region_file_is_the_users_0600_file_beside_the_socket(shell_user):
    shell_user.start_dev_service()
    done = shell_user.imsa("assume", "r", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    status = shell_user.imsa("status", "--json")
    import json

    socket_path = json.loads(status.stdout)["control_socket"]
    path = shell.region_file(socket_path)
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == shell_user.uid
    with open(path) as handle:
        assert handle.read() == "us-west-2\n"
    assert shell_user.imsa("assume", "a").returncode == 0
    assert not os.path.exists(path)  # a profile without a region: no file, so the hook clears what it set
    assert shell_user.imsa("assume", "r").returncode == 0
    assert shell_user.imsa("stop").returncode == 0
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="checks what root leaves alone in a user's run directory")
def test_root_talking_to_a_users_service_writes_no_region_file_there(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env, extra={"r": {"extends": "a", "region": "us-west-2"}})
    done = run_imsa("assume", "r", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert run_imsa("status").returncode == 0
    assert os.listdir(os.path.dirname(service.socket)) == [os.path.basename(service.socket)]


def test_the_hook_ignores_a_region_file_that_is_not_a_region(tmp_path):
    # The hook reads a file: whatever is in it never runs, and only a region name is taken.
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(run / "control.sock"))
    try:
        script = shell.shell_init("bash").replace(
            "_imsa_places=(", f"_imsa_places=({run}/control.sock {run}/region ", 1)
        results = []
        for content in ("eu-west-1\n", "$(touch pwned)\n", "us-east-1; touch pwned\n", "US-EAST-1\n", ""):
            (run / "region").write_text(content)
            done = subprocess.run(["bash", "--norc", "-c", script + '\necho "[${AWS_REGION-unset}]"'],
                                  capture_output=True, text=True, cwd=tmp_path, timeout=30,
                                  env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
            results.append(done.stdout.strip())
    finally:
        listener.close()
    assert results == ["[eu-west-1]", "[unset]", "[unset]", "[unset]", "[unset]"]
    assert not (tmp_path / "pwned").exists()


def test_exec_pins_its_profiles_region_for_a_hooked_shell_inside():
    env = commands_exec.child_environment(
        {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2", shell.HOOK_VARIABLE: "us-west-2"},
        Profile(name="x", region="eu-west-1"), {},
    )
    assert env["AWS_REGION"] == "eu-west-1" and shell.HOOK_VARIABLE not in env


@pytest.mark.parametrize("environ, profile, expected", [
    ({"SHELL": "/bin/bash"}, "r", 'eval "$(imsa shell-init bash)"'),
    ({"SHELL": "/usr/bin/fish"}, "r", "imsa shell-init fish | source"),
    ({"SHELL": "/usr/bin/zsh"}, "a", "names no region and this shell has none"),
    ({"AWS_REGION": "eu-central-1"}, "r", "this shell's region is eu-central-1, not us-west-2"),
    ({"IMSA_SHELL_HOOK": "1"}, "r", None),
    ({"IMSA_SHELL_HOOK": "1", "AWS_REGION": "us-west-2", "IMSA_SHELL_REGION": "us-west-2"}, "r", None),
    ({"IMSA_SHELL_HOOK": "1"}, "a", "names no region"),
    ({"AWS_DEFAULT_REGION": "us-west-2"}, "r", None),
    ({"AWS_PROFILE": "dev"}, "a", None),  # the AWS config file gives [profile dev] a region
])
def test_assume_says_when_sdks_in_this_shell_would_have_no_region_or_another(tmp_path, environ, profile, expected):
    config = tmp_path / "config"
    config.write_text("[profile dev]\nregion = eu-west-1\n")
    profiles = {"a": Profile(name="a"), "r": Profile(name="r", region="us-west-2")}
    advice = common.region_advice(profiles[profile], dict(environ, AWS_CONFIG_FILE=str(config)))
    if expected is None:
        assert advice is None
    else:
        assert expected in advice


# --- imsa export --unset ---


def test_export_unset_undoes_export_in_sh(isolated_env, sts_env):
    write_config(isolated_env, sts_env, extra={"r": {"extends": "a", "region": "us-west-2"}})
    script = (f'eval "$(imsa export r --mfa-token {MFA_CODE})" || exit 9\n'
              'echo "during=[$AWS_ACCESS_KEY_ID|$IMSA_PROFILE|$AWS_REGION]"\n'
              'eval "$(imsa export --unset)" || exit 9\n'
              f"env | grep -E '^({NAMES})=' || echo after=none\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    done = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    during, after = done.stdout.splitlines()
    assert during.startswith("during=[ASIA") and during.endswith("|r|us-west-2]")
    assert after == "after=none"


@needs("fish")
def test_export_unset_undoes_export_in_fish(isolated_env, sts_env):
    write_config(isolated_env, sts_env, extra={"r": {"extends": "a", "region": "us-west-2"}})
    script = (f"imsa export r --format fish --mfa-token {MFA_CODE} | source\n"
              'echo "during=[$AWS_ACCESS_KEY_ID|$IMSA_PROFILE|$AWS_REGION]"\n'
              "imsa export --unset --format fish | source\n"
              f"env | grep -E '^({NAMES})='; or echo after=none\n"
              "if set -q AWS_SESSION_TOKEN; echo still-a-shell-variable; end\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    done = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    during, after = done.stdout.splitlines()
    assert during.startswith("during=[ASIA") and during.endswith("|r|us-west-2]")
    assert after == "after=none"


@pytest.mark.parametrize("args, words", [
    (("export", "--unset", "a"), "takes no PROFILE"),
    (("export", "--unset", "--format", "json"), "--format sh, fish, powershell"),
    (("export",), "name the PROFILE"),
])
def test_export_unset_usage_errors(isolated_env, args, words):
    done = run_imsa(*args)
    assert done.returncode == 2 and words in done.stderr and done.stdout == ""


# --- imsa exec PROFILE: a shell with the role ---


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=needs(kind)) for kind in ("bash", "fish")])
def test_exec_without_a_command_starts_shell_with_the_role(isolated_env, service, sts_env, kind):
    write_config(isolated_env, sts_env)
    assert run_imsa("assume", "b", "--mfa-token", MFA_CODE).returncode == 0  # IMDS serves role-b meanwhile
    # IMDS off: the container endpoint is the only way to credentials (and nothing may ask 169.254.169.254 here).
    env = dict(os.environ, SHELL=shutil.which(kind), AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    commands_in = f'echo "profile=[$IMSA_PROFILE]"\n{AWS}\nexit 7\n'
    done = subprocess.run([IMSA, "exec", "a"], input=commands_in, capture_output=True, text=True, env=env, timeout=90)
    assert done.returncode == 7, done.stderr  # the shell's own status
    assert f"starting {shutil.which(kind)} with a's role" in done.stderr
    assert done.stdout.splitlines() == ["profile=[a]", f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/tester-a"]


def test_exec_without_a_command_in_static_mode_needs_no_service(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    env = dict(os.environ, SHELL="/bin/sh")
    done = subprocess.run([IMSA, "exec", "a", "--mode", "static", "--mfa-token", MFA_CODE],
                          input='echo "[$IMSA_PROFILE]"; test -n "$AWS_SESSION_TOKEN"\n', capture_output=True,
                          text=True, env=env, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[a]\n" and "starting /bin/sh with a's role" in done.stderr


# --- completion without a system argcomplete ---


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=needs(kind)) for kind in SHELLS])
def test_completion_code_completes_commands_and_profile_names_in_a_real_shell(isolated_env, sts_env, kind):
    write_config(isolated_env, sts_env)
    # Start-up files are not read, so no system-wide argcomplete activation takes part: only imsa's own code.
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "HOME": str(isolated_env),
           "IMSA_CONFIG": os.environ["IMSA_CONFIG"], "TERM": "dumb", "LANG": "C.UTF-8"}
    sh = PtyShell(kind, SHELL_ARGV[kind], env, str(isolated_env))
    try:
        if kind != "fish":
            sh.run("PS1='$ '")
        if kind == "zsh":
            assert sh.run("autoload -U compinit && compinit -u")[1] == 0
        load = f"imsa completion {kind} | source" if kind == "fish" else f'eval "$(imsa completion {kind})"'
        assert sh.run(load)[1] == 0
        assert sh.complete("imsa assume ba") == ["imsa", "assume", "base"]
        assert sh.complete("imsa ass") == ["imsa", "assume"]
        assert sh.complete("imsa export --unset --format fi") == ["imsa", "export", "--unset", "--format", "fish"]
    finally:
        sh.close()


@pytest.mark.parametrize("kind", SHELLS)
def test_completion_code_is_argcompletes_own(kind):
    import argcomplete

    done = run_imsa("completion", kind)
    assert done.returncode == 0 and done.stdout == argcomplete.shellcode(["imsa"], shell=kind)
