"""``sudo imsa COMMAND``: unless the command needs root, the CLI becomes the user who ran sudo before anything else.

Only ``imsa start`` (it binds port 80, then drops to that user itself) and ``imsa install-service`` (it writes
systemd's units) use root. Every other command is about the invoking user's service and files, so under sudo it
gives root up for good first: it then talks to that user's service, as the README promises, and reads nothing that
user could not read. become() is also how the service itself gives root up (imsa.server.process.drop_privileges).
"""

import os
import pwd

from imsa.errors import ImsaError, UsageError

# The commands that keep root under sudo.
ROOT_COMMANDS = ("start", "install-service")


def become(uid, gid, name=None):
    """Give root up for good: supplementary groups (*name*'s, or *gid* alone without a passwd entry), gid, uid, in
    that order; then check that nothing of root is left and that it cannot be taken back (ImsaError if so)."""
    if name:
        os.initgroups(name, gid)
    else:
        os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if 0 in os.getresuid() or (gid != 0 and 0 in os.getresgid()):
        raise ImsaError(f"could not give up root for uid {uid}")
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return
    raise ImsaError(f"root could be taken back after giving it up for uid {uid}")


def become_invoking_user(environ=None):
    """When root runs imsa through sudo for another user (SUDO_UID), become that user for good (become()), then
    HOME, USER and LOGNAME from the passwd entry. Returns that uid, or None when imsa is not root, or root was not
    reached through sudo from another account."""
    environ = os.environ if environ is None else environ
    text = environ.get("SUDO_UID", "")
    if os.geteuid() != 0 or not text.isdigit() or int(text) == 0:
        return None
    uid = int(text)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise UsageError(f"SUDO_UID={uid} names no user of this machine") from None
    become(uid, entry.pw_gid, entry.pw_name)
    environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return uid
