"""Scenarios that need real non-loopback addresses; each runs inside a fresh network namespace.

Run as ``unshare -n python tests/netns_scenarios.py NAME`` (tests/test_netns.py does this): lo is brought up
and addresses are added inside that namespace only, so nothing leaves it. Prints one JSON object.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

IMDS_IP = "169.254.169.254"
OUTSIDER_IP = "10.9.9.9"


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_lo(*addresses):
    ip("link", "set", "lo", "up")
    for address in addresses:
        ip("address", "add", f"{address}/32", "dev", "lo")


def peer_filter():
    """A client whose source address is not loopback (nor the listen address) is refused."""
    from conftest import http, start_service, stop_process

    setup_lo(IMDS_IP, OUTSIDER_IP)
    service = start_service(["--listen", f"{IMDS_IP}:80"])
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    try:
        results = {}
        for name, source in (("outsider", OUTSIDER_IP), ("loopback", "127.0.0.1"), ("listen", IMDS_IP)):
            status, _, body = http(IMDS_IP, 80, "PUT", "/latest/api/token", ttl, host_header=IMDS_IP, source=source)
            results[name] = [status, body.decode(errors="replace")]
        return results
    finally:
        stop_process(service.process)


def _as_user(uid, argv, env, timeout=90):
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/",
    )


def _ids(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return fields


def _socket_fds(pid):
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                found += 1
        except OSError:
            continue
    return found


def _core_limit(pid):
    """[soft, hard] core file size limits of *pid*."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max core file size"):
                return line.split()[4:6]
    return None


def _lo_addresses():
    return subprocess.run(["ip", "-o", "address", "show", "dev", "lo"], capture_output=True, text=True).stdout


def real_address():
    """`sudo imsa start` for an unprivileged user, then SDKs with no endpoint variable, then `imsa stop`."""
    import tempfile
    import time

    from conftest import MFA_CODE, alice_profiles, service_run_dir, start_sts, write_profiles
    from imsa.client import Client

    import shutil

    user = 65534
    setup_lo()
    sts = start_sts()
    home = tempfile.mkdtemp(prefix="imsa-home-")
    run_dir = service_run_dir("imsa-run-")
    try:
        os.chown(home, user, user)
        config = write_profiles(os.path.join(home, ".imsa"), alice_profiles(sts, a=("role-a", "netns-a")),
                                owner=(user, user))
        socket_path = os.path.join(run_dir, "run", "control.sock")
        env = {
            "PATH": os.path.dirname(sys.executable) + ":/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home, "IMSA_CONFIG": config, "IMSA_CONTROL_SOCKET": socket_path,
            "AWS_ENDPOINT_URL_STS": sts.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.path.join(home, "no-config"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "no-creds"),
        }
        result = {"alias_before": IMDS_IP in _lo_addresses()}
        def root_with_extras():
            # What the drop must undo, set here rather than hoped for: root's extra groups, and core dumps allowed.
            import resource

            os.setgroups([4, 27])
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        started = subprocess.run([sys.executable, "-m", "imsa", "start"], capture_output=True, text=True,
                                 env=dict(env, SUDO_UID=str(user), SUDO_GID=str(user)), timeout=60,
                                 stdin=subprocess.DEVNULL, preexec_fn=root_with_extras)
        result["start"] = [started.returncode, started.stdout, started.stderr]
        if started.returncode != 0:
            return result
        status = Client(socket_path).status()
        pid = status["pid"]
        server_ids = _ids(pid)
        waiter = int(server_ids["PPid"][0])
        result.update(
            listen=status["listen"], alias_added=status["alias_added"], alias_up=IMDS_IP in _lo_addresses(),
            server_uids=[int(x) for x in server_ids["Uid"]], server_gids=[int(x) for x in server_ids["Gid"]],
            server_groups=server_ids.get("Groups", []), waiter_uid=int(_ids(waiter)["Uid"][0]),
            waiter_sockets=_socket_fds(waiter), server_core_limit=_core_limit(pid),
            waiter_groups=_ids(waiter).get("Groups", []), server_no_new_privs=server_ids["NoNewPrivs"],
            server_bounding_set=server_ids["CapBnd"], server_effective=server_ids["CapEff"],
        )
        assume = _as_user(user, [sys.executable, "-m", "imsa", "assume", "a", "--mfa-token", MFA_CODE], env)
        result["assume"] = [assume.returncode, assume.stderr]
        aws = _as_user(user, [os.path.join(os.path.dirname(sys.executable), "aws"), "sts", "get-caller-identity",
                              "--query", "Arn", "--output", "text"], env)
        result["aws"] = [aws.returncode, aws.stdout.strip(), aws.stderr[-500:]]
        script = "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])"
        boto = _as_user(user, [sys.executable, "-c", script], env)
        result["boto3"] = [boto.returncode, boto.stdout.strip(), boto.stderr[-500:]]
        stopped = _as_user(user, [sys.executable, "-m", "imsa", "stop"], env)
        result["stop"] = [stopped.returncode, stopped.stderr]
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{waiter}") and time.monotonic() < deadline:
            time.sleep(0.05)
        result["waiter_gone"] = not os.path.exists(f"/proc/{waiter}")
        result["alias_after"] = IMDS_IP in _lo_addresses()
        return result
    finally:
        sts.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def sudo_start_traced():
    """A real `sudo imsa start` by an unprivileged user (a sudoers rule for it, a preserved HOME, IMSA_* and XDG_*),
    traced with strace -f: every file syscall imsa makes while it is root, with the path it names."""
    import pwd
    import tempfile
    import time

    owner = pwd.getpwnam(os.environ["IMSA_TEST_OWNER"])
    imsa = os.path.join(os.path.dirname(sys.executable), "imsa")
    setup_lo()
    home = tempfile.mkdtemp(prefix="imsa-traced-home-")
    os.chown(home, owner.pw_uid, owner.pw_gid)
    trace = tempfile.NamedTemporaryFile(prefix="imsa-trace-", delete=False).name
    rule = f"/etc/sudoers.d/imsa-test-{os.getpid()}"
    with open(rule, "w") as handle:
        handle.write(f'Defaults:{owner.pw_name} env_keep += "HOME IMSA_CONTROL_SOCKET XDG_RUNTIME_DIR"\n'
                     f"{owner.pw_name} ALL=(root) NOPASSWD: {imsa} start, {imsa} stop\n")
    os.chmod(rule, 0o440)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "XDG_RUNTIME_DIR": os.path.join(home, "xdg"),
           "IMSA_CONTROL_SOCKET": os.path.join(home, "run", "control.sock")}
    user = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"]
    result = {}
    try:
        # strace -f follows the service it starts, so it runs until `imsa stop`: the start is over once the service
        # answers its user (bounded), and strace's own exit status is that of `sudo imsa start`.
        output = tempfile.TemporaryFile()
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-s", "4096", "-o", trace, "-e", "trace=file,process,setresuid,setuid,setreuid",
             *user, "sudo", "-n", imsa, "start"],
            stdout=output, stderr=output, env=env, cwd=home, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and tracer.poll() is None:
            status = subprocess.run([*user, imsa, "status"], capture_output=True, text=True, env=env, cwd=home,
                                    timeout=60, stdin=subprocess.DEVNULL)
            if status.returncode in (0, 1):  # answering (1: no role assumed yet)
                break
            time.sleep(0.2)
        stopped = subprocess.run([*user, imsa, "stop"], capture_output=True, text=True, env=env, cwd=home,
                                 timeout=60, stdin=subprocess.DEVNULL)
        result["stop"] = [stopped.returncode, stopped.stderr]
        try:
            tracer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
        output.seek(0)
        result["start"] = [tracer.returncode, output.read().decode(errors="replace")[-2000:]]
        deadline = time.monotonic() + 10
        while IMDS_IP in _lo_addresses() and time.monotonic() < deadline:
            time.sleep(0.05)
        result["alias_after"] = IMDS_IP in _lo_addresses()
        with open(trace, errors="replace") as handle:
            result.update(_root_file_calls(handle.read().splitlines(), home, owner.pw_uid, imsa))
        return result
    finally:
        os.unlink(rule)
        os.unlink(trace)
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def _root_file_calls(lines, cwd, owner_uid, imsa):
    """From an strace -f log: the paths imsa's processes named in file syscalls while their euid was 0, and those of
    them that lie in a place the owner controls (the path or a directory above it belongs to the owner)."""
    import re

    call = re.compile(r'^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\((.*))')
    pending = {}
    state = {}  # pid -> {"root": bool, "imsa": bool, "cwd": str}
    first = None
    root_paths, touched, unresolved = [], [], []
    for line in lines:
        match = call.match(line)
        if not match:
            continue
        pid = int(match.group(1))
        if first is None:
            first = pid
            state[pid] = {"root": True, "imsa": False, "cwd": cwd, "fds": {}}
        me = state.setdefault(pid, {"root": True, "imsa": False, "cwd": cwd, "fds": {}})
        if match.group(2):  # the end of a call that was interrupted: its start holds the arguments
            name, rest = match.group(2), pending.pop(pid, "") + line.split("resumed>", 1)[1]
        else:
            name, rest = match.group(3), match.group(4)
            if rest.endswith("<unfinished ...>"):
                pending[pid] = rest[: -len("<unfinished ...>")]
                continue
        result = rest.rsplit(" = ", 1)[-1].split()[0] if " = " in rest else "?"
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', rest)
        if name in ("clone", "clone3", "fork", "vfork") and result.isdigit():
            state[int(result)] = dict(me, fds=dict(me["fds"]))
            continue
        if name == "execve" and result == "0" and strings:
            me["imsa"] = strings[0] == imsa or "python" in os.path.basename(strings[0]) or me["imsa"]
            if strings[0].endswith("/sudo"):
                me["root"] = True  # a setuid program
            continue
        if name in ("setresuid", "setuid", "setreuid") and result == "0":
            numbers = [int(x) for x in re.findall(r"-?\d+", rest.split(")")[0])]
            euid = numbers[1] if name != "setuid" and len(numbers) > 1 else numbers[0]
            if euid != -1:
                me["root"] = euid == 0
            continue
        if name == "chdir" and result == "0" and strings:
            me["cwd"] = os.path.normpath(os.path.join(me["cwd"], strings[0]))
            continue
        if not (me["root"] and me["imsa"] and strings) or strings[0] == "":
            continue  # not root, not imsa, or fstat(fd) (newfstatat with an empty path): no path is named
        base = me["cwd"]
        dirfd = re.match(r"(\d+), ", rest)
        if dirfd and not strings[0].startswith("/"):  # relative to a directory descriptor opened earlier
            base = me["fds"].get(int(dirfd.group(1)))
            if base is None:
                unresolved.append(f"{name} {strings[0]}")
                continue
        path = os.path.normpath(os.path.join(base, strings[0]))
        if name in ("open", "openat") and result.isdigit():
            me["fds"][int(result)] = path
        root_paths.append(path)
        if _owner_controls(path, owner_uid):
            touched.append(f"{name} {path}")
    return {"root_paths": len(root_paths), "touched": touched, "unresolved": unresolved,
            "saw_drop": any(not s["root"] and s["imsa"] for s in state.values())}


def _owner_controls(path, owner_uid):
    current = path
    while True:
        try:
            if os.lstat(current).st_uid == owner_uid:
                return True
        except OSError:
            pass
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def _write_profile(sts, name, session_name):
    """$IMSA_CONFIG with alice's keys and MFA device as 'base', and profile *name* for role-NAME on top of it."""
    from conftest import alice_profiles, write_profiles

    write_profiles(os.environ["IMSA_CONFIG"], alice_profiles(sts, **{name: (f"role-{name}", session_name)}))


# --- private mounts: scenarios run under `unshare -m -n` change files for themselves only ---


def _require_private_mounts():
    """Refuse to go on unless this process has a mount namespace its parent (the test) does not share: `unshare -m`.
    Then the tmpfs mounted over /opt, /usr/local/bin or /etc/sudoers.d below hides the machine's directories from
    this namespace alone, and vanishes with it."""
    if os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt"):
        raise RuntimeError("run this scenario under `unshare -m -n`: it mounts over system directories")


def private_dirs(*places):
    """An empty tmpfs over each (path, mode) of *places*, in this mount namespace only.

    The repository and its .venv stay visible where they are, even when they lie under one of the places (CI may run
    from a copy under /tmp): each is bound back from a descriptor opened before the tmpfs hid it.
    """
    _require_private_mounts()
    keep = [os.path.dirname(HERE), os.path.realpath(sys.prefix)]
    keep = [k for k in keep if not any(k.startswith(other + "/") for other in keep)]  # .venv is in the repository
    for path, mode in places:
        hidden = [k for k in keep if k == path or k.startswith(path.rstrip("/") + "/")]
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in hidden]
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", path], check=True, capture_output=True)
        for k, fd in zip(hidden, fds):
            os.makedirs(k, exist_ok=True)
            subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", k], check=True, capture_output=True,
                           pass_fds=(fd,))
            os.close(fd)


def private_sudoers(rule):
    """The machine's /etc/sudoers.d as it is, plus the file imsa-test with *rule*, in this mount namespace only."""
    directory = "/etc/sudoers.d"
    kept = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as handle:
            kept[name] = handle.read()
    private_dirs((directory, "0755"))
    for name, data in dict(kept, **{"imsa-test": rule.encode()}).items():
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o440)
    check = subprocess.run(["visudo", "-c"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"the test's sudoers rule is refused: {check.stdout} {check.stderr}")


def _readme_blocks(section):
    """The code blocks of the README section *section* (a "## " heading): [(language, [lines])], in order."""
    with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], None
    for line in body.splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            if current is None:
                current = (fence[3:], [])
            else:
                blocks.append(current)
                current = None
        elif current is not None and fence:
            current[1].append(fence)
    return blocks


def _as(owner, argv, env, cwd="/", timeout=180):
    """*argv* run as *owner* (its own groups), as a person at a shell would: [exit status, stdout, stderr]."""
    done = subprocess.run(["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups", *argv],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
    return [done.returncode, done.stdout, done.stderr]


def _make_home(owner, path, profiles, aws_config=""):
    """A home of *owner*'s at *path* (0700) with ~/.imsa (*profiles*, 0600) and ~/.aws/config (*aws_config*)."""
    import yaml

    os.makedirs(os.path.join(path, ".aws"))
    with open(os.path.join(path, ".imsa"), "w") as handle:
        yaml.safe_dump(profiles, handle)
    os.chmod(os.path.join(path, ".imsa"), 0o600)
    with open(os.path.join(path, ".aws", "config"), "w") as handle:
        handle.write(aws_config)
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, entry) for entry in dirs + files]:
            os.lchown(name, owner.pw_uid, owner.pw_gid)
    os.chmod(path, 0o700)
    return path


# A stand-in for systemctl: there is no systemd in the namespace; imsa install-service's calls are recorded.
FAKE_SYSTEMCTL = "#!/bin/sh\necho \"$*\" >> /tmp/systemctl.calls\n"


def readme_install():
    """The README's "Install", as a person follows it: the install, then `sudo imsa start`, `imsa assume`, `aws sts
    get-caller-identity` with no endpoint variable, then `sudo imsa install-service` (systemd is not running here: a
    stand-in systemctl records what it is asked). Every line is run as a real unprivileged user (IMSA_TEST_OWNER)
    with a real sudoers rule: NOPASSWD for all and no env_keep (sudo drops AWS_ENDPOINT_URL_STS: the service gets
    the STS settings from the CLI), as an administrator has it.

    /opt, /usr/local/bin, /usr/local/sbin, /etc/systemd/system, /etc/sudoers.d and /tmp are tmpfs of this mount
    namespace: the machine's stay as they are. pip reaches no index: a pip.conf in the new environment points it at
    wheels made from this interpreter's packages (tests/wheelhouse.py), which is the only step the README lacks.
    """
    import pwd
    import shutil
    import time

    import wheelhouse
    from conftest import MFA_CODE, MFA_SERIAL, start_sts

    owner = pwd.getpwnam(os.environ["IMSA_TEST_OWNER"])
    repo = os.path.dirname(HERE)
    blocks = _readme_blocks("Install")
    shell_blocks = [lines for language, lines in blocks if language == "sh"]
    install, by_hand, at_boot = shell_blocks[:3]
    sudoers = next((lines for language, lines in blocks if language == ""), [])  # the README asks for none
    private_dirs(("/tmp", "1777"), ("/opt", "0755"), ("/usr/local/bin", "0755"), ("/usr/local/sbin", "0755"),
                 ("/etc/systemd/system", "0755"))
    # Debian's and Ubuntu's own secure_path, stated here so that the test does not depend on this machine's.
    private_sudoers('Defaults secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n'
                    + "\n".join(sudoers) + f"\n{owner.pw_name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    with open("/usr/local/sbin/systemctl", "w") as handle:
        handle.write(FAKE_SYSTEMCTL)
    os.chmod("/usr/local/sbin/systemctl", 0o755)
    setup_lo()
    result = {"readme": {"install": install, "by_hand": by_hand, "at_boot": at_boot, "sudoers": sudoers}}
    wheels = "/tmp/wheels"
    wheelhouse.build(wheels)
    # A clone of this repository, the user's own: its files without .git, .venv and what builds leave.
    clone = "/tmp/clone"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", clone], check=True)
    aws_bin = "/tmp/aws-cli"  # the AWS CLI of this suite's environment, and nothing else of it
    os.mkdir(aws_bin, 0o755)
    os.symlink(os.path.join(os.path.dirname(sys.executable), "aws"), os.path.join(aws_bin, "aws"))
    sts = start_sts()
    try:
        alice = sts.users["alice"]
        home = _make_home(owner, "/tmp/home", {"my-profile": {
            "aws_access_key_id": alice["aws_access_key_id"], "aws_secret_access_key": alice["aws_secret_access_key"],
            "mfa_serial_number": MFA_SERIAL, "role_arn": sts.roles["role-a"], "role_session_name": "readme",
            "mfa_process": f"echo {MFA_CODE}",
        }}, aws_config="[default]\nregion = us-east-1\n")
        env = {"PATH": f"/usr/local/bin:/usr/bin:/bin:{aws_bin}", "HOME": home, "USER": owner.pw_name,
               "LOGNAME": owner.pw_name, "LANG": "C.UTF-8", "AWS_ENDPOINT_URL_STS": sts.endpoint}
        import shlex

        result["install"] = []
        for line in install:
            step = _as(owner, shlex.split(line, comments=True), env, cwd=clone)
            result["install"].append([line] + step)
            if step[0] != 0:
                return result
            if " -m venv " in line:
                venv = shlex.split(line, comments=True)[-1]
                with open(os.path.join(venv, "pip.conf"), "w") as handle:
                    handle.write(f"[global]\nno-index = true\nfind-links = {wheels}\nno-cache-dir = true\n"
                                 "disable-pip-version-check = true\n")
        imported = subprocess.run(["/opt/imsa/bin/python", "-I", "-c", "import imsa; print(imsa.__file__)"],
                                  capture_output=True, text=True, cwd="/")
        site = os.path.dirname(os.path.dirname(imported.stdout.strip()))
        result["imsa_file"] = imported.stdout.strip()
        result["editable_files"] = [name for name in os.listdir(site) if "editable" in name]
        with open(next(os.path.join(site, name, "direct_url.json") for name in os.listdir(site)
                       if name.startswith("imsa-") and name.endswith(".dist-info"))) as handle:
            result["direct_url"] = json.load(handle)
        result["not_roots"] = [path for path in _walk("/opt/imsa") if _not_roots(path)]
        result["packaged_units"] = {}
        for name in ("imsa.service", "imsa.socket"):
            with open(os.path.join("/opt/imsa/share/imsa", name), "rb") as packaged, \
                    open(os.path.join(repo, name), "rb") as source:
                result["packaged_units"][name] = packaged.read() == source.read()

        result["by_hand"] = []
        for line in by_hand:
            step = _as(owner, shlex.split(line, comments=True), env)
            result["by_hand"].append([line] + step)
            if step[0] != 0:
                return result
        status = _as(owner, ["imsa", "status", "--json"], env)
        pid = json.loads(status[1])["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            result["service_argv"] = handle.read().decode().split("\0")[:-1]
        result["service_uids"] = [int(x) for x in _ids(pid)["Uid"]]
        result["listen"] = json.loads(status[1])["listen"]
        result["sudo_status"] = _as(owner, ["sudo", "imsa", "status"], env)
        result["stop"] = _as(owner, ["imsa", "stop"], env)
        deadline = time.monotonic() + 10
        while IMDS_IP in _lo_addresses() and time.monotonic() < deadline:
            time.sleep(0.05)
        result["alias_after"] = IMDS_IP in _lo_addresses()

        result["at_boot"] = _as(owner, shlex.split(at_boot[0], comments=True), env)
        result["units"] = {}
        for name in ("imsa.service", "imsa.socket", "imsa.service.d/user.conf"):
            path = os.path.join("/etc/systemd/system", name)
            if os.path.exists(path):
                with open(path) as handle:
                    result["units"][name] = handle.read()
        try:
            with open("/tmp/systemctl.calls") as handle:
                result["systemctl"] = handle.read().splitlines()
        except FileNotFoundError:
            result["systemctl"] = []
        verify = subprocess.run(["systemd-analyze", "verify", "/etc/systemd/system/imsa.socket",
                                 "/etc/systemd/system/imsa.service"], capture_output=True, text=True, timeout=60)
        result["verify"] = [verify.returncode, verify.stderr]
        return result
    finally:
        subprocess.run(["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups",
                        "/opt/imsa/bin/imsa", "stop"], capture_output=True, env={"PATH": "/usr/bin:/bin"},
                       stdin=subprocess.DEVNULL, timeout=60)
        sts.stop()


def _walk(top):
    for root, dirs, files in os.walk(top):
        yield root
        for name in files:
            yield os.path.join(root, name)


def _not_roots(path):
    info = os.lstat(path)
    return info.st_uid != 0 or (info.st_mode & 0o022 and not os.path.islink(path))


def sudo_acts_as_the_invoking_user():
    """`sudo imsa status|assume|exec|stop` by an unprivileged user (IMSA_TEST_OWNER) with a real sudoers rule: each
    gives root up at once and acts on that user's own service (on 127.0.0.1), with that user's rights."""
    import pwd
    import time

    from conftest import MFA_CODE, MFA_SERIAL, start_sts

    owner = pwd.getpwnam(os.environ["IMSA_TEST_OWNER"])
    imsa = os.path.join(os.path.dirname(sys.executable), "imsa")
    private_dirs(("/tmp", "1777"))
    # env_keep for the two variables this test points elsewhere; everything else as sudo's defaults have it.
    private_sudoers(f'Defaults:{owner.pw_name} env_keep += "IMSA_CONFIG AWS_ENDPOINT_URL_STS"\n'
                    f"{owner.pw_name} ALL=(root) NOPASSWD: {imsa}\n")
    setup_lo()
    sts = start_sts()
    try:
        alice = sts.users["alice"]
        profiles = {"a": {"aws_access_key_id": alice["aws_access_key_id"],
                          "aws_secret_access_key": alice["aws_secret_access_key"], "mfa_serial_number": MFA_SERIAL,
                          "role_arn": sts.roles["role-a"], "role_session_name": "sudo-a"}}
        home = _make_home(owner, "/tmp/home", profiles)
        # The same file, root's alone: root could read it, the user cannot.
        os.mkdir("/tmp/root-only", 0o700)
        with open("/tmp/root-only/.imsa", "w") as handle, open(os.path.join(home, ".imsa")) as source:
            handle.write(source.read())
        os.chmod("/tmp/root-only/.imsa", 0o600)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "IMSA_CONFIG": os.path.join(home, ".imsa"),
               "AWS_ENDPOINT_URL_STS": sts.endpoint, "LANG": "C.UTF-8"}
        result = {"start": _as(owner, [imsa, "start", "--listen", "127.0.0.1:0"], env)}
        if result["start"][0] != 0:
            return result
        pid = json.loads(_as(owner, [imsa, "status", "--json"], env)[1])["pid"]
        result["pid"] = pid
        sudo = ["sudo", "-n", imsa]
        result["status"] = _as(owner, sudo + ["status"], env)
        result["assume"] = _as(owner, sudo + ["assume", "a", "--mfa-token", MFA_CODE], env)
        result["status_after"] = _as(owner, [imsa, "status"], env)
        result["exec"] = _as(owner, sudo + ["exec", "a", "--", "sh", "-c", 'id; echo "$HOME $USER $LOGNAME"'], env)
        result["root_only"] = _as(owner, sudo + ["assume", "a"], dict(env, IMSA_CONFIG="/tmp/root-only/.imsa"))
        result["stop"] = _as(owner, sudo + ["stop"], env)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        result["service_gone"] = not os.path.exists(f"/proc/{pid}")
        return result
    finally:
        subprocess.run(["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups", imsa,
                        "stop"], capture_output=True, env={"PATH": "/usr/bin:/bin", "IMSA_CONFIG": "/dev/null"},
                       stdin=subprocess.DEVNULL, timeout=60)
        sts.stop()


CONTAINER_CLIENT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from conftest import http

HERE, IMDS_IP, SECRET, PHASE = sys.argv[1:5]
results = {}


def attempt(name, method, path, headers):
    try:
        status, _, body = http(IMDS_IP, 80, method, path, headers, host_header=IMDS_IP, timeout=3)
        text = body.decode(errors="replace")
        results[name] = [status, text[:200], SECRET in text]
    except OSError as error:
        results[name] = ["no connection", f"{type(error).__name__}: {error}", False]


def spoofed(name, source):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    sock.settimeout(3)
    try:
        sock.bind((source, 0))
        sock.connect((IMDS_IP, 80))
        sock.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: " + IMDS_IP.encode() + b"\r\n"
                     b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        data = sock.recv(65536).decode(errors="replace")
        results[name] = [data.split(" ", 2)[1] if data else "closed", data[:200], SECRET in data]
    except OSError as error:
        results[name] = ["no connection", f"{type(error).__name__}: {error}", False]
    finally:
        sock.close()


if PHASE == "plain":
    attempt("token", "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    attempt("credentials", "GET", "/latest/meta-data/iam/security-credentials/role-a", {})
    attempt("token_as_v1", "GET", "/latest/meta-data/iam/security-credentials/role-a",
            {"X-aws-ec2-metadata-token": "x" * 60})
    from botocore.utils import InstanceMetadataFetcher

    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, config={"ec2_metadata_v1_disabled": False})
    results["botocore"] = sorted(fetcher.retrieve_iam_role_credentials())
    held = []
    for _ in range(600):  # as many idle connections as would fill the service's slots, were they accepted
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect((IMDS_IP, 80))
            held.append(sock)
        except OSError:
            sock.close()
    results["flood_connected"] = len(held)
else:
    spoofed("spoofed_listen_address", IMDS_IP)
    spoofed("spoofed_loopback", "127.0.0.9")
print(json.dumps(results))
"""


def _wait_for_other_netns(pid, timeout=10):
    import time

    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("the container namespace was not created")


def container():
    """A "container": a second network namespace joined to this one by a veth pair and routing 169.254.169.254
    to this side, as Docker's bridge does. The service here serves role-a; the container must get nothing, even
    when (root in its own namespace) it sends from the listen address or a loopback address, which the peer
    filter would let through: the host's kernel drops those martian sources, and no SYN-ACK could reach it."""
    import tempfile

    from conftest import MFA_CODE, run_imsa, start_service, start_sts, stop_process
    from imdsv2 import service_credentials

    host_side, container_side = "10.200.0.1", "10.200.0.2"
    setup_lo(IMDS_IP)
    sts = start_sts()
    # `unshare -n sleep` keeps its pid: that pid's network namespace is the container's.
    holder = subprocess.Popen(["unshare", "-n", "sleep", "120"], stdin=subprocess.DEVNULL)
    service = None
    try:
        _wait_for_other_netns(holder.pid)
        ns = ["nsenter", "-t", str(holder.pid), "-n"]

        def inside(*argv):
            subprocess.run(ns + list(argv), check=True, capture_output=True)

        ip("link", "add", "imsa-veth0", "type", "veth", "peer", "name", "imsa-veth1", "netns", str(holder.pid))
        ip("address", "add", f"{host_side}/24", "dev", "imsa-veth0")
        ip("link", "set", "imsa-veth0", "up")
        inside("ip", "link", "set", "lo", "up")
        inside("ip", "address", "add", f"{container_side}/24", "dev", "imsa-veth1")
        inside("ip", "link", "set", "imsa-veth1", "up")
        inside("ip", "route", "add", "default", "via", host_side)

        _write_profile(sts, "a", "host-a")
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(["--listen", f"{IMDS_IP}:80"], env=env)
        assumed = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env)
        if assumed.returncode != 0:
            return {"assume": assumed.stderr}
        role, creds = service_credentials(service)
        secret = creds["SecretAccessKey"]
        client_env = {"PATH": os.environ.get("PATH", ""), "HOME": tempfile.gettempdir(),
                      "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        results = {"host": [role, bool(secret)]}
        for phase in ("plain", "spoof"):
            if phase == "spoof":
                # The listen address on the container's side yet routed out (its local route removed), and
                # loopback sources allowed out of the container: what a hostile root in a container can do.
                inside("ip", "address", "add", f"{IMDS_IP}/32", "dev", "imsa-veth1")
                inside("ip", "route", "del", "local", IMDS_IP, "dev", "imsa-veth1", "table", "local")
                for knob in ("all", "imsa-veth1"):
                    inside("sysctl", "-qw", f"net.ipv4.conf.{knob}.route_localnet=1")
            done = subprocess.run(ns + [sys.executable, "-c", CONTAINER_CLIENT, HERE, IMDS_IP, secret, phase],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=client_env)
            if done.returncode != 0:
                results["client_failed"] = done.stderr[-2000:]
                return results
            results.update(json.loads(done.stdout.strip().splitlines()[-1]))
        log = service.log()
        results["log_peer"] = container_side in log
        results["log_has_secret"] = secret in log
        return results
    finally:
        if service is not None:
            stop_process(service.process)
        stop_process(holder)
        sts.stop()


# An `imsa exec` command that prints its endpoint and token, then waits for stdin to close.
EXEC_CHILD = (
    "import json, os, sys\n"
    "names = ('AWS_CONTAINER_CREDENTIALS_FULL_URI', 'AWS_CONTAINER_AUTHORIZATION_TOKEN')\n"
    "print(json.dumps([os.environ[name] for name in names]), flush=True)\n"
    "sys.stdin.read()\n"
)


def exec_peer_filter():
    """An `imsa exec` command's endpoint (on 127.0.0.1) refuses a client whose source is another local address, even
    one that has the command's token; the same request from 127.0.0.1 is served."""
    from conftest import MFA_CODE, http, run_imsa, start_service, start_sts, stop_process

    setup_lo(OUTSIDER_IP)
    sts = start_sts()
    service = running = None
    try:
        _write_profile(sts, "b", "exec-b")
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(env=env)
        assumed = run_imsa("assume", "b", "--mfa-token", MFA_CODE, env=env)
        if assumed.returncode != 0:
            return {"assume": assumed.stderr}
        running = subprocess.Popen([sys.executable, "-m", "imsa", "exec", "b", "--", sys.executable, "-c", EXEC_CHILD],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                   text=True)
        line = running.stdout.readline()
        if not line:
            return {"exec": running.stderr.read()}
        url, token = json.loads(line)
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        results = {}
        for name, source in (("outsider", OUTSIDER_IP), ("loopback", "127.0.0.1")):
            status, _, body = http("127.0.0.1", port, "GET", "/credentials", {"Authorization": token}, source=source)
            text = body.decode(errors="replace")
            results[name] = [status, text[:300], "SecretAccessKey" in text]
        return results
    finally:
        if running is not None:
            running.stdin.close()
            stop_process(running)
        if service is not None:
            stop_process(service.process)
        sts.stop()


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
