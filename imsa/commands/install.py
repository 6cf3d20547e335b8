"""``imsa install-service [USER]``: the systemd units that ship with imsa, written for one user, then enabled.

The top-level ``imsa.service`` and ``imsa.socket`` of the source tree are the units' only source; a built package
carries them unchanged in ``share/imsa`` under its prefix (setup.cfg, data_files), which is where an installed imsa
finds them. What is written: both units, ``ExecStart=`` pointing at the imsa that runs this command, and the drop-in
``imsa.service.d/user.conf`` with ``User=`` and ``Group=``.

Plain functions returning exit codes, like every command: no argparse, no sys.exit.
"""

import grp
import os
import pwd
import re
import sys

from imsa.commands.common import Io
from imsa.errors import EXIT_OK, ServiceError, UsageError

UNIT_DIR = "/etc/systemd/system"
UNITS = ("imsa.socket", "imsa.service")
# The system-wide mode (README, "The system-wide mode"): its own units, user and configuration directory.
SYSTEM_UNITS = ("imsa-system.socket", "imsa-system.service")
SYSTEM_USER = "imsa"
SYSTEM_CONFIG = "/etc/imsa/system"
DROP_IN = os.path.join("imsa.service.d", "user.conf")
# Where setup.cfg's data_files puts the units, relative to the install's prefix.
DATA_DIR = ("share", "imsa")
UNIT_MODE = 0o644
DIR_MODE = 0o755
# The unit's own ExecStart names /usr/local/bin/imsa (the README's install); the arguments after it stay.
EXEC_START = re.compile(r"^ExecStart=\S+(?= )", re.MULTILINE)
# Characters that need no quoting in an ExecStart word; "%" and "$" are systemd's specifier and variable signs.
PLAIN_WORD = re.compile(r"[A-Za-z0-9/._+@:,=-]+")


def unit_sources(units=UNITS):
    """{unit name: path} of *units* as this imsa ships them: its source tree's when it runs from one (a clone, an
    editable install), else the copies installed with the package."""
    import imsa

    tree = os.path.dirname(os.path.dirname(os.path.abspath(imsa.__file__)))
    if os.path.isfile(os.path.join(tree, "setup.cfg")) and all(os.path.isfile(os.path.join(tree, n)) for n in units):
        return {name: os.path.join(tree, name) for name in units}
    from importlib import metadata

    found = {}
    try:
        files = metadata.distribution("imsa").files or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name in units and entry.parts[-3:-1] == DATA_DIR:
            found[entry.name] = str(entry.locate())
    for name in units:  # a package without a RECORD: where pip puts data files under the prefix
        found.setdefault(name, os.path.join(sys.prefix, *DATA_DIR, name))
    missing = [path for path in found.values() if not os.path.isfile(path)]
    if missing:
        raise ServiceError(f"the systemd units are not installed with this imsa ({missing[0]} is missing); "
                           f"reinstall it from a clone of its repository (README, \"Install\")")
    return found


def imsa_command():
    """The command line of the imsa running now, for ExecStart: the console script beside this interpreter (a
    virtual environment's or pipx's), else this interpreter with ``-I -m imsa``."""
    script = os.path.join(os.path.dirname(sys.executable), "imsa")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-I", "-m", "imsa"]


def systemd_word(word):
    """*word* as one word of an ExecStart line: specifiers and variables escaped, quoted when it has blanks."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if PLAIN_WORD.fullmatch(word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(template, command):
    """The text of imsa.service with ExecStart running *command* (argv of imsa) instead of /usr/local/bin/imsa."""
    text, count = EXEC_START.subn(lambda _match: "ExecStart=" + " ".join(map(systemd_word, command)), template, 1)
    if count != 1:
        raise ServiceError("imsa.service has no ExecStart line to point at this imsa")
    return text


def served_user(user=None):
    """(name, group name) of the user the service will run as: *user*, else the one who ran sudo; never root."""
    user = user or os.environ.get("SUDO_USER")
    if not user:
        raise UsageError("name the user the service serves: sudo imsa install-service USER")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"no such user {user!r}") from None
    if entry.pw_uid == 0:
        raise UsageError("refusing to serve credentials as root; name your own user: sudo imsa install-service USER")
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return entry.pw_name, group


def write_file(path, text):
    """Replace *path* with *text*, mode 0644, through a new file renamed over it (a symlink there is replaced, never
    followed)."""
    from imsa.files import replace_atomically

    replace_atomically(path, text, UNIT_MODE)


def systemctl(*args):
    """Run ``systemctl ARGS``; its complaint becomes one error line."""
    import subprocess

    try:
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ServiceError("systemctl is not installed: is this a systemd machine? (--no-enable writes the units "
                           "only)") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise ServiceError(f"systemctl {' '.join(args)} failed: {lines[-1] if lines else f'exit {done.returncode}'}")


def system_user():
    """Make the system mode's own user (no home, no shell) unless it exists."""
    import subprocess

    try:
        pwd.getpwnam(SYSTEM_USER)
        return
    except KeyError:
        pass
    try:
        done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", SYSTEM_USER], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ServiceError(f"useradd is not installed: make the system user {SYSTEM_USER!r} yourself") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ServiceError(f"useradd {SYSTEM_USER} failed: {lines[-1] if lines else f'exit {done.returncode}'}")


def install_system(unit_dir=None, enable=True, io=None):
    """The system-wide mode: imsa-system.socket and imsa-system.service (ExecStart: this imsa), its user, and the
    root-owned configuration directory; enabled unless *enable* is false or the units go to *unit_dir*."""
    io = io or Io()
    sources = unit_sources(SYSTEM_UNITS)
    command = imsa_command()
    target = unit_dir or UNIT_DIR
    os.makedirs(target, DIR_MODE, exist_ok=True)
    with open(sources["imsa-system.socket"], encoding="utf-8") as handle:
        write_file(os.path.join(target, "imsa-system.socket"), handle.read())
    with open(sources["imsa-system.service"], encoding="utf-8") as handle:
        write_file(os.path.join(target, "imsa-system.service"), service_unit(handle.read(), command))
    io.say(f"imsa: wrote imsa-system.socket and imsa-system.service to {target}: {' '.join(command)} as "
           f"{SYSTEM_USER}")
    if unit_dir is not None:
        return EXIT_OK
    system_user()
    os.makedirs(SYSTEM_CONFIG, DIR_MODE, exist_ok=True)
    if enable:
        systemctl("daemon-reload")
        systemctl("enable", "--now", *SYSTEM_UNITS)
        io.say("imsa: enabled imsa-system.socket and imsa-system.service; bind a service with: "
               "sudo imsa bind --system NAME PROFILE")
    else:
        io.say("imsa: not enabled; to start them now and at boot: sudo systemctl daemon-reload && "
               "sudo systemctl enable --now imsa-system.socket imsa-system.service")
    return EXIT_OK


def install_service(user=None, unit_dir=None, enable=True, io=None, system=False):
    """Write imsa.socket, imsa.service (ExecStart: this imsa) and the User= drop-in for *user*, then reload systemd
    and enable both units, unless *enable* is false or the units go to *unit_dir* rather than systemd's own. With
    *system*, the system-wide mode's units instead (install_system)."""
    from imsa.server import process

    io = io or Io()
    if os.geteuid() != 0:
        raise UsageError("install-service writes systemd units and needs root: sudo imsa install-service [USER]")
    if system:
        if user:
            raise UsageError("install-service --system serves no person: it runs as its own user; leave out USER")
        return install_system(unit_dir, enable, io)
    name, group = served_user(user)
    sources = unit_sources()
    command = imsa_command()
    target = unit_dir or UNIT_DIR
    os.makedirs(os.path.join(target, os.path.dirname(DROP_IN)), DIR_MODE, exist_ok=True)
    with open(sources["imsa.socket"], encoding="utf-8") as handle:
        write_file(os.path.join(target, "imsa.socket"), handle.read())
    with open(sources["imsa.service"], encoding="utf-8") as handle:
        write_file(os.path.join(target, "imsa.service"), service_unit(handle.read(), command))
    write_file(os.path.join(target, DROP_IN), f"[Service]\nUser={name}\nGroup={group}\n")
    io.say(f"imsa: wrote imsa.socket, imsa.service and {DROP_IN} to {target}: {' '.join(command)} as {name}")
    for reason in process.writable_code():
        # The service runs it as the user, without privileges: that is fine. Root running it (now, or through
        # `sudo imsa start`) is not: whoever can change it gets root the next time.
        io.say(f"imsa: warning: root is running imsa from code another user can change ({reason}); the service "
               f"runs it as {name} only, but do not run it with sudo again: use a root-owned install for that "
               f"(README, \"Install\")")
    if unit_dir is None and enable:
        systemctl("daemon-reload")
        systemctl("enable", "--now", *UNITS)
        io.say(f"imsa: enabled imsa.socket and imsa.service for {name}; check with: imsa status")
    elif unit_dir is None:
        io.say("imsa: not enabled; to start them now and at boot: sudo systemctl daemon-reload && "
               "sudo systemctl enable --now imsa.socket imsa.service")
    return EXIT_OK
