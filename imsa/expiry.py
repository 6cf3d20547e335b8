"""Seeing a session's end coming: the warning window, the words for time left, and the desktop notification.

The window is IMSA_WARN_BEFORE (minutes, default WARN_BEFORE): ``imsa assume``/``export``/``exec --mode static``
warn on stderr when what they hand out, or the session behind it, ends within it, and the service logs (and
notifies, where a desktop notifier is available) that far ahead of each session's end. The CLI sends its window
with each session, so the service, which never reads the user's environment as root, warns when the user asked.

Standard library only: the service imports it, and ``imsa status --short`` runs at every prompt.
"""

import datetime
import os

from imsa.errors import ConfigError

WARN_VARIABLE = "IMSA_WARN_BEFORE"
WARN_BEFORE = datetime.timedelta(minutes=30)
# The longest window that means anything: the longest session STS gives (GetSessionToken, 36 h).
MAX_WARN_BEFORE = datetime.timedelta(hours=36)
# A fixed path, never one found through PATH: the service runs it.
NOTIFIER = "/usr/bin/notify-send"
NOTIFY_TIMEOUT = 10


def warn_before(environ=None):
    """The warning window from IMSA_WARN_BEFORE (minutes, fractions allowed; 0 turns warnings off)."""
    environ = os.environ if environ is None else environ
    text = environ.get(WARN_VARIABLE, "").strip()
    if not text:
        return WARN_BEFORE
    most = MAX_WARN_BEFORE / datetime.timedelta(minutes=1)
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not 0 <= minutes <= most:  # NaN fails this too
        raise ConfigError(f"{WARN_VARIABLE}={text!r} must be minutes, from 0 (no warnings) to {most:.0f}")
    return datetime.timedelta(minutes=minutes)


def parse(text):
    """An aware UTC datetime from the service's ``YYYY-MM-DDTHH:MM:SSZ`` (credentials.parse_time without its
    imports, for status --short)."""
    return datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).astimezone(datetime.timezone.utc)


def now():
    """The current time, aware UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


def left(expiration, now):
    """Time left until *expiration* for people: ``1h05m``, ``12m``, ``40s``, or ``expired``."""
    seconds = int((expiration - now).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours}h{rest // 60:02d}m"
    return f"{rest // 60}m" if rest >= 60 else f"{rest}s"


def ending(expiration, now, window):
    """True when *expiration* is within *window* of *now* (and a window is set)."""
    return bool(window) and expiration - now <= window


def notify(summary, body, environ=None):
    """Show a desktop notification when a session bus and NOTIFIER are there; never waits for it, never fails."""
    import subprocess  # only here: status --short imports this module at every prompt
    import threading

    environ = os.environ if environ is None else environ
    if not environ.get("DBUS_SESSION_BUS_ADDRESS") or not os.access(NOTIFIER, os.X_OK):
        return False

    def run():
        try:
            subprocess.run([NOTIFIER, "--app-name=imsa", summary, body], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=NOTIFY_TIMEOUT, cwd="/")
        except (OSError, subprocess.SubprocessError):
            pass  # a notification is a courtesy; the log line is the record

    threading.Thread(target=run, name="imsa-notify", daemon=True).start()
    return True
