"""``imsa start``, ``imsa stop`` and ``imsa status``: the service's life, seen from the command line.

``imsa start`` runs the service (imsa.server.process) in a child, ``python -I -m imsa start --foreground``, and
returns once it reports ready; stop and status ask it over the control socket.
"""

import datetime
import json
import os
import sys
import time

from imsa.client import Client
from imsa.commands.common import (
    ENDPOINT_VARIABLE, Io, describe_left, endpoint_warnings, record_region, shadowing_warnings, shown_path,
)
from imsa.credentials import parse_time, utcnow
from imsa.errors import EXIT_ERROR, EXIT_OK, ServiceError, ServiceNotRunning

# The service's own words when its control socket is taken by a live service (process.bind_control_socket).
ALREADY_RUNNING = "imsa is already running"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.05
# imsa status warns when the IAM Identity Center sign-in the active role comes from ends within this: a new login
# needs a person, so it is said while there is time for one.
SSO_WARN_BEFORE = datetime.timedelta(hours=1)


def start(listen=None, allow_imdsv1=False, foreground=False, user=None, io=None, debug=False, report_ready=False,
          keep_sessions=None, bindings_listen=None, state_dir=None, delivery_log=None):
    """Start the service; in the background unless *foreground*, returning once it answers; with *delivery_log*,
    every credential delivery is also appended to that file (README, "Who used which role")."""
    import subprocess  # only here: status and export stay light

    from imsa.server import process

    io = io or Io()
    listen = listen or process.DEFAULT_LISTEN
    host, port = process.parse_listen(listen)
    if foreground:
        process.configure_logging()
        return process.run(listen=listen, allow_imdsv1=allow_imdsv1, user=user, report_ready=report_ready,
                           keep_sessions=keep_sessions, bindings_listen=bindings_listen or (),
                           state_dir=state_dir, delivery_log=delivery_log)
    process.target_user(user)  # a usage error (root without a user to serve) is said here, not by the child
    if os.geteuid() == 0:
        for warning in process.writable_code_warnings():
            io.say(f"imsa: warning: {warning}")
    else:
        # Root never connects to the user's socket (the child it starts finds a running service itself); the user
        # asks their own, verified, service, so that a new shell gets the export line again.
        client = Client()
        try:
            running = client.status()
        except ServiceNotRunning:
            record_region(client, None)  # left by a service that was killed: the next one serves nothing yet
        else:
            return _already_running(running, host, port, allow_imdsv1, io)
    # -I: the service imports nothing from the working directory, PYTHONPATH or the user's site-packages, and it
    # runs from / (as root that would be code of whoever can write there).
    argv = [sys.executable, "-I", "-m", "imsa"] + (["--debug"] if debug else [])
    argv += ["start", "--foreground", "--report-ready", "--listen", listen]
    if allow_imdsv1:
        argv.append("--allow-imdsv1")
    if user:
        argv += ["--user", user]
    if keep_sessions is not None:
        argv.append("--keep-sessions" if keep_sessions else "--no-keep-sessions")
    for address in bindings_listen or ():
        argv += ["--bindings-listen", address]
    if state_dir:
        argv += ["--state-dir", os.path.abspath(state_dir)]
    if delivery_log:
        argv += ["--delivery-log", os.path.abspath(delivery_log)]
    child = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
        start_new_session=True, close_fds=True,
    )
    status, output = _wait_ready(child, START_TIMEOUT)
    if status is None:
        if child.poll() is None:
            child.terminate()
            raise ServiceError(f"the service did not answer within {START_TIMEOUT:.0f} s: {_last_line(output)}")
        reason = _last_line(output)
        if ALREADY_RUNNING in reason:  # said by the child: as root, or for a service that started meanwhile
            again = "" if (host, port) == process.parse_listen(process.DEFAULT_LISTEN) or os.geteuid() != 0 else (
                f"; as yourself, without sudo, imsa start --listen {listen} prints its export line again")
            raise ServiceError(f"imsa is already running; imsa status shows where it listens, imsa stop stops "
                               f"it{again}")
        raise ServiceError(f"the service failed to start: {reason}")
    io.say(f"imsa: serving on {status['listen']} (pid {status['pid']}); log: {status['log']}")
    if (host, port) != process.parse_listen(process.DEFAULT_LISTEN):
        io.data(f"export {ENDPOINT_VARIABLE}={status['endpoint']}\n")
    return EXIT_OK


def _already_running(running, host, port, allow_imdsv1, io):
    """``imsa start`` while the user's service runs: fine if it serves as asked (the export line again), else 1."""
    from imsa.server import process

    where = process.parse_listen(running["listen"])
    tokens = "tokens optional" if not running.get("tokens_required") else "tokens required"
    if where[0] != host or port not in (0, where[1]) or running.get("tokens_required") == allow_imdsv1:
        raise ServiceError(
            f"imsa is already running on {running['listen']} ({tokens}, pid {running['pid']}), not as asked; "
            f"stop it first: imsa stop"
        )
    io.say(f"imsa: already running on {running['listen']} (pid {running['pid']}); log: {running.get('log')}")
    if where != process.parse_listen(process.DEFAULT_LISTEN):
        io.data(f"export {ENDPOINT_VARIABLE}={running['endpoint']}\n")
    return EXIT_OK


def _wait_ready(child, timeout):
    """Read the starting service's output until its ready line; (status dict, None) or (None, output lines)."""
    import selectors
    import subprocess

    from imsa.server.process import READY_PREFIX

    lines, pending = [], b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(max(deadline - time.monotonic(), 0)):
                continue
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for raw in whole:
                line = raw.decode("utf-8", "replace")
                if line.startswith(READY_PREFIX):
                    child.stdout.close()
                    return json.loads(line[len(READY_PREFIX):]), None
                lines.append(line)
    child.stdout.close()
    if pending:
        lines.append(pending.decode("utf-8", "replace"))
    try:
        child.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    return None, lines


def _last_line(lines):
    """The line of the service's output that says why it failed, without a second ``imsa: error:`` prefix."""
    lines = [line.strip() for line in lines or () if line.strip()]
    for line in reversed(lines):
        if line.startswith("imsa: error: "):
            return line[len("imsa: error: "):]
    for line in reversed(lines):
        if "error" in line.lower():
            # A log line: "TIME imsa[PID] LEVEL LOGGER: message"; the message is what the person needs.
            head, sep, message = line.partition(": ")
            return message if sep and " imsa[" in f" {head}" else line
    return lines[-1] if lines else "no output"


def stop(io=None, client=None):
    """Stop the service and wait until it is gone."""
    io = io or Io()
    client = client or Client()
    status = client.status()
    client.stop()
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            client.status()
        except ServiceNotRunning:
            record_region(client, None)
            io.say(f"imsa: stopped (pid {status['pid']})")
            return EXIT_OK
        time.sleep(POLL)
    raise ServiceError(f"the service (pid {status['pid']}) did not stop within {STOP_TIMEOUT:.0f} s")


def _secret_store():
    """The name of the secret store this user's keys go to (imsa/secrets.py; not probed), or why there is none."""
    from imsa import secrets

    return secrets.store_name()


def status(as_json=False, short=False, io=None, client=None):
    """Show what the service serves; exit 0 only while valid credentials are served."""
    io = io or Io()
    client = client or Client()
    if short:  # at every prompt: nothing but the one line (no warnings, no region file)
        from imsa.commands.prompt import short_status

        return short_status(io.out, client)
    data = client.status()
    active = data.get("active")
    record_region(client, active and active.get("region"))
    valid = bool(active and active.get("valid"))
    warnings = shadowing_warnings(listen=data.get("listen")) + endpoint_warnings(data)
    data["key_store"] = _secret_store()
    if as_json:
        data["warnings"] = warnings
        io.data(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        lines = [f"service:    pid {data.get('pid')} on {data.get('listen')} (tokens {'required' if data.get('tokens_required') else 'optional'})"]
        bindings = data.get("bindings") or []
        if bindings:
            running = ", ".join(sorted({binding["profile"] for binding in bindings}))
            lines.append(f"exec:       {len(bindings)} running: {running}")
        if active:
            expiration = parse_time(active["expiration"])
            origin = f" (from {shown_path(active['origin'])})" if active.get("origin") else ""
            lines.append(f"profile:    {active['profile']}{origin}")
            lines.append(f"role:       {active['role_arn'] or 'the session credentials'}")
            for hop in active.get("via") or ():
                lines.append(f"via:        {hop}")
            lines.append(f"key:        {active['access_key_id']}")
            lines.append(f"expires:    {active['expiration']} ({describe_left(expiration)})")
            if active.get("session_expiration"):
                session_end = parse_time(active["session_expiration"])
                source = f", from {active['source']}" if active.get("source") else ""
                lines.append(f"session:    {active['session_expiration']} ({describe_left(session_end)}{source})")
            else:
                lines.append("session:    expired")
            if active.get("last_error"):
                lines.append(f"last error: {active['last_error']}")
        else:
            lines.append("profile:    none (run: imsa assume PROFILE)")
        lines.append(f"keys:       {data['key_store']}")
        if data.get("saved_sessions"):
            lines.append(f"sessions:   saved in {data['saved_sessions']}")
        for held in data.get("sessions") or ():
            end = parse_time(held["expiration"])
            soon = ", ending soon" if held.get("ending") and held.get("valid") else ""
            lines.append(f"held:       {held.get('source') or held['fingerprint'][:8]}, until {held['expiration']} "
                         f"({describe_left(end)}{soon})")
        if data.get("last_deliveries"):
            from imsa.commands.log import receiver

            for name, record in sorted(data["last_deliveries"].items()):
                lines.append(f"delivered:  {name} by {record['way']} at {record['time']} to {receiver(record)}")
        io.data("\n".join(lines) + "\n")
        for warning in warnings:
            io.say(f"imsa: warning: {warning}")
        if active and not valid:
            io.say(f"imsa: the credentials of {active['profile']} have expired; run: imsa assume {active['profile']}")
        elif active and active.get("session_kind") == "sso" and active.get("session_expiration"):
            session_end = parse_time(active["session_expiration"])
            if session_end - utcnow() < SSO_WARN_BEFORE:
                io.say(f"imsa: warning: the IAM Identity Center sign-in behind {active['profile']} ends at "
                       f"{active['session_expiration']} ({describe_left(session_end)}); its roles stop then: sign in "
                       f"again now with imsa login {active['profile']}")
    return EXIT_OK if valid else EXIT_ERROR
