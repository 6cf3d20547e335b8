"""The delivery log: which process received which profile's credentials, when, and how they left the service.

Every credential answer — IMDS, and the control plane's for ``imsa exec``, ``credential-process``, ``export`` and
``console`` — is noted with one call *after* the answer has been handed to the server (``delivered``). Finding out
who received it happens later, in one worker thread fed by a bounded queue, never on a request:

- a TCP client (IMDS, or the command an ``imsa exec`` serves): sock_diag names the inode of the client's socket
  from the connection's four addresses, and the process is the one whose ``/proc/PID/fd`` holds ``socket:[INODE]``
  (pids scanned newest first, at most MAX_PROCESSES of them, at most MAX_FDS descriptors each);
- a control-plane client (the CLI): its pid comes from SO_PEERCRED, and a pidfd taken with the request tells
  whether what ``/proc/PID`` says afterwards is still that process's; its parent is noted as well (the SDK that ran
  ``credential-process``, the shell that ran ``export``).

The service runs as its owner, so it can read the owner's own processes only: another user's process (root's) is
recorded with its uid alone. A process that is gone, or has closed its connection, before the worker looks is
recorded as not attributed, with the reason (README, "Who used which role").

Records hold no secret: the access key id is masked as everywhere else, no token, no session. They are kept in a
ring of MAX_RECORDS and, when the service was started with ``--delivery-log PATH``, appended to that file as JSON
lines (0600, opened without following a symlink, rotated at FILE_MAX_BYTES) by the worker, never by a request.
"""

import collections
import json
import logging
import os
import select
import threading
import time

from imsa.credentials import format_time, mask, utcnow
from imsa.server.logs import open_private
from imsa.server.peers import tcp_socket, unmapped

log = logging.getLogger(__name__)

# How credentials left the service (the "way" of a record).
WAYS = ("imds", "exec", "credential-process", "export", "console")
# What the control plane records when an older CLI does not say which command asked.
UNKNOWN_WAY = "control"
MAX_RECORDS = 1000
# Deliveries waiting for their lookup. Past it a delivery is still recorded, without looking (a burst of SDK calls
# must not make the worker fall minutes behind); past MAX_PENDING it is dropped and counted.
QUEUE_SIZE = 256
MAX_PENDING = 4096
# Bounds of one /proc scan: processes looked at, descriptors read per process.
MAX_PROCESSES = 4096
MAX_FDS = 4096
# After each batch the worker rests this many times as long as the batch took (at most MAX_PAUSE seconds).
PAUSE_FACTOR = 3
MAX_PAUSE = 0.25
# Sockets whose holder is remembered (checked with one readlink before it is reused).
MAX_KNOWN = 256
# A command line is cut to this many characters (arguments joined by spaces).
MAX_CMDLINE = 512
FILE_MAX_BYTES = 1 << 20
FILE_BACKUPS = 3


NOT_SEEN = "the process closed its connection or exited before the lookup"
QUEUE_FULL = "not attributed: too many deliveries at once"
NO_PID = "the client's pid is not visible to the service (another PID namespace?)"
OTHER_USER = "another user's process: the service, running as its owner, can see its uid only"


class DeliveryLog:
    """The ring of delivery records, the worker that attributes them, and the optional file they go to."""

    def __init__(self, path=None, limit=MAX_RECORDS, queue_size=QUEUE_SIZE, clock=utcnow, proc="/proc",
                 max_bytes=FILE_MAX_BYTES, backups=FILE_BACKUPS):
        self.path = path
        self._clock = clock
        self._proc = proc
        self._queue_size = queue_size
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self._pending_changed = threading.Condition(self._lock)
        self._pending = collections.deque()
        self._records = collections.deque(maxlen=limit)
        self._last = {}
        self._sequence = 0
        self._dropped = 0
        self._stopping = False
        self._thread = None
        self._file = None
        # inode -> (pid, fd, holder) of sockets found lately (the worker's alone: no lock).
        self._known = collections.OrderedDict()

    # --- on the request side: one call, nothing but a note in memory ---

    def delivered(self, spec, credentials, way, uid=None, pid=None, pidfd=None, client=None, server=None,
                  via_pid=None, via_pidfd=None):
        """Note one delivery of *credentials* (of *spec*) made *way*; called after the answer is handed over.

        *client*/*server* are the (ip, port) ends of a TCP connection whose client is looked up; *pid* (with the
        *pidfd* taken during the request) a control-plane client; *via_pid* the ``imsa exec`` that served a command.
        """
        record = {
            "time": format_time(self._clock()),
            "profile": spec.profile,
            "role_arn": spec.role_arn,
            "way": way,
            "access_key_id": mask(credentials.access_key_id),
            "uid": uid,
            "pid": pid,
            "exe": None,
            "cmdline": None,
            "attributed": False,
        }
        job = (record, client, server, pidfd, via_pid, via_pidfd)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._dropped += 1
                _close(pidfd, via_pidfd)
                return
            if len(self._pending) >= self._queue_size:
                record["note"] = QUEUE_FULL
                job = (record, None, None, None, None, None)
                _close(pidfd, via_pidfd)
            self._pending.append(job)
            self._pending_changed.notify()

    def imds_hook(self, host, port):
        """The IMDS app's *on_delivery* for a listener on *host*:*port*: the client is looked up by its socket."""

        def on_delivery(snapshot, environ):
            self.delivered(snapshot.spec, snapshot.credentials, "imds", uid=environ.get("imsa.peer_uid"),
                           client=(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT")), server=(host, port))

        return on_delivery

    def control_hook(self, spec, credentials, environ, args):
        """What the control app calls once its credentials answer is written: the CLI is the client (SO_PEERCRED),
        or, for ``imsa exec``, the command connected to its endpoint (``?client=IP:PORT&server=IP:PORT``)."""
        way = way_of(args.get("way"))
        pid, uid = environ.get("imsa.peer_pid"), environ.get("imsa.peer_uid")
        pidfd = open_pidfd(pid)  # now, while the CLI waits for the answer: its pid cannot name another process yet
        client, server = _ends(args.get("client")), _ends(args.get("server"))
        if way == "exec" and client is not None and server is not None:
            def on_close():
                self.delivered(spec, credentials, way, uid=uid, client=client, server=server, via_pid=pid,
                               via_pidfd=pidfd)
        else:
            def on_close():
                self.delivered(spec, credentials, way, uid=uid, pid=pid, pidfd=pidfd)
        return on_close

    # --- reading ---

    def records(self, after=0, profile=None):
        """(records, last): the records numbered above *after* (of *profile* only, when given), oldest first, and
        the number of the last record kept (ask for those after it next time)."""
        with self._lock:
            found = [record for record in self._records if record["seq"] > after]
            last = max(self._sequence, after) if self._records else after
        if profile is not None:
            found = [record for record in found if record["profile"] == profile]
        return found, last

    def last_per_profile(self):
        """The latest record of each profile, by profile name."""
        with self._lock:
            return dict(self._last)

    def status(self):
        """What status says of the log: its file, how many records are kept, and how many were dropped."""
        with self._lock:
            return {"file": self.path, "kept": len(self._records), "dropped": self._dropped}

    # --- the worker ---

    def open_file(self):
        """Open the log file for appending (as the service's user: after the drop); OSError when it cannot be."""
        if self.path is not None:
            self._file = open_private(self.path)

    def start(self):
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="imsa-deliveries", daemon=True)
        self._thread.start()

    def stop(self):
        """Attribute and write what is pending, then stop the worker and close the file."""
        with self._pending_changed:
            self._stopping = True
            self._pending_changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._file is not None:
            self._file.close()
            self._file = None

    def _run(self):
        while True:
            with self._pending_changed:
                while not self._pending and not self._stopping:
                    self._pending_changed.wait()
                jobs = list(self._pending)
                self._pending.clear()
                if not jobs and self._stopping:
                    return
            began = time.monotonic()
            try:
                self.process(jobs)
            except Exception:  # the worker must survive anything; these records are lost, the next ones are not
                log.exception("attributing deliveries failed")
            # A scan of /proc holds the GIL for milliseconds at a time, which the request threads would feel under
            # a burst of new connections: rest PAUSE_FACTOR times as long as the batch took (what arrives meanwhile
            # is looked up by the next scan, all at once), so the worker takes at most 1/(1+PAUSE_FACTOR) of a CPU.
            pause = min((time.monotonic() - began) * PAUSE_FACTOR, MAX_PAUSE)
            if pause > 0:
                with self._pending_changed:
                    self._pending_changed.wait_for(lambda: self._stopping, timeout=pause)

    def process(self, jobs):
        """Attribute a batch of noted deliveries (one /proc scan for all of them), keep them and write them."""
        own_uid = os.geteuid()  # read now: the log is made before the service drops root
        wanted = {}
        for record, client, server, _pidfd, _via_pid, _via_pidfd in jobs:
            if client is None:
                continue
            if record["uid"] is not None and record["uid"] != own_uid:
                record["note"] = OTHER_USER
                continue
            inode = socket_inode(client, server)
            if inode is None:
                record["note"] = NOT_SEEN
            else:
                wanted.setdefault(inode, []).append(record)
        found = {}
        for inode in wanted:
            holder = self._still_held(inode)
            if holder is not None:
                found[inode] = holder
        missing = set(wanted) - set(found)
        found.update(self._holders(missing) if missing else {})
        for inode, records in wanted.items():
            holder = found.get(inode)
            for record in records:
                if holder is None:
                    record["note"] = NOT_SEEN
                else:
                    record.update(holder, attributed=True)
        for record, _client, _server, pidfd, via_pid, via_pidfd in jobs:
            if record["pid"] is not None and not record["attributed"] and "note" not in record:
                self._attribute_pid(record, pidfd)
            if via_pid is not None:
                record["via"] = self._describe_pid(via_pid, via_pidfd)
            if not record["attributed"] and "note" not in record:
                record["note"] = NO_PID  # a control-plane client whose pid SO_PEERCRED could not give
            _close(pidfd, via_pidfd)
        with self._lock:
            for record, *_rest in jobs:
                self._sequence += 1
                record["seq"] = self._sequence
                self._records.append(record)
                self._last[record["profile"]] = record
        self._write([record for record, *_rest in jobs])

    def _attribute_pid(self, record, pidfd):
        described = self._describe_pid(record["pid"], pidfd)
        if described.get("exe") is None and described.get("cmdline") is None:
            record["note"] = NOT_SEEN
            return
        record.update(exe=described["exe"], cmdline=described["cmdline"], attributed=True)
        if described.get("parent"):
            record["parent"] = described["parent"]

    def _describe_pid(self, pid, pidfd=None):
        """{pid, exe, cmdline, parent} of a process, read from /proc; exe and cmdline None when it is gone (or its
        pid now names another process: *pidfd* says whether the one of the request still lives)."""
        exe, cmdline, parent = self._exe(pid), self._cmdline(pid), self._parent(pid)
        if pidfd is not None and _exited(pidfd):
            exe = cmdline = parent = None
        described = {"pid": pid, "exe": exe, "cmdline": cmdline}
        if parent is not None and parent > 1:
            described["parent"] = {"pid": parent, "exe": self._exe(parent), "cmdline": self._cmdline(parent)}
        return described

    def _still_held(self, inode):
        """The holder found for *inode* before, if that descriptor of that process is still the socket: an SDK on a
        keep-alive connection asks again and again, and one readlink then spares a scan of every process."""
        known = self._known.get(inode)
        if known is None:
            return None
        pid, name, holder = known
        try:
            if os.readlink(f"{self._proc}/{pid}/fd/{name}") == f"socket:[{inode}]":
                self._known.move_to_end(inode)
                # Read again: the process may have run another program since (exec keeps descriptors).
                return dict(holder, exe=self._exe(pid), cmdline=self._cmdline(pid))
        except OSError:
            pass
        del self._known[inode]
        return None

    def _holders(self, inodes):
        """{inode: {pid, exe, cmdline}} for the processes that hold these sockets (newest pids first, bounded)."""
        targets = {f"socket:[{inode}]": inode for inode in inodes}
        own_uid = os.geteuid()
        found = {}
        try:
            pids = sorted((int(name) for name in os.listdir(self._proc) if name.isdigit()), reverse=True)
        except OSError:
            return found
        for pid in pids[:MAX_PROCESSES]:
            fd_dir = f"{self._proc}/{pid}/fd"
            try:
                if os.stat(f"{self._proc}/{pid}").st_uid != own_uid:
                    continue  # its descriptors cannot be read; not one of the owner's processes
                names = os.listdir(fd_dir)
            except OSError:
                continue
            for name in names[:MAX_FDS]:
                try:
                    link = os.readlink(f"{fd_dir}/{name}")
                except OSError:
                    continue
                inode = targets.get(link)
                if inode is None or inode in found:
                    continue
                exe, cmdline = self._exe(pid), self._cmdline(pid)
                try:  # still that process's socket after reading: exe and cmdline are its own, not a new pid's
                    still = os.readlink(f"{fd_dir}/{name}") == link
                except OSError:
                    still = False
                if still:
                    found[inode] = {"pid": pid, "exe": exe, "cmdline": cmdline}
                    self._known[inode] = (pid, name, found[inode])
                    while len(self._known) > MAX_KNOWN:
                        self._known.popitem(last=False)
            if len(found) == len(targets):
                break
        return found

    def _exe(self, pid):
        try:
            return os.readlink(f"{self._proc}/{pid}/exe")
        except OSError:
            return None

    def _cmdline(self, pid):
        try:
            with open(f"{self._proc}/{pid}/cmdline", "rb") as handle:
                raw = handle.read(MAX_CMDLINE * 4)
        except OSError:
            return None
        if not raw:
            return None
        text = " ".join(raw.rstrip(b"\0").decode("utf-8", "replace").split("\0"))
        # Printable only: a command line is the client's own text, and goes to a terminal.
        text = "".join(char if char.isprintable() else "?" for char in text)
        return text if len(text) <= MAX_CMDLINE else text[:MAX_CMDLINE - 1] + "…"

    def _parent(self, pid):
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as handle:
                raw = handle.read(4096)
        except OSError:
            return None
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so read after the last ')'.
        fields = raw[raw.rfind(b")") + 2:].split()
        try:
            return int(fields[1])
        except (IndexError, ValueError):
            return None

    # --- the file ---

    def _write(self, records):
        if self._file is None or not records:
            return
        try:
            self._file.write("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
            self._file.flush()
            if os.fstat(self._file.fileno()).st_size >= self._max_bytes:
                self._rotate()
        except OSError as error:
            log.warning("cannot write the delivery log %s: %s", self.path, error)

    def _rotate(self):
        """PATH becomes PATH.1 (PATH.1 becomes PATH.2, ...; the oldest goes), and a new PATH is opened."""
        self._file.close()
        self._file = None
        for number in range(self._backups - 1, 0, -1):
            try:
                os.replace(f"{self.path}.{number}", f"{self.path}.{number + 1}")
            except FileNotFoundError:
                pass
        os.replace(self.path, f"{self.path}.1")
        self._file = open_private(self.path)


def open_pidfd(pid):
    """A pidfd for *pid* (taken during a request, so that a recycled pid is never described), or None."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or already gone
        return None


def _exited(pidfd):
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _close(*fds):
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def socket_inode(client, server):
    """The inode of the TCP socket whose local end is *client* and remote end *server* ((ip, port) each), or None
    when there is none any more (closed: an orphan has inode 0) or sock_diag cannot be used here."""
    try:
        client_ip, server_ip = unmapped(str(client[0])), unmapped(str(server[0]))
        client_port, server_port = int(client[1]), int(server[1])
    except (ValueError, TypeError, IndexError):
        return None
    try:
        found = tcp_socket(client_ip, client_port, server_ip, server_port)
    except OSError:
        return None
    return (found[2] or None) if found else None  # an orphan socket has inode 0


def _ends(text):
    """(ip, port) of ``IP:PORT`` (``[V6]:PORT``), or None."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(unmapped(host.strip("[]"))), int(port)
    except ValueError:
        return None


def way_of(text):
    """The way a control-plane request names (``?way=``), or UNKNOWN_WAY for none or one this service does not know."""
    return text if text in WAYS else UNKNOWN_WAY
