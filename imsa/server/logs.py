"""The service's log: where lines go, what each line looks like, and how refusals are written so that no client can
fill the disk or forge a line.

- ``configure(level, path=None)``: a timestamp on every line; with *path*, a file rotated at LOG_MAX_BYTES with
  LOG_BACKUPS older files beside it (``imsa.log.1`` …, so at most 4 MiB in all), mode 0600, opened without
  following a symlink; without, stderr. When stderr is the journal (systemd), no file at all, and lines carry
  neither time nor pid (the journal records both) but a syslog priority prefix the journal turns into the entry's
  priority.
- ``RefusalLimiter``: one line per peer per REFUSAL_INTERVAL; the refusals after it are only counted, and one
  line says how many when the interval ends.
- ``shown(value)``: a client's text (a path, a method) as ``repr()`` shows it, cut to SHOWN_CHARS: a ``%0a`` in a
  path is written as ``\\n``, never as a line of its own.

Only the standard library's ``logging`` is imported at module level: the CLI reads WIRE_LOGGERS from here.
"""

import collections
import errno
import logging
import os
import stat
import sys
import threading
import time

LOG_FORMAT = "%(asctime)s imsa[%(process)d] %(levelname)s %(name)s: %(message)s"
# For the journal: it stamps each entry with the time and the pid itself, and reads "<N>" as its priority.
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
# syslog(3) priorities of Python's levels; a level in between takes the next more severe one.
SYSLOG_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
SYSLOG_DEBUG = 7
# ISO 8601 with the UTC offset: lines from before and after a change of time zone or DST still sort and compare.
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
# The log file is rotated at 1 MiB and 3 older files are kept: 4 MiB at most, whatever clients send.
LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 3
LOG_MODE = 0o600
# Their DEBUG lines carry whole HTTP bodies, and STS's answers hold secrets (the MFA session's secret and token):
# WARNING at most, --debug or not.
WIRE_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
# Chatty about every connection; its warnings (a full queue, a broken channel) still get through.
QUIET_LOGGERS = WIRE_LOGGERS + ("waitress",)

# Refusals: one line per peer (address and uid) per interval, then a count. A client that is refused thousands of
# times a second (one connection grew an unbounded log by 23 MiB in 3 s) costs two lines per interval.
REFUSAL_INTERVAL = 10.0
# At most this many peers are tracked at once (loopback alone has 16 million addresses); beyond, refusals from
# peers not tracked share one entry, OTHER_PEERS. The table's memory is bounded by this.
MAX_PEERS = 256
OTHER_PEERS = "other peers"
# How much of a client's text (a path can be 16 KiB) a line shows.
SHOWN_CHARS = 200


def mute_wire_loggers():
    """Keep the HTTP wire logs of botocore, boto3 and urllib3 at WARNING (their DEBUG lines hold secrets)."""
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure(level=logging.INFO, path=None):
    """Send every log line to *path* (rotated, 0600) or, without a path, to stderr; a timestamp on each line.

    Call it again to move the log, e.g. once privileges are dropped, so that the file is created and opened as the
    served user; earlier handlers are closed. Raises OSError when *path* cannot be opened safely (a symlink,
    another user's file, a directory).
    """
    # Imported on every call, not only with a path: the first call comes before the privilege drop, and after it
    # the served user may be unable to read the Python installation (under /root, say). Not at module level: the
    # CLI imports this module and would pay ~6 ms for it.
    import logging.handlers  # noqa: F401

    if path:
        handler = _rotating_handler(path)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter() if stderr_is_journal() else logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    previous, root.handlers[:] = root.handlers[:], [handler]
    for old in previous:
        old.close()
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def stderr_is_journal():
    """True when stderr is the journal stream systemd connected: JOURNAL_STREAM names its device and inode.

    Comparing them, as systemd.exec(5) advises, keeps a terminal or a pipe that merely inherited the variable (a
    shell started from a service) on the timestamped format.
    """
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # stderr closed or replaced by an object without a descriptor
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """JOURNAL_FORMAT: the record's syslog priority first, no time and no pid (the journal has both)."""

    def __init__(self):
        super().__init__(JOURNAL_FORMAT)

    def format(self, record):
        record.priority = next((priority for level, priority in SYSLOG_PRIORITIES if record.levelno >= level),
                               SYSLOG_DEBUG)
        return super().format(record)


def _rotating_handler(path):
    """A RotatingFileHandler that opens its file (and each new one after a rotation) through open_private."""

    class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
        def _open(self):
            return open_private(self.baseFilename, self.encoding, self.errors)

    return PrivateRotatingFileHandler(
        path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8", errors="backslashreplace"
    )


def open_private(path, encoding="utf-8", errors="backslashreplace"):
    """*path* opened for appending: created 0600, never through a symlink, and only a plain file of this user."""
    # O_NONBLOCK: a FIFO put there would block this open (and the service) until someone read it; with it, the
    # open fails instead. It changes nothing for a plain file.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, LOG_MODE)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
            raise OSError(errno.EPERM, f"not a plain file of uid {os.geteuid()}", path)
        if stat.S_IMODE(info.st_mode) != LOG_MODE:
            os.fchmod(fd, LOG_MODE)
        return open(fd, "a", encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


def shown(value, limit=SHOWN_CHARS):
    """*value* as ``repr()`` writes it (line breaks and control characters escaped), cut to about *limit* chars."""
    text = repr(value[:limit])  # only the part shown is escaped: a 16 KiB path costs no more than a short one
    if len(value) <= limit and len(text) <= limit + 2:
        return text
    return f"{text[:limit]}... ({len(value)} characters)"


class RefusalLimiter:
    """Decides which refusals are written: the first from each peer in an interval; the others are counted, and
    their number is written when the interval ends (by a background thread, while any interval is open).

    A counted refusal costs a dict lookup and a clock read under a lock, and no I/O.
    """

    def __init__(self, logger, level=logging.INFO, interval=REFUSAL_INTERVAL, max_peers=MAX_PEERS,
                 clock=time.monotonic, background=True):
        self._log = logger
        self._level = level
        self._interval = interval
        self._max_peers = max_peers
        self._clock = clock
        self._background = background
        self._lock = threading.Lock()
        # peer -> [end of its interval, refusals counted and not written]. All intervals have the same length, so
        # insertion order is the order they end in: the ended ones are always at the front.
        self._open = collections.OrderedDict()
        self._flusher = None

    def allow(self, peer):
        """True when this refusal from *peer* (a short text: its address and uid) is to be written in full."""
        if not self._log.isEnabledFor(self._level):  # nothing is written, so nothing is counted either
            return False
        now = self._clock()
        flusher = None
        with self._lock:
            entry = self._open.get(peer)
            if entry is not None and now < entry[0]:
                entry[1] += 1
                return False
            ended = self._pop_ended(now)
            if peer not in self._open and len(self._open) >= self._max_peers:
                peer = OTHER_PEERS
            entry = self._open.get(peer)
            if entry is not None:
                entry[1] += 1
                allowed = False
            else:
                self._open[peer] = [now + self._interval, 0]
                allowed = True
                if self._background and self._flusher is None:
                    flusher = self._flusher = threading.Thread(
                        target=self._flush_until_idle, name="imsa-refusals", daemon=True
                    )
        self._write(ended)
        if flusher is not None:
            flusher.start()
        return allowed

    def flush(self):
        """Write the count of every interval that has ended; returns the seconds until the next one ends (None
        when none is open)."""
        with self._lock:
            ended, wait = self._pop_ended(self._clock()), self._next_end()
        self._write(ended)
        return wait

    def tracked(self):
        """How many peers have an open interval (bounded by max_peers + 1)."""
        return len(self._open)

    def _flush_until_idle(self):
        while True:
            with self._lock:
                ended, wait = self._pop_ended(self._clock()), self._next_end()
                if wait is None:
                    self._flusher = None  # under the lock: the next allow() starts a new thread
            self._write(ended)
            if wait is None:
                return
            time.sleep(wait)

    def _pop_ended(self, now):
        """Remove the intervals that ended by *now*; their (peer, count) pairs (call with the lock held)."""
        ended = []
        while self._open:
            peer, (end, count) = next(iter(self._open.items()))
            if end > now:
                break
            del self._open[peer]
            if count:
                ended.append((peer, count))
        return ended

    def _next_end(self):
        """Seconds from now until the first open interval ends, None when none is open (lock held)."""
        if not self._open:
            return None
        return max(next(iter(self._open.values()))[0] - self._clock(), 0.0)

    def _write(self, ended):
        for peer, count in ended:
            self._log.log(self._level, "... and %d more refusals from %s in the last %g s", count, peer, self._interval)
