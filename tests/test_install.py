"""Installing imsa as the README says, `imsa install-service`, and `sudo imsa COMMAND` acting as the invoking user.

The end-to-end tests run tests/netns_scenarios.py under `unshare -m -n`: a network namespace for 169.254.169.254,
and a mount namespace whose tmpfs hide the machine's /opt, /usr/local/bin, /etc/sudoers.d and friends, so the
install, the symlink and the sudoers rule exist for the test alone.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

from conftest import needs_root

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMSA = os.path.join(os.path.dirname(sys.executable), "imsa")
UNITS = ("imsa.service", "imsa.socket")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # root's under sudo, less /usr/local: no imsa on it


def _can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip") or not shutil.which("sudo"):
        return False
    return subprocess.run(["unshare", "-m", "-n", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _can_unshare(), reason="needs root, sudo, ip(8) and unshare -m -n")
needs_systemd_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")


def run_scenario(name, owner, timeout=300):
    """Run scenario *name* of tests/netns_scenarios.py in its own mount and network namespaces, for *owner*."""
    done = subprocess.run(
        ["unshare", "-m", "-n", sys.executable, os.path.join(HERE, "netns_scenarios.py"), name],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, IMSA_TEST_OWNER=owner.name),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _top_level(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


# --- item 1: the README's install, end to end ---


@needs_namespaces
def test_the_readme_install_works_for_a_real_user_with_sudo_and_for_systemd(isolated_env, local_users):
    owner = local_users[0]
    result = run_scenario("readme_install", owner)
    readme = result["readme"]
    # The README still says what this test does.
    assert readme["install"][0].startswith("sudo python3 -m venv /opt/imsa"), readme
    assert readme["install"][2].startswith("sudo ln -sf /opt/imsa/bin/imsa /usr/local/bin/imsa"), readme
    assert readme["by_hand"][0].startswith("sudo imsa start"), readme
    assert readme["at_boot"][0].startswith("sudo imsa install-service"), readme
    assert readme["sudoers"] == [], readme  # no env_keep: the CLI hands the service its STS settings
    for line, code, _out, err in result["install"]:
        assert code == 0, (line, err[-2000:])
    assert len(result["install"]) == len(readme["install"])
    # A real, root-owned, non-editable install, carrying the units exactly as the repository has them.
    assert result["imsa_file"].startswith("/opt/imsa/lib/python3") and "/site-packages/imsa/" in result["imsa_file"]
    assert result["editable_files"] == [] and "editable" not in json.dumps(result["direct_url"])
    assert result["not_roots"] == []
    assert result["packaged_units"] == {"imsa.service": True, "imsa.socket": True}

    (start, start_code, _, start_err), assume, aws = result["by_hand"]
    assert start_code == 0, start_err  # `sudo imsa start`: the bare name, found through sudo's secure_path
    assert "serving on 169.254.169.254:80" in start_err and "warning" not in start_err, start_err
    assert assume[1] == 0, assume
    assert aws[1] == 0, aws  # with no AWS_EC2_METADATA_SERVICE_ENDPOINT: the real address
    assert json.loads(aws[2])["Arn"] == "arn:aws:sts::123456789012:assumed-role/role-a/readme"
    assert result["listen"] == "169.254.169.254:80"
    assert result["service_argv"][:4] == ["/opt/imsa/bin/python3", "-I", "-m", "imsa"], result["service_argv"]
    assert 0 not in result["service_uids"] and set(result["service_uids"]) == {owner.uid}
    # Item 4 on the way: `sudo imsa status` is the user's service.
    assert result["sudo_status"][0] == 0, result["sudo_status"]
    assert "profile:    my-profile" in result["sudo_status"][1]
    assert result["stop"][0] == 0, result["stop"]
    assert result["alias_after"] is False

    # systemd: `sudo imsa install-service` with no USER serves the user who ran sudo, runs /opt/imsa's imsa.
    assert result["at_boot"][0] == 0, result["at_boot"]
    units = result["units"]
    assert units["imsa.socket"] == _top_level("imsa.socket")
    assert units["imsa.service"] == _top_level("imsa.service").replace(
        "ExecStart=/usr/local/bin/imsa start", "ExecStart=/opt/imsa/bin/imsa start")
    assert units["imsa.service.d/user.conf"] == f"[Service]\nUser={owner.name}\nGroup={owner.name}\n"
    assert result["systemctl"] == ["daemon-reload", "enable --now imsa.socket imsa.service"]
    assert "warning" not in result["at_boot"][2]
    assert result["verify"][0] == 0, result["verify"]


def test_every_readme_section_the_code_cites_exists():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        headings = {line.lstrip("#").strip() for line in handle if line.startswith("#")}
    cited = {}
    for path in glob.glob(os.path.join(ROOT, "imsa", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "scripts", "*")) + \
            [os.path.join(ROOT, name) for name in UNITS]:
        with open(path, encoding="utf-8") as handle:
            for section in re.findall(r'README, "([^"]+)"', handle.read()):
                cited.setdefault(section, []).append(os.path.relpath(path, ROOT))
    assert "Running at boot" in cited and "Install" in cited  # the units' and the trust warning's
    assert {section: paths for section, paths in cited.items() if section not in headings} == {}


def test_the_built_package_carries_the_units_unchanged(tmp_path):
    # What `pip install .` installs into share/imsa is the top-level files, byte for byte: they are the one source.
    source = tmp_path / "clone"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path), str(source)], capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert done.returncode == 0, done.stderr
    (wheel,) = glob.glob(str(tmp_path / "imsa-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name.rsplit("/", 1)[1]: archive.read(name) for name in archive.namelist()
                    if re.fullmatch(r"imsa-[^/]+\.data/data/share/imsa/[^/]+", name)}
        modules = {name for name in archive.namelist() if name.startswith("imsa/") and name.endswith(".py")}
    assert packaged == {name: _top_level(name).encode() for name in UNITS + ("imsa-system.service", "imsa-system.socket")}
    # The subpackages too (setup.cfg's packages = find:), every module of the tree.
    tree = {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "imsa", "**", "*.py"), recursive=True)}
    assert {"imsa/commands/roles.py", "imsa/server/process.py"} <= tree
    assert modules == tree


# --- item 1: imsa install-service ---


def _install_service(*args, env=None, user=None):
    argv = [IMSA, "install-service", *args]
    environ = dict(env or os.environ)
    if user is not None:
        return user.run(argv, environ)
    return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=60, stdin=subprocess.DEVNULL)


@needs_root()
def test_install_service_writes_the_shipped_units_for_the_user_pointing_at_this_imsa(tmp_path):
    done = _install_service("nobody", "--unit-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (tmp_path / "imsa.socket").read_text() == _top_level("imsa.socket")
    assert (tmp_path / "imsa.service").read_text() == _top_level("imsa.service").replace(
        "ExecStart=/usr/local/bin/imsa start", f"ExecStart={IMSA} start")
    assert (tmp_path / "imsa.service.d" / "user.conf").read_text() == "[Service]\nUser=nobody\nGroup=nogroup\n"
    for path in ("imsa.socket", "imsa.service", "imsa.service.d/user.conf"):
        info = os.stat(tmp_path / path)
        assert (info.st_uid, info.st_mode & 0o777) == (0, 0o644), path
    assert f"to {tmp_path}: {IMSA} as nobody" in done.stderr
    assert "warning" not in done.stderr and "enabled" not in done.stderr


@needs_root()
def test_install_service_serves_the_user_who_ran_sudo_by_default(tmp_path):
    done = _install_service("--unit-dir", str(tmp_path), env=dict(os.environ, SUDO_USER="nobody", SUDO_UID="65534"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "imsa.service.d" / "user.conf").read_text() == "[Service]\nUser=nobody\nGroup=nogroup\n"


@needs_root()
@needs_systemd_analyze
def test_an_imsa_path_with_blanks_and_percent_signs_still_verifies(tmp_path):
    # ExecStart words are quoted and escaped for systemd: "%" is a specifier sign, a blank splits words.
    venv = tmp_path / "my venv %h"
    (venv / "bin").mkdir(parents=True)
    real_venv = os.path.dirname(os.path.dirname(IMSA))  # this suite's, seen through a path with such characters
    shutil.copy(os.path.join(real_venv, "pyvenv.cfg"), venv / "pyvenv.cfg")
    os.symlink(os.path.join(real_venv, "lib"), venv / "lib")
    os.symlink(sys.executable, venv / "bin" / "python")
    os.symlink(IMSA, venv / "bin" / "imsa")
    units = tmp_path / "units"
    script = "import sys; from imsa import cli; sys.exit(cli.main(sys.argv[1:]))"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script, "install-service", "nobody", "--unit-dir",
                           str(units)], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert f'ExecStart="{venv}/bin/imsa" start --foreground'.replace("%h", "%%h") in \
        (units / "imsa.service").read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(units / "imsa.socket"), str(units / "imsa.service")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert [line for line in verify.stderr.splitlines() if "Special user nobody" not in line] == []


@needs_root()
@pytest.mark.parametrize("args, message", [
    (["root"], "imsa: error: refusing to serve credentials as root; name your own user"),
    (["no-such-user-imsa"], "imsa: error: no such user 'no-such-user-imsa'"),
    ([], "imsa: error: name the user the service serves: sudo imsa install-service USER"),
])
def test_install_service_refuses_root_unknown_and_missing_users(tmp_path, args, message):
    done = _install_service(*args, "--unit-dir", str(tmp_path / "units"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and done.stderr.startswith(message)
    assert not (tmp_path / "units").exists()


def test_install_service_needs_root(tmp_path, local_users):
    owner = local_users[0]
    units = tmp_path / "units"
    units.mkdir(mode=0o777)
    os.chmod(units, 0o777)
    done = _install_service(owner.name, "--unit-dir", str(units), env={"PATH": PATH}, user=owner)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("imsa: error: install-service writes systemd units and needs root: "
                           "sudo imsa install-service [USER]\n")
    assert os.listdir(units) == []


@needs_root()
def test_install_service_from_code_another_user_can_change_warns(tmp_path, local_users):
    # A pipx install is the user's own: fine for the service (it runs as the user), not for root.
    owner = local_users[0]
    copy = tmp_path / "pipx-like"
    shutil.copytree(os.path.join(ROOT, "imsa"), copy / "imsa")
    for name in UNITS + ("setup.cfg",):
        shutil.copy(os.path.join(ROOT, name), copy / name)
    subprocess.run(["chown", "-R", f"{owner.uid}:{owner.gid}", str(copy)], check=True)
    script = "import sys; sys.path.insert(0, sys.argv[1]); from imsa import cli; sys.exit(cli.main(sys.argv[2:]))"
    done = subprocess.run([sys.executable, "-I", "-c", script, str(copy), "install-service", owner.name,
                           "--unit-dir", str(tmp_path / "units")], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert (f"imsa: warning: root is running imsa from code another user can change ({copy} belongs to uid "
            f"{owner.uid}); the service runs it as {owner.name} only") in done.stderr


@needs_root()
def test_install_service_enables_the_units_and_reports_a_systemctl_failure(tmp_path):
    # /etc/systemd/system is a tmpfs of a mount namespace of this test's own; systemctl is a stand-in that records
    # its arguments (and fails when told to).
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n'
                                    'if [ -n "$FAIL" ]; then echo "Failed to connect to bus: Host is down" >&2; '
                                    'exit 1; fi\n')
    os.chmod(fake / "systemctl", 0o755)
    script = ('mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system && "$IMSA" install-service nobody; code=$?; '
              'cd /etc/systemd/system && find . -type f | sort; exit $code')
    results = {}
    for fail in ("", "1"):
        calls = tmp_path / f"calls{fail}"
        env = dict(os.environ, PATH=f"{fake}:{PATH}", IMSA=IMSA, CALLS=str(calls), FAIL=fail)
        done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                              timeout=60, stdin=subprocess.DEVNULL)
        results[fail] = done, calls.read_text().splitlines()
    done, calls = results[""]
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["./imsa.service", "./imsa.service.d/user.conf", "./imsa.socket"]
    assert calls == ["daemon-reload", "enable --now imsa.socket imsa.service"]
    assert "imsa: enabled imsa.socket and imsa.service for nobody; check with: imsa status" in done.stderr
    done, calls = results["1"]
    assert done.returncode == 1 and calls == ["daemon-reload"]
    assert done.stderr.splitlines()[-1] == ("imsa: error: systemctl daemon-reload failed: Failed to connect to bus: "
                                            "Host is down")
    assert not [path for path in glob.glob("/etc/systemd/system/imsa*")], "the machine's own directory is untouched"


# --- item 1: scripts/install-service.sh finds a pipx install ---


@pytest.fixture
def pipx_user():
    """A real user with a home of its own, where ``pipx install`` would have put imsa: ~/.local/bin/imsa, a symlink
    into ~/.local/pipx/venvs/imsa (here: to this suite's imsa)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user")
    base = tempfile.mkdtemp(prefix="imsa-pipx-")
    os.chmod(base, 0o711)
    home = os.path.join(base, "home")
    name = "imsa-pipx"
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["useradd", "--system", "--user-group", "--home-dir", home, "--create-home", "--shell",
                    "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield name, home
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _pipx_install(home, name):
    venv_bin = os.path.join(home, ".local", "pipx", "venvs", "imsa", "bin")
    os.makedirs(venv_bin)
    os.symlink(IMSA, os.path.join(venv_bin, "imsa"))
    os.makedirs(os.path.join(home, ".local", "bin"))
    os.symlink(os.path.join(venv_bin, "imsa"), os.path.join(home, ".local", "bin", "imsa"))
    subprocess.run(["chown", "-R", f"{name}:{name}", os.path.join(home, ".local")], check=True)


def _script(user, units, **env):
    return subprocess.run([os.path.join(ROOT, "scripts", "install-service.sh"), user], capture_output=True, text=True,
                          env={"PATH": PATH, "UNIT_DIR": str(units), **env}, timeout=60, stdin=subprocess.DEVNULL,
                          cwd="/")


@needs_root()
@pytest.mark.parametrize("who", ["sudo_user", "served_user"])
def test_the_script_finds_imsa_in_the_users_local_bin_under_sudo(tmp_path, pipx_user, who):
    # Run as `sudo scripts/install-service.sh USER` runs it: PATH is sudo's secure_path, without ~/.local/bin.
    name, home = pipx_user
    units = tmp_path / "units"
    sudo_env = {"SUDO_USER": name} if who == "sudo_user" else {}
    missing = _script(name if who == "served_user" else "nobody", units, **sudo_env)
    assert missing.returncode == 1 and "cannot find the imsa command" in missing.stderr, missing.stderr
    _pipx_install(home, name)
    done = _script(name if who == "served_user" else "nobody", units, **sudo_env)
    assert done.returncode == 0, done.stderr
    assert f"ExecStart={IMSA} start --foreground" in (units / "imsa.service").read_text()


@needs_root()
def test_the_script_takes_imsa_from_pipx_bin_dir(tmp_path):
    bin_dir = tmp_path / "pipx-bin"
    bin_dir.mkdir()
    os.symlink(IMSA, bin_dir / "imsa")
    done = _script("nobody", tmp_path / "units", PIPX_BIN_DIR=str(bin_dir))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "units" / "imsa.service").exists()


# --- item 4: sudo imsa COMMAND acts as the user who ran sudo ---


@needs_namespaces
def test_sudo_status_assume_exec_and_stop_act_on_the_invoking_users_service_as_that_user(isolated_env, local_users):
    owner = local_users[0]
    result = run_scenario("sudo_acts_as_the_invoking_user", owner)
    assert result["start"][0] == 0, result["start"]
    pid = result["pid"]
    code, out, err = result["status"]
    assert code == 1 and f"service:    pid {pid} on 127.0.0.1:" in out, (code, out, err)  # 1: no role yet
    assert "profile:    none" in out
    assert result["assume"][0] == 0, result["assume"]
    assert "profile:    a" in result["status_after"][1]
    # The command runs as the user, with the user's groups only, HOME and USER from the passwd entry.
    code, out, err = result["exec"]
    assert code == 0, err
    ids, names = out.splitlines()
    assert ids == f"uid={owner.uid}({owner.name}) gid={owner.gid}({owner.name}) groups={owner.gid}({owner.name})"
    assert names == f"/nonexistent {owner.name} {owner.name}"
    # Root could read this file; the user cannot, and neither can `sudo imsa`.
    code, out, err = result["root_only"]
    assert (code, out) == (3, "") and err == "imsa: error: /tmp/root-only/.imsa: cannot read: Permission denied\n"
    code, out, err = result["stop"]
    assert code == 0 and err == f"imsa: stopped (pid {pid})\n", err
    assert result["service_gone"] is True


def test_without_sudo_nobody_is_become(monkeypatch):
    from imsa import sudo

    monkeypatch.delenv("SUDO_UID", raising=False)
    assert sudo.become_invoking_user() is None
    assert sudo.become_invoking_user({"SUDO_UID": "0"}) is None
    if os.geteuid() != 0:
        assert sudo.become_invoking_user({"SUDO_UID": str(os.getuid() + 1)}) is None


@needs_root()
def test_sudo_with_a_sudo_uid_of_no_user_is_one_error(tmp_path):
    done = subprocess.run([IMSA, "status"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, SUDO_UID="4000321"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "imsa: error: SUDO_UID=4000321 names no user of this machine\n"
