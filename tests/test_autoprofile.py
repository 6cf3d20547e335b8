"""Per-directory profiles: ``.imsa.json`` found from the working directory up, trusted on the terminal or with
``--confirm-trust DIGEST``, and only ever selecting a profile of the user's own configuration.

Every case runs the CLI as its own process in the project directory, against the strict fake STS; the prompt is
answered through a pseudo-terminal, the way a person at a terminal answers it.
"""

import json
import os
import re
import stat

import pytest

from conftest import MFA_CODE, answer_on_terminal, one_error_line, run_imsa, run_without_terminal, write_config

from imsa import autoprofile
from ptyshell import shell_user  # noqa: F401 (a fixture)

QUESTION = b"(yes/no)? "
EXPORT = ("export", "auto", "--mfa-token", MFA_CODE)


@pytest.fixture
def project(isolated_env, sts_env, monkeypatch):
    """~/.imsa with profiles a..d, and ~/src/app/.imsa.json selecting profile a; the working directory is a
    directory below it, so the file is found by walking up."""
    write_config(isolated_env, sts_env)
    root = isolated_env / "src" / "app"
    (root / "lib" / "deep").mkdir(parents=True)
    write_auto(root, {"profile": "a"})
    monkeypatch.chdir(root / "lib" / "deep")
    return root


def write_auto(directory, content, mode=0o644):
    """*content* (a dict as JSON, or bytes as they are) as *directory*/.imsa.json with *mode*."""
    path = directory / ".imsa.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode() + b"\n")
    os.chmod(path, mode)
    return path


def answer_trust(args, answers):
    """Run the CLI on a pseudo-terminal and answer each trust question in turn; (process, what the terminal
    showed, stdout, stderr)."""
    return answer_on_terminal(args, answers, until=QUESTION)


def exported(stdout):
    """The variables an ``imsa export`` printed (sh format)."""
    return dict(re.findall(r"^export (\w+)='?([^'\n]*)'?$", stdout, re.M))


def confirm_digest(stderr):
    """The digest in the command an untrusted file's error says to run."""
    found = re.search(r"--confirm-trust=([A-Za-z0-9_-]+) auto", stderr)
    assert found, stderr
    return found.group(1)


def trust_records(home):
    """The trust directory and its records."""
    directory = home / ".local" / "state" / "imsa" / "trust"
    return directory, sorted(directory.iterdir()) if directory.exists() else []


def test_first_use_asks_on_the_terminal_and_yes_is_remembered(project, isolated_env):
    process, shown, stdout, stderr = answer_trust(EXPORT, ["yes"])
    assert process.returncode == 0, stderr
    real = str(project / ".imsa.json")
    assert f"first use of: {real} selects profile 'a'" in shown[0]
    assert '| {"profile": "a"}' in shown[0]  # the file's own bytes are shown
    assert exported(stdout)["IMSA_PROFILE"] == "a"
    directory, records = trust_records(isolated_env)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert len(records) == 1 and stat.S_IMODE(records[0].stat().st_mode) == 0o600
    assert json.loads(records[0].read_text())["path"] == real
    # Trusted now: no terminal needed any more.
    again = run_without_terminal(*EXPORT)
    assert again.returncode == 0, again.stderr
    assert exported(again.stdout)["IMSA_PROFILE"] == "a"


def test_no_refuses_and_records_nothing(project, isolated_env):
    process, shown, stdout, stderr = answer_trust(EXPORT, ["no"])
    assert process.returncode == 3
    assert stdout == ""
    assert "not trusted: nothing recorded" in stderr
    assert trust_records(isolated_env)[1] == []


def test_an_answer_other_than_yes_or_no_is_asked_again(project):
    process, shown, stdout, stderr = answer_trust(EXPORT, ["sure", "yes"])
    assert process.returncode == 0, stderr
    assert "please answer yes or no" in shown[1]


def test_an_edited_file_is_asked_about_again(project):
    assert answer_trust(EXPORT, ["yes"])[0].returncode == 0
    write_auto(project, b'{"profile": "a" }\n')  # one space more: other bytes, another digest
    done = run_without_terminal(*EXPORT)
    line = one_error_line(done, 3)
    assert "changed since you trusted it" in line
    process, shown, stdout, _ = answer_trust(EXPORT, ["yes"])
    assert "changed since you trusted it" in shown[0]
    assert process.returncode == 0


def test_a_moved_directory_is_asked_about_again(project, monkeypatch):
    assert answer_trust(EXPORT, ["yes"])[0].returncode == 0
    moved = project.parent / "renamed"
    os.rename(project, moved)
    monkeypatch.chdir(moved)
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert f"{moved}/.imsa.json selects profile 'a'" in line and "first use of" in line


def test_a_symlinked_directory_is_the_real_one(project, isolated_env, monkeypatch):
    """Trust follows the real path: the project reached through a symlink is the project trusted, and a link to
    another project's file is that file, asked about under its own path."""
    assert answer_trust(EXPORT, ["yes"])[0].returncode == 0
    link = isolated_env / "link"
    link.symlink_to(project, target_is_directory=True)
    monkeypatch.chdir(link)
    done = run_without_terminal(*EXPORT)
    assert done.returncode == 0, done.stderr
    assert f"{project}/.imsa.json selects profile 'a'" in done.stderr

    other = isolated_env / "src" / "other"
    other.mkdir()
    write_auto(other, {"profile": "b"})
    (project / ".imsa.json").unlink()
    (project / ".imsa.json").symlink_to(other / ".imsa.json")
    monkeypatch.chdir(project)
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert f"{other}/.imsa.json selects profile 'b'" in line and "first use of" in line


def test_without_a_terminal_the_error_says_the_command_with_the_digest(project, isolated_env):
    done = run_without_terminal(*EXPORT)
    line = one_error_line(done, 3)
    digest = confirm_digest(line)
    real = str(project / ".imsa.json")
    assert digest == autoprofile.digest(real, (project / ".imsa.json").read_bytes())
    assert "run: imsa export --confirm-trust=" + digest + " auto" in line
    assert trust_records(isolated_env)[1] == []


def test_confirm_trust_with_the_right_digest_trusts_without_a_terminal(project, isolated_env):
    digest = confirm_digest(run_without_terminal(*EXPORT).stderr)
    done = run_without_terminal("export", f"--confirm-trust={digest}", "auto", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert exported(done.stdout)["IMSA_PROFILE"] == "a"
    assert len(trust_records(isolated_env)[1]) == 1
    assert run_without_terminal(*EXPORT).returncode == 0


def test_confirm_trust_with_a_wrong_digest_is_refused_with_the_right_command(project, isolated_env):
    right = confirm_digest(run_without_terminal(*EXPORT).stderr)
    wrong = right[:-4] + ("AAAA" if not right.endswith("AAAA") else "BBBB")
    line = one_error_line(run_without_terminal("export", f"--confirm-trust={wrong}", "auto", "--mfa-token", MFA_CODE), 3)
    assert f"--confirm-trust {wrong} does not match" in line
    assert f"run: imsa export --confirm-trust={right} auto" in line
    assert trust_records(isolated_env)[1] == []


def test_regression_a_digest_starting_with_a_dash_was_taken_for_an_option(project):
    """base64url digests start with '-' one time in 64: after a space argparse read it as an option (exit 2)."""
    line = one_error_line(run_without_terminal("export", "--confirm-trust=-AAAA", "auto", "--mfa-token", MFA_CODE), 3)
    assert "--confirm-trust -AAAA does not match" in line
    assert re.search(r"run: imsa export --confirm-trust=\S+ auto$", line), line


def test_a_digest_confirmed_for_the_old_content_does_not_trust_an_edit(project):
    old = confirm_digest(run_without_terminal(*EXPORT).stderr)
    write_auto(project, {"profile": "b"})
    line = one_error_line(run_without_terminal("export", f"--confirm-trust={old}", "auto", "--mfa-token", MFA_CODE), 3)
    assert "does not match" in line


def test_exec_and_credential_process_say_their_own_confirm_command(project):
    line = one_error_line(run_without_terminal("exec", "auto", "--mode", "static", "--", "true"), 3)
    assert re.search(r"run: imsa exec --confirm-trust=\S+ --mode static auto -- true$", line), line
    line = one_error_line(run_without_terminal("credential-process", "auto"), 3)
    assert re.search(r"run: imsa credential-process --confirm-trust=\S+ auto$", line), line


def test_the_confirm_command_it_says_runs(project):
    """The exact command of the error, run as said, is what trusts the file."""
    line = one_error_line(run_without_terminal("exec", "auto", "--mode", "static", "--", "true"), 3)
    command = line.split("run: imsa ", 1)[1].split()
    assert command[0] == "exec" and command[1].startswith("--confirm-trust=")
    # Trusted by that command; here it then needs an MFA code, which a terminal or --mfa-token gives.
    assert "an MFA code is needed" in run_without_terminal(*command).stderr
    done = run_without_terminal("exec", "auto", "--mode", "static", "--mfa-token", MFA_CODE, "--", "true")
    assert done.returncode == 0, done.stderr


@pytest.mark.security
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_file_others_can_change_is_refused(project, mode):
    write_auto(project, {"profile": "a"}, mode=mode)
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert "can be changed by others" in line and "chmod go-w" in line


@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the file must belong to another uid")
def test_a_file_of_another_user_is_refused(project):
    os.chown(project / ".imsa.json", 65534, 65534)
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert "belongs to uid 65534, not to you" in line


@pytest.mark.security
@pytest.mark.parametrize("content", [
    {"profile": "arn:aws:iam::999999999999:role/attacker"},
    {"profile": "a", "role_arn": "arn:aws:iam::999999999999:role/attacker"},
    {"profile": "a", "server": "https://attacker.example"},
    {"profile": "a", "credential_process": "sh -c evil"},
])
def test_a_file_that_would_bring_its_own_role_is_refused_before_any_prompt(project, isolated_env, content):
    write_auto(project, content)
    process, shown, stdout, stderr = answer_trust(EXPORT, [])
    assert process.returncode == 3
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and ("may only select" in lines[0] or "names a role ARN" in lines[0]), stderr
    assert trust_records(isolated_env)[1] == []


def test_a_profile_not_in_the_users_configuration_is_refused(project):
    write_auto(project, {"profile": "nobody-has-this"})
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert f"{project}/.imsa.json: no profile 'nobody-has-this'" in line


def test_the_mode_of_the_file_is_the_default_of_exec(project, tmp_path):
    write_auto(project, {"profile": "a", "mode": "static"})
    out = tmp_path / "env.txt"
    command = ("exec", "auto", "--mfa-token", MFA_CODE, "--", "sh", "-c", f"env > {out}")
    digest = confirm_digest(run_without_terminal(*command).stderr)
    done = run_without_terminal("exec", f"--confirm-trust={digest}", *command[1:])
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["IMSA_PROFILE"] == "a"
    assert env["AWS_ACCESS_KEY_ID"].startswith("ASIA")  # static: plain variables, no service needed


def test_the_walk_stops_at_home_and_at_a_ceiling(isolated_env, sts_env, monkeypatch, tmp_path):
    write_config(isolated_env, sts_env)
    write_auto(tmp_path, {"profile": "a"})  # above home: never looked at
    inner = isolated_env / "work" / "repo"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert "no .imsa.json in this directory" in one_error_line(run_without_terminal(*EXPORT), 3)
    write_auto(isolated_env / "work", {"profile": "a"})
    monkeypatch.setenv("IMSA_CEILING_DIRECTORIES", str(isolated_env / "work"))
    assert "no .imsa.json in this directory" in one_error_line(run_without_terminal(*EXPORT), 3)
    monkeypatch.delenv("IMSA_CEILING_DIRECTORIES")
    assert "first use of" in one_error_line(run_without_terminal(*EXPORT), 3)


@pytest.mark.security
def test_a_trust_directory_others_can_read_is_refused(project, isolated_env):
    directory, _ = trust_records(isolated_env)
    directory.mkdir(parents=True)
    os.chmod(directory, 0o755)
    line = one_error_line(run_without_terminal(*EXPORT), 3)
    assert "mode 0700" in line


def test_confirm_trust_with_a_named_profile_is_a_usage_error(project):
    line = one_error_line(run_imsa("export", "--confirm-trust", "x", "a", "--mfa-token", MFA_CODE), 2)
    assert "goes with the profile auto" in line


def test_a_profile_of_the_users_own_named_auto_still_wins(project, isolated_env, sts_env):
    write_config(isolated_env, sts_env, extra={"auto": {"extends": "b"}})
    done = run_without_terminal(*EXPORT)
    assert done.returncode == 0, done.stderr
    assert exported(done.stdout)["IMSA_PROFILE"] == "auto"
    assert ".imsa.json" not in done.stderr


# --- the shell hook: the profile follows cd ---

SHOW_PROFILE = {"bash": 'echo "profile=[${IMSA_PROFILE-}]"', "zsh": 'echo "profile=[${IMSA_PROFILE-}]"',
                "fish": 'echo "profile=[$IMSA_PROFILE]"'}


@pytest.mark.parametrize("kind", ["bash", "zsh", "fish"])
def test_the_shell_hook_exports_the_projects_profile_on_cd_and_removes_it_on_leaving(shell_user, kind):
    from ptyshell import IMSA

    shell_user.start_dev_service()
    assert shell_user.imsa("assume", "r", "--mfa-token", MFA_CODE).returncode == 0  # the MFA session, held
    project = os.path.join(shell_user.home, "proj")
    os.makedirs(os.path.join(project, "sub"))
    auto = os.path.join(project, ".imsa.json")
    with open(auto, "w") as handle:
        handle.write('{"profile": "a"}\n')
    if shell_user.prefix:
        for path in (project, os.path.join(project, "sub"), auto):
            os.chown(path, shell_user.uid, shell_user.gid)
    sh = shell_user.shell(kind)
    try:
        hook = f"{IMSA} shell-init fish --auto | source" if kind == "fish" else \
            f'eval "$({IMSA} shell-init {kind} --auto)"'
        assert sh.run(hook)[1] == 0
        assert "profile=[]" in sh.run(SHOW_PROFILE[kind])[0]
        assert sh.run(f"cd {project}/sub")[1] == 0
        # At the next prompt the hook asks imsa, which asks on the terminal whether to trust the file.
        question = sh._read_until(b"(yes/no)? ", 60)
        assert f"first use of: {auto} selects profile 'a'" in question, question
        os.write(sh.master, b"yes\n")
        shown, _ = sh.run(SHOW_PROFILE[kind])
        assert "profile=[a]" in shown, shown
        shown, _ = sh.run(f"{IMSA} status --short; cd {project}; {SHOW_PROFILE[kind]}")
        assert "profile=[a]" in shown and "(yes/no)" not in shown  # trusted now; same file, nothing asked
        assert sh.run("cd /")[1] == 0
        shown, _ = sh.run(SHOW_PROFILE[kind])
        assert "profile=[]" in shown, shown
    finally:
        sh.close()


def test_credential_process_auto_prints_the_selected_profiles_json(project, service, sts_env):
    assert run_imsa("assume", "b", "--mfa-token", MFA_CODE).returncode == 0  # the MFA session, held
    digest = confirm_digest(run_without_terminal("credential-process", "auto").stderr)
    done = run_without_terminal("credential-process", f"--confirm-trust={digest}", "auto")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["Version"] == 1
    import boto3

    sts = boto3.client("sts", region_name="us-east-1", endpoint_url=sts_env.endpoint,
                       aws_access_key_id=body["AccessKeyId"], aws_secret_access_key=body["SecretAccessKey"],
                       aws_session_token=body["SessionToken"])
    assert sts.get_caller_identity()["Arn"].endswith(":assumed-role/role-a/tester-a")  # a's role, not b's
    assert f"{project}/.imsa.json selects profile 'a'" in done.stderr
