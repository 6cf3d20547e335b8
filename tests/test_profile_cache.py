"""The held-session fast path of imsa export / credential-process and the profile cache behind it
(imsa/commands/fast.py, imsa/profile_cache.py): the same answer as the full command, without its parsers; a cache
that follows its files, says what the full path says, and holds no secret."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import yaml

from conftest import MFA_CODE, alice_profiles, run_imsa, write_profiles

# What the full command imports and the fast path must not (scripts/bench.py, README "Performance").
HEAVY = ("yaml", "argparse", "dataclasses", "logging", "botocore", "imsa.config", "imsa.credentials", "inspect")


def cache_file(home):
    return home / ".local" / "state" / "imsa" / "profiles.json"


def run_recording_modules(args, modules_path):
    """The CLI with *args* in a process that writes the modules it imported to *modules_path* once it is done."""
    code = ("import sys\nfrom imsa import cli\ncode = cli.main(sys.argv[1:])\n"
            f"open({str(modules_path)!r}, 'w').write('\\n'.join(sorted(sys.modules)))\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def heavy_modules(modules_path):
    names = modules_path.read_text().split("\n")
    return sorted(name for name in names if any(name == bad or name.startswith(bad + ".") for bad in HEAVY))


def test_held_session_export_and_credential_process_answer_from_the_cache_as_the_full_command(
        active_service, isolated_env, tmp_path, sts_env):
    full = run_imsa("export", "r")  # the first run resolves the profile and writes the cache
    assert full.returncode == 0, full.stderr
    path = cache_file(isolated_env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    text = path.read_text()
    user = sts_env.users["alice"]
    assert user["aws_secret_access_key"] not in text and user["aws_access_key_id"] not in text, "no key in the cache"
    assert json.loads(text)["profiles"]["r"]["region"] == "us-west-2"

    fast = run_recording_modules(["export", "r"], tmp_path / "modules")
    assert fast.returncode == 0, fast.stderr
    assert (fast.stdout, fast.stderr) == (full.stdout, "")
    assert heavy_modules(tmp_path / "modules") == []

    for args in (["export", "r", "--format", "json"], ["export", "r", "--format=fish"], ["credential-process", "r"]):
        full = run_imsa(*args, env=dict(os.environ, XDG_STATE_HOME=str(tmp_path / "no-cache")))
        fast = run_recording_modules(args, tmp_path / "modules")
        assert full.returncode == fast.returncode == 0, (full.stderr, fast.stderr)
        assert (fast.stdout, fast.stderr) == (full.stdout, full.stderr), args
        assert heavy_modules(tmp_path / "modules") == [], args


def test_the_cache_follows_its_files_and_warnings_are_still_said(active_service, isolated_env, sts_env, tmp_path):
    assert run_imsa("export", "r").returncode == 0
    profiles = alice_profiles(sts_env, a=("role-a", "tester-a"))
    profiles["r"] = {"extends": "base", "role_arn": sts_env.roles["role-d"], "role_session_name": "tester-r",
                     "region": "eu-west-1"}  # as long as us-west-2: same size, a new mtime
    write_profiles(isolated_env / ".imsa", profiles)
    done = run_imsa("export", "r")
    assert done.returncode == 0, done.stderr
    assert "export AWS_REGION=eu-west-1" in done.stdout.splitlines()

    # Readable by others after the cache was written: only the mode changed, and the warning is still said.
    os.chmod(isolated_env / ".imsa", 0o644)
    done = run_recording_modules(["export", "r"], tmp_path / "modules")
    assert done.returncode == 0, done.stderr
    assert "readable by others" in done.stderr

    # A warning about the credentials' own end comes from the full path too.
    os.chmod(isolated_env / ".imsa", 0o600)
    assert run_imsa("export", "r").returncode == 0
    done = run_imsa("export", "r", env=dict(os.environ, IMSA_WARN_BEFORE="240"))
    assert done.returncode == 0, done.stderr
    assert "imsa: warning: the credentials of r:" in done.stderr


def test_a_cache_that_is_not_private_is_ignored(active_service, isolated_env, tmp_path):
    assert run_imsa("export", "r").returncode == 0
    path = cache_file(isolated_env)
    data = json.loads(path.read_text())
    data["profiles"]["r"]["region"] = "ap-south-1"  # what someone who could write it would make us print
    path.write_text(json.dumps(data))
    os.chmod(path, 0o644)
    done = run_recording_modules(["export", "r"], tmp_path / "modules")
    assert done.returncode == 0, done.stderr
    assert "export AWS_REGION=us-west-2" in done.stdout.splitlines()
    assert "yaml" in heavy_modules(tmp_path / "modules"), "the full path answered"


def test_without_a_session_the_full_path_asks_for_mfa_as_always(service, isolated_env, sts_env, tmp_path):
    write_profiles(isolated_env / ".imsa", alice_profiles(sts_env, a=("role-a", "tester-a")))
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    service.client.forget_sessions()
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)  # cached profile, no session: a new one is made
    assert done.returncode == 0, done.stderr
    assert "new MFA session" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the organisation's files must be root's")
def test_a_file_the_organisation_adds_is_in_the_cache_key(active_service, isolated_env):
    assert run_imsa("export", "a").returncode == 0  # cached while the system directory does not exist
    system = pathlib.Path(os.environ["IMSA_SYSTEM_CONFIG_DIR"])  # the test's own (tests/conftest.py)
    system.mkdir(mode=0o755)
    system.chmod(0o755)
    (system / "org.yaml").write_text(yaml.safe_dump({"a": {"region": "eu-central-1"}}))
    (system / "org.yaml").chmod(0o644)
    done = run_imsa("export", "a")
    assert done.returncode == 0, done.stderr
    assert "export AWS_REGION=eu-central-1" in done.stdout.splitlines()
    (system / "org.yaml").write_text(yaml.safe_dump({"a": {"region": "eu-north-1"}}))  # edited in place
    done = run_imsa("export", "a")
    assert "export AWS_REGION=eu-north-1" in done.stdout.splitlines()


def test_a_file_that_cannot_be_looked_at_is_left_to_resolution_to_report(tmp_path):
    """A path that cannot be stat'ed (a directory on the way the user may not search: here a name too long) makes a
    key that differs from a missing file's; the cache never raises (the full command says what is wrong)."""
    from imsa import profile_cache

    unreadable = str(tmp_path / ("x" * 5000))
    assert profile_cache.identity(unreadable)[0] == "unreadable"
    assert profile_cache.identity(str(tmp_path / "absent")) is None
    assert profile_cache.key([unreadable])["inputs"][0][1] != profile_cache.key([str(tmp_path / "absent")])["inputs"][0][1]
