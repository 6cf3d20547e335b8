"""The service process: sockets, the 169.254.169.254 alias, privilege drop, waitress, signals, logging.

Root is used for two acts only — adding the metadata address to ``lo`` and binding sockets — and is dropped
(capability bounding set, groups, gid, uid, checked; then no-new-privs) before any request is read. Root touches
no path the user controls: it runs from ``/`` with an environment that names no user file, and the run directory,
the control socket and the log are made after the drop, as the user (imsa/rundir.py).
"""

import errno
import ipaddress
import json
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

from imsa import rundir, sudo
from imsa.errors import ImsaError, ServiceError, UsageError
from imsa.server.peers import peer_credentials, peer_uids_visible, tcp_peer_uid

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "169.254.169.254:80"
# The addresses SDKs ask (IPv4 and the IPv6 one); the only ones root ever adds to lo.
METADATA_ADDRESSES = ("169.254.169.254", "fd00:ec2::254")
IMDS_THREADS = 8
CONTROL_THREADS = 2
# A client that sends nothing for this long is dropped; waitress buffers requests, so slow clients cost no thread.
CHANNEL_TIMEOUT = 30
# Slow clients (tests/test_attacks.py). waitress drops a connection only after CHANNEL_TIMEOUT of *silence*, so
# a byte now and then held a half-sent request open for good; and it counts the connections of every listener in
# the shared event loop against one limit (100), so ~100 such clients from any local process starved IMDS and
# the owner's control socket alike. Now a request must be whole REQUEST_DEADLINE seconds after its first byte
# (or after the connection opened, while nothing came); IMDS stops accepting at IMDS_CONNECTION_LIMIT, and the
# control socket's limit is OWNER_CONNECTIONS above that, so the owner can always get in to see and stop it.
REQUEST_DEADLINE = 10
IMDS_CONNECTION_LIMIT = 500
OWNER_CONNECTIONS = 64
# The IMDS listener's waitress settings in one place: scripts/bench.py runs its Flask baseline with the same ones.
# clear_untrusted_proxy_headers=False: waitress would otherwise delete X-Forwarded-For before the app can
# refuse a token PUT that carries it. No proxy is trusted (trusted_proxy unset), so REMOTE_ADDR stays the peer.
IMDS_SERVER_OPTIONS = dict(
    threads=IMDS_THREADS, ident="imsa", channel_timeout=CHANNEL_TIMEOUT, asyncore_use_poll=True,
    max_request_header_size=16384, max_request_body_size=65536, clear_untrusted_proxy_headers=False,
    connection_limit=IMDS_CONNECTION_LIMIT,
)
STOP_DELAY = 0.2
# Connections the kernel completes before the event loop accepts them. SDKs give IMDS one attempt of 1 s: a
# connection refused by a full queue is retried by the kernel only after 1 s, i.e. a failure. 256 SDK clients at
# once (a parallel build) must fit; the kernel caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024
# Connections accepted per wake-up of the event loop. waitress takes one, and every wake-up asks each open
# connection whether it is readable: a burst of N connections cost N² of those questions (256 SDK clients at once
# took twice as long as 64 did, four times over).
ACCEPT_BATCH = 64
# The shortest sleep of the event loop while a connection is open (serve_loop): a deadline that has just passed is
# acted on at the next look, and this bounds how often the loop looks meanwhile.
MIN_POLL_TIMEOUT = 0.05
# The systemd unit hands the listening socket over as fd 3 (socket activation).
SD_LISTEN_FDS_START = 3


def parse_listen(text):
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) into (host, port); the host must be an IP address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen needs an IP address, not {host!r}") from None
    # Any other address would offer the owner's credentials to the network (0.0.0.0, a LAN address), or make root
    # add an address that captures other users' traffic to it.
    if not address.is_loopback and str(address) not in METADATA_ADDRESSES:
        raise UsageError(
            f"--listen {host}: imsa listens only on a loopback address (127.0.0.1, ::1) or the metadata address "
            f"169.254.169.254 / [fd00:ec2::254]; any other address would serve other machines"
        )
    return str(address), int(port)


def endpoint_url(host, port):
    """The AWS_EC2_METADATA_SERVICE_ENDPOINT value for a listen address (trailing slash: AWS CLI v2 needs it)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


# --- the control socket ---


def _socket_answers(path):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_control_socket(path):
    """A listening Unix socket at *path*, 0600, in the user's own 0700 run directory (made here, after the drop);
    a stale socket is replaced, a live one refused."""
    rundir.make_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServiceError(f"{path} exists and is not a socket")
        if _socket_answers(path):
            raise ServiceError(f"imsa is already running (control socket {path}); stop it first: imsa stop")
        log.info("removing stale control socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _peer_cred_channel():
    """A waitress channel class that records SO_PEERCRED and puts it in every request's environ."""
    from waitress.channel import HTTPChannel
    from waitress.task import WSGITask

    class PeerCredTask(WSGITask):
        def get_environment(self):
            environ = super().get_environment()
            environ["imsa.peer_uid"] = self.channel.peer_uid
            environ["imsa.peer_pid"] = self.channel.peer_pid
            return environ

    class PeerCredChannel(HTTPChannel):
        task_class = PeerCredTask

        def __init__(self, server, sock, addr, adj, map=None):
            try:
                self.peer_pid, self.peer_uid, _ = peer_credentials(sock)
            except OSError:
                self.peer_pid, self.peer_uid = None, None
            super().__init__(server, sock, addr, adj, map)

    return PeerCredChannel


def _deadline_channel():
    """A waitress channel class that closes a connection whose request is not whole REQUEST_DEADLINE seconds after
    its first byte (or after the connection opened, while it sends nothing): slow clients cannot hold a slot."""
    from waitress.channel import HTTPChannel

    class DeadlineChannel(HTTPChannel):
        def __init__(self, server, sock, addr, adj, map=None):
            self.request_began = time.monotonic()
            super().__init__(server, sock, addr, adj, map)

        def received(self, data):
            if self.request is None and self.request_began is None:
                self.request_began = time.monotonic()
            done = super().received(data)
            if self.request is None:  # everything received so far made whole requests
                self.request_began = None
            return done

        def readable(self):
            # The event loop looks at every channel by this deadline while it is set (serve_loop), so this is the
            # clock.
            began = self.request_began
            if began is not None and not self.will_close and time.monotonic() - began > REQUEST_DEADLINE:
                log.debug("closing a connection from %s: no whole request within %d s", self.addr, REQUEST_DEADLINE)
                self.will_close = True
            return super().readable()

    return DeadlineChannel


def _imds_channel():
    """The IMDS listener's channel: the request deadline, and the uid owning the client's socket, looked up once
    per connection and put in every request's environ as ``imsa.peer_uid`` (imds refuses other users)."""
    from waitress.task import WSGITask

    class PeerUidTask(WSGITask):
        def get_environment(self):
            environ = super().get_environment()
            environ["imsa.peer_uid"] = self.channel.peer_uid
            return environ

    class ImdsChannel(_deadline_channel()):
        task_class = PeerUidTask

        def __init__(self, server, sock, addr, adj, map=None):
            try:
                self.peer_uid = tcp_peer_uid(sock)
            except Exception:  # an exception here would close the listener itself; an unknown uid is refused
                log.exception("cannot tell which user connected from %s", addr)
                self.peer_uid = None
            super().__init__(server, sock, addr, adj, map)

    return ImdsChannel


# --- the IMDS socket, the alias and privileges ---


def bind_tcp(host, port, device=None):
    """A listening TCP socket on host:port; with *device* (root only), it takes connections arriving there only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, port))
    except PermissionError:
        sock.close()
        raise ServiceError(
            f"cannot bind {host}:{port}: permission denied; run 'sudo imsa start' or use --listen 127.0.0.1:PORT"
        ) from None
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRNOTAVAIL:
            raise ServiceError(
                f"cannot bind {host}:{port}: the address is not on this machine (run 'sudo imsa start' to add it to lo)"
            ) from None
        if error.errno == errno.EADDRINUSE:
            raise ServiceError(f"cannot bind {host}:{port}: already in use (is imsa already running? see: imsa status)") from None
        raise ServiceError(f"cannot bind {host}:{port}: {error.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def inherited_socket():
    """The listening socket systemd passed (LISTEN_FDS), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock


def address_is_local(host):
    """True when *host* is already assigned to an interface in this network namespace."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((host, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def add_alias(host):
    """Add the metadata address *host* to lo as a /32 (/128) (root only); True when this call added it."""
    if host not in METADATA_ADDRESSES:
        raise AssertionError(f"root adds only the metadata address to lo, not {host}")
    if address_is_local(host):
        return False
    prefix = "128" if ":" in host else "32"
    done = subprocess.run(["ip", "address", "add", f"{host}/{prefix}", "dev", "lo"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ServiceError(f"cannot add {host}/{prefix} to lo: {done.stderr.strip()}")
    log.info("added %s/%s to lo", host, prefix)
    return True


def remove_alias(host):
    """Remove *host* from lo (needs root or CAP_NET_ADMIN); failures are logged, not raised."""
    prefix = "128" if ":" in host else "32"
    done = subprocess.run(["ip", "address", "del", f"{host}/{prefix}", "dev", "lo"], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("could not remove %s/%s from lo: %s", host, prefix, done.stderr.strip())
        return False
    log.info("removed %s/%s from lo", host, prefix)
    return True


def drop_privileges(uid, gid):
    """Become *uid*/*gid* for good and check nothing of root is left.

    In order: the capability bounding set is emptied (while root still may), supplementary groups are replaced by
    the user's, then gid and uid; finally no-new-privs, so no setuid program run later can regain anything.
    """
    clear_capability_bounding_set()
    user = pwd.getpwuid(uid).pw_name if _has_user(uid) else None
    try:
        sudo.become(uid, gid, user)
    except ImsaError as error:
        raise ServiceError(error.message) from None
    set_no_new_privs()
    os.environ["HOME"] = pwd.getpwuid(uid).pw_dir if user else "/"


# prctl(2) options (linux/prctl.h).
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


def _prctl(option, argument):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(argument), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def clear_capability_bounding_set():
    """Drop every capability from the bounding set (needs CAP_SETPCAP: as root, before the drop); else a no-op."""
    try:
        with open(CAP_LAST_CAP_FILE, "rb") as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        last = 40
    for capability in range(last + 1):
        try:
            _prctl(PR_CAPBSET_DROP, capability)
        except OSError as error:  # EPERM without CAP_SETPCAP; EINVAL past the kernel's last capability
            if error.errno == errno.EINVAL:
                break
            log.debug("could not clear the capability bounding set: %s", error)
            return False
    return True


def set_no_new_privs():
    """PR_SET_NO_NEW_PRIVS: neither this process nor anything it runs can gain privileges (setuid, file caps)."""
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as error:  # only on kernels older than 3.5
        log.warning("could not set no-new-privs: %s", error)


def writable_code():
    """Why the code this process runs could be someone else's than root's: for the interpreter, imsa itself and every
    import directory, the first place on its path another user can change (README, "Install")."""
    import imsa

    places = [sys.executable, os.path.dirname(os.path.abspath(imsa.__file__))]
    places += [entry for entry in sys.path if entry and os.path.isdir(entry)]
    reasons = []
    for place in places:
        found = rundir.changeable_by_others(place, (0,))
        if found is None:
            continue
        where, info = found
        reason = f"{where} belongs to uid {info.st_uid}" if info.st_uid != 0 else f"{where} is writable by other users"
        if reason not in reasons:
            reasons.append(reason)
    return reasons


def writable_code_warnings():
    """Why the code ``sudo imsa start`` runs as root could be someone else's: the interpreter, imsa itself and every
    import directory must be root's alone (README, "Install")."""
    return [f"imsa runs as root from code another user can change ({reason}); install it root-owned "
            f"(README, \"Install\")" for reason in writable_code()]


def sanitize_root_environment():
    """Before anything is imported or read as root: no path from the user's environment may be used.

    HOME becomes ``/`` (botocore fixes its model search path ``~/.aws/models`` at import), the AWS config and
    credentials files become /dev/null and AWS_DATA_PATH and profile selection go, so root reads no file of the
    user's. IMSA_*/XDG_* stay for the process after the drop, which is the user and uses them with the user's
    rights (imsa/rundir.py); root itself never reads them.
    """
    for name in ("AWS_DATA_PATH", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        os.environ.pop(name, None)
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ["HOME"] = "/"
    os.chdir("/")
    os.umask(0o077)


def _has_user(uid):
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def target_user(user=None):
    """(uid, gid) the service serves: --user NAME, else SUDO_UID/SUDO_GID, else the caller; never root."""
    if user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"no such user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    elif os.geteuid() == 0 and os.environ.get("SUDO_UID"):
        uid = int(os.environ["SUDO_UID"])
        gid = int(os.environ.get("SUDO_GID") or pwd.getpwuid(uid).pw_gid)
    else:
        uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        raise UsageError(
            "refusing to serve credentials as root; run 'sudo imsa start' from your own account or pass --user NAME"
        )
    return uid, gid


# --- running ---


def configure_logging(level=logging.INFO, path=None):
    """Log to stderr (the journal under systemd), or to *path*, rotated and 0600 (imsa.server.logs.configure); never a
    secret, and a timestamp on every line."""
    from imsa.server import logs

    logs.configure(level, path)


def parse_bindings_listen(text):
    """A ``--bindings-listen`` address: loopback, or ECS's 169.254.170.2 (where relative URIs go; port 80)."""
    from imsa.server.bound import ECS_ADDRESS

    host, sep, port = text.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise UsageError(f"--bindings-listen needs IP:PORT, not {text!r}") from None
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--bindings-listen must be IP:PORT, not {text!r}")
    if not address.is_loopback and str(address) != ECS_ADDRESS:
        raise UsageError(f"--bindings-listen {address}: only a loopback address or {ECS_ADDRESS} (for relative "
                         "URIs), never an address other machines reach")
    return str(address), int(port)


def state_directory(uid, given=None):
    """Where the service keeps what outlives it (the bindings): *given*, else ~/.local/state/imsa of user *uid*."""
    if given:
        return os.path.abspath(given)
    return os.path.join(pwd.getpwuid(uid).pw_dir, ".local", "state", "imsa")


def run(listen=DEFAULT_LISTEN, allow_imdsv1=False, user=None, report_ready=False, keep_sessions=None,
        bindings_listen=(), state_dir=None, delivery_log=None):
    """Serve until SIGTERM/SIGINT or a control-plane stop; returns the exit status.

    With *report_ready* (``imsa start`` in the background), one READY_PREFIX line with the status goes to stdout
    once the service answers, and from then on stdout and stderr go to the log in the run directory.
    """
    host, port = parse_listen(listen)
    uid, gid = target_user(user)
    _no_core_dumps()
    is_root = os.geteuid() == 0
    if not is_root and os.geteuid() != uid:
        raise UsageError("only root can start the service for another user")
    if is_root:
        sanitize_root_environment()

    from imsa.server import control, deliveries, execs, imds, saved
    from imsa.server.store import Store

    tcp = inherited_socket()
    added_alias = False
    if tcp is not None:
        log.info("using the listening socket passed by systemd")
    else:
        metadata = host in METADATA_ADDRESSES
        if is_root and metadata:
            added_alias = add_alias(host)
        try:
            # On the metadata address, only connections arriving on lo: another host or a container routed here
            # cannot even fill the connection slots (the peer filter refuses them, but only once connected).
            tcp = bind_tcp(host, port, device="lo" if is_root and metadata else None)
        except ServiceError:
            if added_alias:
                remove_alias(host)
            raise
    host, port = tcp.getsockname()[:2]
    bound_sockets = []
    try:
        for address in bindings_listen or ():
            bound_host, bound_port = parse_bindings_listen(address)
            bound_sockets.append(bind_tcp(bound_host, bound_port,
                                          device="lo" if is_root and not ipaddress.ip_address(bound_host).is_loopback
                                          else None))
    except (ServiceError, UsageError):
        for sock in bound_sockets + [tcp]:
            sock.close()
        if added_alias:
            remove_alias(host)
        raise
    store = Store()
    info = {
        "pid": os.getpid,  # read at each status request: after the fork below it is the serving child's
        "listen": f"{host}:{port}",
        "endpoint": endpoint_url(host, port),
        "tokens_required": not allow_imdsv1,
        "alias_added": added_alias,
    }

    def stop_soon():
        threading.Timer(STOP_DELAY, os.kill, (os.getpid(), signal.SIGTERM)).start()

    # Other local users: on loopback every user of the machine is a peer; only the owner's processes and root's get
    # the owner's credentials. Where no uid can be looked up at all, the log says so.
    peer_uids = {uid, 0} if peer_uids_visible() else None
    if peer_uids is None:
        log.warning("neither sock_diag nor /proc/net/tcp is available: IMDS cannot tell local users apart and "
                    "serves any of them")
    # Who received which credentials (README, "Who used which role"); the file is opened after the drop, as the user.
    delivery_records = deliveries.DeliveryLog(os.path.abspath(delivery_log) if delivery_log else None)
    info["deliveries"] = delivery_records.status
    info["last_deliveries"] = delivery_records.last_per_profile
    imds_app = imds.create_app(store.served, host, port, require_token=not allow_imdsv1, peer_uids=peer_uids,
                               on_delivery=delivery_records.imds_hook(host, port))
    # How many IMDSv2 tokens are held (bounded by imds.MAX_TOKENS): read at each status request.
    info["imds_tokens"] = imds_app.config["imsa.tokens"].__len__
    bindings = execs.BindingTable(store)
    info["bindings"] = bindings.status
    service_bindings = bound_app = None
    if bound_sockets:
        from imsa.server import bound

        service_bindings = bound.ServiceBindings(store, os.path.join(state_directory(uid, state_dir), "bindings"))
        addresses = ["%s:%d" % sock.getsockname()[:2] for sock in bound_sockets]
        hosts = set(addresses) | {address.rsplit(":", 1)[0] for address in addresses if address.endswith(":80")}
        bound_app = bound.create_app(store, service_bindings, hosts)
        info["bindings_listen"] = addresses
        info["state_dir"] = state_directory(uid, state_dir)
        info["service_bindings"] = service_bindings.status
    control_app = control.create_app(store, uid, info, stop_soon, bindings=bindings,
                                     service_bindings=service_bindings, deliveries=delivery_records)
    waiter_channel = None
    try:
        from waitress import wasyncore
        from waitress.server import create_server

        from imsa import sources, sts

        # Everything is imported, the STS model loaded and each app run once while the files are surely readable:
        # after the drop, the served user may not be able to read the Python installation (e.g. under /root).
        sts.preload()
        sources.load_kinds()
        saved.preload()
        _warm_up(imds_app, control_app)
        if is_root:
            if added_alias:
                stays, waiter_channel = _stay_to_remove_alias(host, (tcp,), report_ready)
                if stays:
                    return 0
            drop_privileges(uid, gid)
        else:
            set_no_new_privs()
        if 0 in os.getresuid():
            raise ServiceError("refusing to serve as root")
    except BaseException:
        tcp.close()
        if added_alias and os.geteuid() == 0:
            remove_alias(host)
        raise

    # From here on this process is the user: the run directory, the control socket and the log are theirs.
    try:
        path = rundir.service_path(uid)
        unix = bind_control_socket(path)
    except (ServiceError, OSError) as error:
        tcp.close()
        message = error.message if isinstance(error, ServiceError) else (error.strerror or str(error))
        raise ServiceError(f"control socket {path}: {message}") from None
    info["control_socket"] = path
    # Sessions saved by the last run come back now, as the user (the store and the files are theirs).
    try:
        saver = saved.open_for_service(keep_sessions)
    except saved.SavedError as error:
        tcp.close()
        unix.close()
        _unlink(path)
        raise ServiceError(str(error)) from None
    restored = store.restore(saver) if saver is not None else None
    info["saved_sessions"] = saver.describe() if saver is not None else None
    log_path = None
    if report_ready:
        log_path = os.path.join(os.path.dirname(os.path.abspath(path)), rundir.LOG_NAME)
        try:
            log_fd = rundir.open_log(os.path.dirname(log_path))
        except OSError as error:
            tcp.close()
            unix.close()
            _unlink(path)
            raise ServiceError(f"cannot open the log {log_path}: {error.strerror} (a symlink there is never "
                               f"followed)") from None
        if waiter_channel is not None:  # the root waiter logs the alias' removal there too
            socket.send_fds(waiter_channel, [b"log"], [log_fd])
    if waiter_channel is not None:
        waiter_channel.close()
    info["log"] = log_path
    try:
        delivery_records.open_file()
    except OSError as error:
        tcp.close()
        unix.close()
        _unlink(path)
        raise ServiceError(f"cannot open the delivery log {delivery_log}: {error.strerror or error} (a symlink there "
                           f"is never followed)") from None

    shared_map = {}
    # Every server here counts the connections of all of them (one map); the owner's get room above IMDS's limit.
    common = dict(map=shared_map, ident="imsa", channel_timeout=CHANNEL_TIMEOUT, asyncore_use_poll=True,
                  connection_limit=IMDS_CONNECTION_LIMIT + OWNER_CONNECTIONS)
    imds_server = create_server(imds_app, sockets=[tcp], map=shared_map, **IMDS_SERVER_OPTIONS)
    imds_server.channel_class = _imds_channel()
    _accept_in_batches(imds_server)
    control_server = create_server(
        control_app, sockets=[unix], threads=CONTROL_THREADS, max_request_header_size=16384,
        max_request_body_size=1 << 20, **common,
    )
    control_server.channel_class = _peer_cred_channel()
    servers = [imds_server, control_server]
    if bound_sockets:
        from imsa.server.store import RoleSpec

        def spec_from(data):
            return RoleSpec.from_json(data)

        service_bindings.load(spec_from)  # as the user: the state directory is theirs
        bound_server = create_server(bound_app, sockets=bound_sockets, threads=CONTROL_THREADS, **common)
        bound_server.channel_class = _deadline_channel()
        servers.append(bound_server)

    def on_signal(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store.start()
    bindings.start()
    delivery_records.start()
    if restored is not None:
        threading.Thread(target=_serve_again, args=(store, restored), name="imsa-restore", daemon=True).start()
    if report_ready:
        _report_ready(info, log_fd)
        configure_logging(logging.getLogger().level, log_path)  # rotated, as the user: it is their directory
    log.info(
        "serving IMDS on %s:%d (tokens %s) for uid %d; control socket %s",
        host, port, "optional" if allow_imdsv1 else "required", uid, path,
    )
    try:
        serve_loop(shared_map)
    except SystemExit:
        pass
    finally:
        log.info("stopping")
        bindings.stop()
        delivery_records.stop()
        store.stop()
        for server in servers:
            server.task_dispatcher.shutdown(timeout=2)
            server.close()
        _unlink(path)
    return 0


def _accept_in_batches(server):
    """Make waitress *server* accept up to ACCEPT_BATCH waiting connections each time its socket is readable, as
    long as its connection_limit allows (waitress checks it only between wake-ups)."""
    accept_one = server.handle_accept

    def handle_accept():
        for _ in range(ACCEPT_BATCH):
            before = len(server._map)
            accept_one()
            # Nothing was waiting (or accept failed): done. At the limit: waitress stops accepting at its next look.
            if len(server._map) == before or len(server._map) >= server.adj.connection_limit:
                break

    server.handle_accept = handle_accept


def serve_loop(shared_map):
    """waitress's event loop over *shared_map*, but asleep while nothing can time out: waitress's own loop woke every
    second, all day. Events (a connection, a request, a finished answer) wake it as before; a signal (SIGTERM,
    SIGINT) still ends the wait."""
    from waitress import wasyncore

    while shared_map:
        wasyncore.poll2(poll_timeout(shared_map), shared_map)


def poll_timeout(shared_map):
    """How long the event loop may sleep: None with no connection open; else until the nearest deadline — a
    request's REQUEST_DEADLINE (_deadline_channel), or a server's next sweep of connections idle past
    channel_timeout (waitress does it when it next looks at the server after next_channel_cleanup)."""
    from waitress.channel import HTTPChannel

    wall, monotonic = time.time(), time.monotonic()
    waits, connections = [], False
    for entry in list(shared_map.values()):
        if isinstance(entry, HTTPChannel):
            connections = True
            began = getattr(entry, "request_began", None)
            if began is not None:
                waits.append(began + REQUEST_DEADLINE - monotonic)
        elif getattr(entry, "next_channel_cleanup", None) is not None:  # a waitress server (wall clock)
            waits.append(entry.next_channel_cleanup - wall)
    if not connections:
        return None
    return max(MIN_POLL_TIMEOUT, min(waits, default=MIN_POLL_TIMEOUT))


def _serve_again(store, spec):
    """Serve the profile that was active before the restart, from its restored session (no MFA)."""
    try:
        store.activate(spec)
    except Exception as error:  # STS unreachable now: the refresher is not watching it, imsa assume will
        log.warning("%s: not served again after the restart: %s", spec.profile, error)
    else:
        log.info("%s: served again from its saved session", spec.profile)


# The line `imsa start` waits for on the service's stdout: this prefix, then the status as JSON.
READY_PREFIX = "imsa-ready "


def _report_ready(info, log_fd):
    """Send stdout and stderr to the log for good, then tell the starting CLI (on the old stdout) that it answers.

    The switch comes first so that nothing is written to the CLI's pipe once it may have gone away. Log lines then
    go through the rotating handler; stdout and stderr keep only what bypasses logging (a thread's traceback).
    """
    status = {key: value() if callable(value) else value for key, value in info.items() if key != "bindings"}
    sys.stdout.flush()
    sys.stderr.flush()
    ready = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        os.write(ready, (READY_PREFIX + json.dumps(status) + "\n").encode())
    except OSError:  # the CLI gave up waiting; the service serves all the same
        pass
    finally:
        os.close(ready)


def _warm_up(*apps):
    """Import what the first requests would import lazily (codecs, werkzeug internals) by running each app once."""
    import encodings.ascii  # noqa: F401
    import encodings.latin_1  # noqa: F401
    import encodings.utf_16  # noqa: F401
    import encodings.utf_32  # noqa: F401

    failed = []
    # Each app refuses the warm-up request (no peer uid, a foreign Host): those refusals are not real, and a line
    # saying "another user's process" at every start would teach people to ignore the real ones. Nothing is
    # logged while they run (and the refusal limiters count nothing when nothing would be written).
    logging.disable(logging.WARNING)
    try:
        for app in apps:
            try:
                app.test_client().get("/", headers={"Host": "warm-up"})
            except Exception:  # a warm-up that fails costs nothing; the real request will say what is wrong
                failed.append((app.name, sys.exc_info()))
    finally:
        logging.disable(logging.NOTSET)
    for name, info in failed:
        log.debug("warm-up of %s failed", name, exc_info=info)


def _no_core_dumps():
    """A core dump of the service would hold live credentials: allow none."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as error:  # a seccomp filter may refuse; systemd's LimitCORE=0 covers that case
        log.debug("could not disable core dumps: %s", error)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _stay_to_remove_alias(host, sockets, detach=False):
    """Fork: the child drops root and serves; this root process only waits for it, then removes the alias.

    Returns (True, None) in the waiting parent once the alias is gone, (False, channel) in the child that goes on
    to serve. With *detach* the waiter lets go of the starting CLI's pipe at once and gets the log's descriptor,
    opened by the child as the user, over *channel*: root never opens a path in the user's run directory.
    """
    channel, waiter_end = socket.socketpair() if detach else (None, None)
    child = os.fork()
    if child == 0:
        if waiter_end is not None:
            waiter_end.close()
        return False, channel
    for sock in sockets:
        sock.close()
    if detach:
        channel.close()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if detach:
        try:
            _, fds, _, _ = socket.recv_fds(waiter_end, 16, 1)
        except OSError:
            fds = []
        waiter_end.close()
        if fds:
            os.dup2(fds[0], 2)
            os.close(fds[0])
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    remove_alias(host)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        raise SystemExit(os.WEXITSTATUS(status))
    return True, None
