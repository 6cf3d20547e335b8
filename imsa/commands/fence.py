"""Fencing: profiles whose credentials must never be ambient, or never leave without a person's yes.

``imds: false`` in a ~/.imsa profile keeps it off the global endpoint: ``imsa assume`` refuses it (and the service
refuses to activate a spec marked so), while ``imsa exec`` and ``imsa export`` still give it to one command or
shell. ``confirm: true`` makes ``exec``, ``export`` and ``credential-process`` ask on the terminal each time, as
``ssh-add -c`` does; with no terminal to ask on, they refuse and say what to run where there is one.
"""

from imsa.config import fence_of
from imsa.errors import ConfigError, ImsaError

YES = ("y", "yes")


class NotConfirmed(ImsaError):
    """A confirm-required profile's delivery was declined, or could not be asked about (exit 1)."""


def refuse_global(profile):
    """ConfigError when *profile* is kept off the global endpoint (``imds: false``)."""
    if fence_of(profile).imds:
        return
    name = profile.name
    raise ConfigError(f"profile {name} is kept off the global endpoint (imds: false in {profile.origin}); give it "
                      f"to one command with imsa exec {name} -- COMMAND, or to one shell with "
                      f"eval \"$(imsa export {name})\"")


def confirm(profile, command, open_terminal=None):
    """For a ``confirm: true`` profile: ask on the terminal whether *command* may have its credentials; NotConfirmed
    unless the answer is yes, or when there is no terminal (the message names *command* to run in one)."""
    if not fence_of(profile).confirm:
        return
    from imsa import sts

    tty = (open_terminal or sts.open_terminal)()
    name = profile.name
    if tty is None:
        raise NotConfirmed(f"profile {name} needs a yes on a terminal each time (confirm: true), and there is no "
                           f"terminal here; run it in one: {command}")
    role = profile.role_arn or "its session credentials"
    try:
        answer = sts.ask_terminal(tty, f"imsa: give {name}'s credentials ({role}) to `{command}`? [y/N] ")
    except ImsaError:  # end of input: no answer is a no
        answer = ""
    if answer.strip().lower() not in YES:
        raise NotConfirmed(f"not confirmed: {name}'s credentials were not given to `{command}`")
