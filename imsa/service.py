"""The service process: sockets, the 169.254.169.254 alias, privilege drop, waitress, signals, logging.

Root is used for two acts only — adding the address to ``lo`` and binding port 80 — and is dropped (groups, gid,
uid, checked) before any request is read.
"""

import errno
import ipaddress
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

from imsa import config
from imsa.peers import peer_credentials, peer_uids_visible, tcp_peer_uid
from imsa.errors import ServiceError, UsageError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "169.254.169.254:80"
IMDS_THREADS = 8
CONTROL_THREADS = 2
EXEC_THREADS = 4
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
# The systemd unit hands the listening socket over as fd 3 (socket activation).
SD_LISTEN_FDS_START = 3


def parse_listen(text):
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) into (host, port); the host must be an IP address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen needs an IP address, not {host!r}") from None
    return host, int(port)


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


def prepare_socket_dir(directory, uid, gid):
    """Create the socket's directory 0700 for *uid*, or check that an existing one is safe to use."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=False)
        if os.geteuid() == 0:
            os.chown(directory, uid, gid)
        return
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise ServiceError(f"{directory} exists and is not a directory")
    if info.st_uid != uid:
        raise ServiceError(f"{directory} belongs to uid {info.st_uid}, not {uid}; refusing to put the control socket there")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)


def bind_control_socket(path, uid, gid):
    """A listening Unix socket at *path*, 0600, owned by *uid*; a stale socket is replaced, a live one refused."""
    prepare_socket_dir(os.path.dirname(path) or ".", uid, gid)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServiceError(f"{path} exists and is not a socket")
        if _socket_answers(path):
            raise ServiceError(f"imsa is already running (control socket {path})")
        log.info("removing stale control socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
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
            # The event loop asks every channel at least once a second (its poll timeout), so this is the clock.
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


def bind_tcp(host, port):
    """A listening TCP socket on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
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
            raise ServiceError(f"cannot bind {host}:{port}: already in use") from None
        raise ServiceError(f"cannot bind {host}:{port}: {error.strerror}") from None
    sock.listen(128)
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
    """Add *host*/32 to lo (root only); True when this call added it."""
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
    """Become *uid*/*gid* for good (groups, gid, uid, in that order) and check nothing of root is left."""
    user = pwd.getpwuid(uid).pw_name if _has_user(uid) else None
    if user:
        os.initgroups(user, gid)
    else:
        os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if 0 in os.getresuid() or (gid != 0 and 0 in os.getresgid()):
        raise ServiceError("failed to drop root privileges")
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass
    else:
        raise ServiceError("root privileges could be regained after dropping them")
    os.environ["HOME"] = pwd.getpwuid(uid).pw_dir if user else os.environ.get("HOME", "/")


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
    """Log to stderr (the journal under systemd), or to *path*, rotated and 0600 (imsa.logs.configure); never a
    secret, and a timestamp on every line."""
    from imsa import logs

    logs.configure(level, path)


def run(listen=DEFAULT_LISTEN, allow_imdsv1=False, user=None):
    """Serve until SIGTERM/SIGINT or a control-plane stop; returns the exit status."""
    from imsa import container, control, imds
    from imsa.store import Store

    host, port = parse_listen(listen)
    uid, gid = target_user(user)
    _no_core_dumps()
    is_root = os.geteuid() == 0
    if not is_root and os.geteuid() != uid:
        raise UsageError("only root can start the service for another user")
    tcp = inherited_socket()
    added_alias = False
    if tcp is not None:
        log.info("using the listening socket passed by systemd")
    else:
        if is_root and not ipaddress.ip_address(host).is_loopback:
            added_alias = add_alias(host)
        try:
            tcp = bind_tcp(host, port)
        except ServiceError:
            if added_alias:
                remove_alias(host)
            raise
    host, port = tcp.getsockname()[:2]
    path = config.service_socket_path(uid)
    try:
        unix = bind_control_socket(path, uid, gid)
    except (ServiceError, OSError) as error:
        tcp.close()
        if added_alias:
            remove_alias(host)
        raise ServiceError(f"control socket {path}: {error}") from None
    try:
        # The container-credentials listener of `imsa exec`: 127.0.0.1 on an ephemeral port, bound with the others.
        exec_tcp = bind_tcp(container.EXEC_HOST, 0)
    except ServiceError:
        tcp.close()
        unix.close()
        _unlink(path)
        if added_alias:
            remove_alias(host)
        raise
    exec_port = exec_tcp.getsockname()[1]
    store = Store()
    info = {
        "pid": os.getpid,  # read at each status request: after the fork below it is the serving child's
        "listen": f"{host}:{port}",
        "endpoint": endpoint_url(host, port),
        "tokens_required": not allow_imdsv1,
        "alias_added": added_alias,
        "control_socket": path,
        "exec_endpoint": container.endpoint_url(exec_port),
    }

    def stop_soon():
        threading.Timer(STOP_DELAY, os.kill, (os.getpid(), signal.SIGTERM)).start()

    # Other local users: on loopback every user of the machine is a peer; only the owner's processes and root's get
    # the owner's credentials. Where no uid can be looked up at all, the log says so.
    peer_uids = {uid, 0} if peer_uids_visible() else None
    if peer_uids is None:
        log.warning("neither sock_diag nor /proc/net/tcp is available: IMDS cannot tell local users apart and "
                    "serves any of them")
    imds_app = imds.create_app(store.served, host, port, require_token=not allow_imdsv1, peer_uids=peer_uids)
    # How many IMDSv2 tokens are held (bounded by imds.MAX_TOKENS): read at each status request.
    info["imds_tokens"] = imds_app.config["imsa.tokens"].__len__
    bindings = container.BindingTable(store)
    info["bindings"] = bindings.status
    control_app = control.create_app(store, uid, info, stop_soon, bindings=bindings)
    exec_app = container.create_app(bindings, store.cached, exec_port)
    try:
        from waitress import wasyncore
        from waitress.server import create_server

        from imsa import sts

        # Everything is imported, the STS model loaded and each app run once while the files are surely readable:
        # after the drop, the served user may not be able to read the Python installation (e.g. under /root).
        sts.preload()
        _warm_up(imds_app, control_app, exec_app)
        if is_root:
            if added_alias and _stay_to_remove_alias(host, (tcp, unix, exec_tcp)):
                return 0
            drop_privileges(uid, gid)
        if 0 in os.getresuid():
            raise ServiceError("refusing to serve as root")
    except BaseException:
        tcp.close()
        unix.close()
        exec_tcp.close()
        _unlink(path)
        if added_alias and os.geteuid() == 0:
            remove_alias(host)
        raise

    shared_map = {}
    # Every server here counts the connections of all of them (one map); the owner's get room above IMDS's limit.
    common = dict(map=shared_map, ident="imsa", channel_timeout=CHANNEL_TIMEOUT, asyncore_use_poll=True,
                  connection_limit=IMDS_CONNECTION_LIMIT + OWNER_CONNECTIONS)
    imds_server = create_server(imds_app, sockets=[tcp], map=shared_map, **IMDS_SERVER_OPTIONS)
    imds_server.channel_class = _imds_channel()
    control_server = create_server(
        control_app, sockets=[unix], threads=CONTROL_THREADS, max_request_header_size=16384,
        max_request_body_size=1 << 20, **common,
    )
    control_server.channel_class = _peer_cred_channel()
    # Any local process can reach the exec endpoint, as it can IMDS: the same deadline and connection limit, so a
    # flood there cannot take the owner's control socket down either.
    exec_server = create_server(
        exec_app, sockets=[exec_tcp], threads=EXEC_THREADS, max_request_header_size=16384,
        max_request_body_size=65536, **dict(common, connection_limit=IMDS_CONNECTION_LIMIT),
    )
    exec_server.channel_class = _deadline_channel()

    def on_signal(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store.start()
    bindings.start()
    log.info(
        "serving IMDS on %s:%d (tokens %s) for uid %d; control socket %s; exec endpoint %s",
        host, port, "optional" if allow_imdsv1 else "required", uid, path, info["exec_endpoint"],
    )
    try:
        wasyncore.loop(timeout=1, map=shared_map, use_poll=True)
    except SystemExit:
        pass
    finally:
        log.info("stopping")
        bindings.stop()
        store.stop()
        for server in (imds_server, control_server, exec_server):
            server.task_dispatcher.shutdown(timeout=2)
            server.close()
        _unlink(path)
        if added_alias and os.geteuid() == 0:
            remove_alias(host)
    return 0


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


def _stay_to_remove_alias(host, sockets):
    """Fork: the child drops root and serves; this root process only waits for it, then removes the alias.

    Returns True in the waiting parent (after the alias is gone), False in the child that goes on to serve.
    """
    child = os.fork()
    if child == 0:
        return False
    for sock in sockets:
        sock.close()

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
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
    return True
