"""The system-wide mode's serving loop: bindings only, on the listening sockets systemd hands over.

``imsa serve-system`` (imsa/commands/system.py) reads the root-owned system configuration directory, resolves
every binding's profile and hands this module what the service needs: the sessions (Roles Anywhere paths and
ARNs, or a credential_process command line — never a key) and the bindings (name, mode, token hash, role spec).
This module serves them with the bindings app of ``imsa bind`` (bound.py) and nothing else: no IMDS, no control
socket. It runs as the unit's own service user (``User=imsa``) and never as root; it opens no listening socket of
its own (socket activation: ``imsa-system.socket``).
"""

import logging
import os
import signal
import socket

from imsa.errors import ServiceError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 8
BINDING_THREADS = 4
CONNECTION_LIMIT = 100


def inherited_sockets(environ=None):
    """The listening TCP sockets systemd passed (LISTEN_FDS for this pid); ServiceError when there are none."""
    environ = os.environ if environ is None else environ
    count = environ.get("LISTEN_FDS", "")
    if environ.get("LISTEN_PID") != str(os.getpid()) or not count.isdigit() or not 1 <= int(count) <= MAX_LISTEN_FDS:
        raise ServiceError("serve-system takes its listening sockets from systemd (imsa-system.socket); none were "
                           "passed (LISTEN_FDS)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ServiceError(f"descriptor {fd} from systemd is not a TCP listening socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def hosts_of(sockets):
    """The Host header values the bindings app answers to: each ADDR:PORT, and ADDR alone on port 80."""
    addresses = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses, set(addresses) | {address.rsplit(":", 1)[0] for address in addresses if address.endswith(":80")}


def run(sockets, sessions, bindings):
    """Serve *bindings* (dicts of bound.ServiceBindings: name, mode, token_sha256, spec) from *sessions* (dicts:
    fingerprint, kind, material, settings, label) on *sockets* until SIGTERM; returns the exit status."""
    from waitress import wasyncore
    from waitress.server import create_server

    from imsa import sources, sts
    from imsa.server import bound, process
    from imsa.server.store import RoleSpec, Store

    if 0 in os.getresuid():
        raise ServiceError("refusing to serve as root: the system mode runs as its own user (User= in "
                           "imsa-system.service)")
    process._no_core_dumps()
    process.set_no_new_privs()
    sts.preload()
    sources.load_kinds()
    store = Store()
    for session in sessions:
        store.put_session(session["fingerprint"], session["material"], session["settings"], kind=session["kind"],
                          label=session["label"])
    table = bound.ServiceBindings(store, None)
    for binding in bindings:
        table.add(binding, RoleSpec.from_json, persist=False)
    addresses, hosts = hosts_of(sockets)
    app = bound.create_app(store, table, hosts)
    shared_map = {}
    server = create_server(app, sockets=sockets, threads=BINDING_THREADS, map=shared_map, ident="imsa",
                           channel_timeout=process.CHANNEL_TIMEOUT, asyncore_use_poll=True,
                           connection_limit=CONNECTION_LIMIT)
    server.channel_class = process._deadline_channel()

    def on_signal(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store.start()
    log.info("system mode: serving %d binding(s) on %s as uid %d", len(bindings), ", ".join(addresses), os.getuid())
    try:
        wasyncore.loop(timeout=1, map=shared_map, use_poll=True)
    except SystemExit:
        pass
    finally:
        log.info("stopping")
        store.stop()
        server.task_dispatcher.shutdown(timeout=2)
        server.close()
    return 0
