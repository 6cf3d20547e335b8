"""``imsa status --short``: one line for a shell prompt, the served profile and the time left before its session
ends.

It runs at every prompt, so it imports nothing but the control-socket client and imsa.expiry (not even
imsa.credentials), and cli.py reaches it without building the parser (scripts/bench.py measures it).
"""

from imsa import expiry
from imsa.client import Client
from imsa.errors import EXIT_ERROR, EXIT_OK

# What the line says when nothing is served.
NOTHING = "-"


def short_line(status, now=None):
    """The line for the service's *status* answer: ``PROFILE 1h05m``, ``PROFILE expired`` or NOTHING."""
    active = status.get("active")
    if not active:
        return NOTHING
    if not active.get("valid") or not active.get("session_expiration"):
        return f"{active['profile']} expired"
    return f"{active['profile']} {expiry.left(expiry.parse(active['session_expiration']), now or expiry.now())}"


def short_status(out, client=None):
    """Write the line to *out*; exit 0 only while valid credentials are served (as ``imsa status``)."""
    status = (client or Client()).status()
    out.write(short_line(status) + "\n")
    out.flush()
    active = status.get("active")
    return EXIT_OK if active and active.get("valid") else EXIT_ERROR
