"""The shell set-up a new user meets, in real shells: completion (``imsa completion``), ``imsa export --unset`` and
the shell ``imsa exec PROFILE`` starts."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import MFA_CODE, run_imsa, write_config
from ptyshell import IMSA, SHELL_ARGV, PtyShell

SHELLS = ("bash", "zsh", "fish")
AWS = "aws sts get-caller-identity --query Arn --output text"
# What imsa export sets (and --unset removes): the credentials, IMSA_PROFILE*, and the profile's region.
NAMES = "AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_CREDENTIAL_EXPIRATION|IMSA_PROFILE|" \
        "IMSA_PROFILE_EXPIRATION|AWS_REGION|AWS_DEFAULT_REGION"


def needs(kind):
    return pytest.mark.skipif(not shutil.which(kind), reason=f"{kind} is not installed (.ci/run installs it)")


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
    (("export", "--unset", "--format", "json"), "--format sh or fish"),
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
