"""Where imsa keeps things on disk: the user's XDG directories and the organisation's system directory.

The XDG Base Directory rules apply: a variable that is unset, empty or not an absolute path is ignored and the
default under the home directory is used.
"""

import os

# The organisation's defaults (an MDM or a package drops files here); read by the CLI as the user, never by root.
SYSTEM_CONFIG_DIR = "/etc/imsa"
SYSTEM_CONFIG_VARIABLE = "IMSA_SYSTEM_CONFIG_DIR"

_XDG_DEFAULTS = {
    "XDG_CONFIG_HOME": (".config",),
    "XDG_DATA_HOME": (".local", "share"),
    "XDG_STATE_HOME": (".local", "state"),
}


def xdg_dir(variable, *parts, environ=None):
    """``$variable/imsa/<parts>`` (``XDG_CONFIG_HOME``, ``XDG_DATA_HOME`` or ``XDG_STATE_HOME``), else its default."""
    environ = os.environ if environ is None else environ
    base = environ.get(variable)
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), *_XDG_DEFAULTS[variable])
    return os.path.join(base, "imsa", *parts)


def system_config_dir(environ=None):
    """The organisation's configuration directory: ``$IMSA_SYSTEM_CONFIG_DIR``, else ``/etc/imsa``."""
    environ = os.environ if environ is None else environ
    return environ.get(SYSTEM_CONFIG_VARIABLE) or SYSTEM_CONFIG_DIR
