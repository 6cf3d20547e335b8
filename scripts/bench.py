#!/usr/bin/env python3
"""How fast imsa serves, switches and starts, as ratios against baselines measured in the same run.

    scripts/bench.py [--quick] [--json]      (≤ 5 min; --quick ≤ 1 min; the first run builds a venv: ≤ 1 min more)

It starts moto's server as STS, the imsa service on 127.0.0.1 (its own process, as ``imsa start --foreground``),
assumes a profile, and starts two baselines on other loopback ports that answer the same three IMDSv2 requests
with a fixed body: (a) a minimal asyncio server — the limit for Python; (b) a bare Flask app on waitress with the
service's own waitress settings — the cost of our stack. Then it measures (README, "Performance"):

1. the IMDSv2 credential sequence (PUT token, GET role list, GET credentials) at concurrency 1 and 8, with
   keep-alive and with a new connection per request, from load processes shared by all three servers; and bursts
   of 64 and 256 clients released at one instant, each the sequence on new connections with the SDKs' 1 s
   time-out, spread over the same processes;
2. ``boto3.Session().get_credentials()`` through IMDS (and botocore's fetcher alone);
3. the wall time of ``imsa status``, ``imsa status --short``, ``imsa export P``, ``imsa credential-process P``, the
   completion of ``imsa assume <TAB>`` and ``imsa shell-init bash``, next to ``python -c pass`` of the same venv:
   from a regular install of the working tree into a venv of its own (built here, reused while it is up to date),
   and, labelled, from .venv's editable install;
4. ``imsa assume P2`` with the MFA session cached (one AssumeRole against the local STS);
5. the service's RSS after 10 000 sequences, its CPU time and its wake-ups while idle.

The machine is shared and noisy, so servers take turns within each measurement and every figure that has a
baseline is shown as a ratio to it. Everything listens on 127.0.0.1; every process started here is stopped by
its PID. Nothing is asserted about time: the table says which targets are met.
"""

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
TOKEN_TTL = "21600"  # what botocore asks for
NAMES = {"imsa": "imsa", "stdlib": "(a) stdlib", "flask": "(b) flask"}
REQUEST_TIMEOUT = 5.0
MAX_SEQUENCES_PER_WORKER = 1_000_000
# Load workers wait for a common start this far ahead, so that all of them begin together.
START_AHEAD = 0.05


class Plan:
    """How much of each measurement a run makes: the default (≤ 5 min) or --quick (≤ 1 min)."""

    def __init__(self, quick):
        self.quick = quick
        self.cell_seconds = 0.3 if quick else 4.0  # per server, per (concurrency, connection) cell
        self.rounds = 1 if quick else 8  # servers take turns this many times per cell
        self.warmup_seconds = 0.15 if quick else 0.5
        self.rss_sequences = 1_000 if quick else 10_000
        self.rss_seconds = 3 if quick else 40  # bound on the top-up to rss_sequences
        self.client_runs = 4 if quick else 25  # boto3 / botocore fetches per server
        self.cli_runs = 4 if quick else 15  # runs of each CLI command
        self.assume_runs = 2 if quick else 10
        self.idle_seconds = 10 if quick else 60
        self.burst_rounds = 1 if quick else 5
        # Past this (and a minute more) the run stops; building the regular install counts in it.
        self.time_limit = 90 if quick else 300


# --- the load generator: raw HTTP/1.1 over sockets, in worker processes ---


def _read_response(sock, buffer):
    """(status, head, body, rest) of one response with a Content-Length; *buffer* holds bytes already read."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the response body")
        rest += chunk
    return status, head, rest[:length], rest[length:]


class _Client:
    """One load-generating client: keeps its connection, or opens a new one per request as botocore does."""

    def __init__(self, port, keepalive, timeout=REQUEST_TIMEOUT):
        self.port = port
        self.keepalive = keepalive
        self.timeout = timeout
        self.sock = None
        self.buffer = b""
        self.host = f"127.0.0.1:{port}".encode()

    def _connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # urllib3 sets it too
        return sock

    def close(self):
        """Drop the connection, if any."""
        if self.sock is not None:
            self.sock.close()
            self.sock, self.buffer = None, b""

    def request(self, method, path, headers):
        """(status, head, body) of one request with exactly *headers* (besides Host and Content-Length)."""
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + self.host, b"User-Agent: imsa-bench",
                 b"Accept-Encoding: identity"]
        lines.extend(headers)
        if method == b"PUT":
            lines.append(b"Content-Length: 0")
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        if self.sock is None:
            self.sock = self._connect()
        try:
            self.sock.sendall(data)
            status, head, body, self.buffer = _read_response(self.sock, self.buffer)
        except Exception:
            self.close()
            raise
        if not self.keepalive or b"connection: close" in head.lower():
            self.close()
        return status, head, body

    def sequence(self, deadline=None):
        """PUT token, GET role list, GET credentials; raises unless all three answer as IMDS does (and, with
        *deadline* seconds, each within it: an SDK's time-out per request)."""
        status, head, token = self._timed_request(deadline, b"PUT", b"/latest/api/token", [TTL_HEADER.encode() + b": " + TOKEN_TTL.encode()])
        if status != 200 or TTL_HEADER.lower().encode() not in head.lower() or not token:
            raise ValueError(f"token PUT answered {status}")
        auth = [TOKEN_HEADER.encode() + b": " + token]
        status, _, role = self._timed_request(deadline, b"GET", CREDENTIALS_PATH.encode(), auth)
        if status != 200 or not role or b"\n" in role:
            raise ValueError(f"role list answered {status}")
        status, _, body = self._timed_request(deadline, b"GET", CREDENTIALS_PATH.encode() + role, auth)
        if status != 200 or not body.startswith(b"{") or b'"Success"' not in body:
            raise ValueError(f"credentials answered {status}")


    def _timed_request(self, deadline, *args):
        began = time.monotonic()
        answer = self.request(*args)
        if deadline is not None and time.monotonic() - began > deadline:
            raise TimeoutError(f"a request took over {deadline:g} s")
        return answer


def load_worker(task):
    """Run IMDSv2 sequences from task['start'] until task['end'] (or task['limit'] of them): count, errors, latencies."""
    client = _Client(task["port"], task["keepalive"])
    latencies, errors, first_error = [], 0, None
    late = time.monotonic() - task["start"]
    while time.monotonic() < task["start"]:
        time.sleep(0.001)
    try:
        while len(latencies) < task["limit"]:
            began = time.perf_counter()
            if time.monotonic() >= task["end"]:
                break
            try:
                client.sequence()
            except Exception as error:  # counted and shown, never fatal: the row says how many failed
                errors += 1
                first_error = first_error or f"{type(error).__name__}: {error}"
                client.close()
                time.sleep(0.01)
                continue
            if time.monotonic() <= task["end"]:
                latencies.append(time.perf_counter() - began)
    finally:
        client.close()
    return {"latencies": latencies, "errors": errors, "first_error": first_error, "late": max(0.0, late)}


# Bursts: N SDK clients at one instant (a parallel build, xargs -P), each the IMDSv2 sequence on new connections
# with the SDKs' 1 s time-out per request and one attempt.
BURST_SIZES = (64, 256)
BURST_TIMEOUT = 1.0
# Workers start their client threads this long before the common release instant, so all are ready when it comes.
BURST_LEAD = 0.5


def burst_worker(task):
    """task['clients'] threads, released together at task['release'] (CLOCK_MONOTONIC, shared by every process):
    each runs one sequence on new connections; [(seconds from the release, error or None)], and how late it was."""
    import threading

    results = []
    lock = threading.Lock()

    def client():
        delay = task["release"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            _Client(task["port"], keepalive=False, timeout=BURST_TIMEOUT).sequence(deadline=BURST_TIMEOUT)
            error = None
        except Exception as failure:  # counted and shown: the row says how many failed
            error = f"{type(failure).__name__}: {failure}"
        spent = time.monotonic() - task["release"]
        with lock:
            results.append((spent, error))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(task["clients"])]
    for thread in threads:
        thread.start()
    late = max(0.0, time.monotonic() - task["release"])
    for thread in threads:
        thread.join(BURST_LEAD + 4 * BURST_TIMEOUT + 5)
    return {"results": results, "late": late}


class Load:
    """A pool of load processes (forked once) shared by every server, so all are measured by the same clients."""

    def __init__(self, processes=8):
        self.pool = multiprocessing.get_context("fork").Pool(processes)
        self.processes = processes
        self.served = {}  # sequences each server has answered in this run
        self.latest_start = 0.0  # how late the slowest worker began, over the run (should be ~0)

    def run(self, name, port, concurrency, keepalive, seconds, limit=MAX_SEQUENCES_PER_WORKER, pid=None):
        """Sequences at *concurrency* for *seconds* (at most *limit* per worker); merged results.

        With *pid*, also the CPU time that process used meanwhile: what the server spent, whatever the noise.
        """
        start = time.monotonic() + START_AHEAD
        task = {"port": port, "keepalive": keepalive, "start": start, "end": start + seconds, "limit": limit}
        cpu_before = cpu_seconds(pid)[0] if pid else None
        results = self.pool.map(load_worker, [task] * concurrency, chunksize=1)
        cpu = cpu_seconds(pid)[0] - cpu_before if pid else None
        latencies = [value for result in results for value in result["latencies"]]
        errors = sum(result["errors"] for result in results)
        first_error = next((result["first_error"] for result in results if result["first_error"]), None)
        self.served[name] = self.served.get(name, 0) + len(latencies)
        self.latest_start = max(self.latest_start, max(result["late"] for result in results))
        return {"count": len(latencies), "seconds": seconds, "latencies": latencies, "errors": errors,
                "first_error": first_error, "cpu": cpu}

    def burst(self, port, size):
        """*size* clients released at one instant, spread over the load processes: latencies, failures, first error."""
        release = time.monotonic() + BURST_LEAD
        shares = [size // self.processes + (1 if index < size % self.processes else 0) for index in range(self.processes)]
        tasks = [{"port": port, "clients": share, "release": release} for share in shares if share]
        answers = self.pool.map(burst_worker, tasks, chunksize=1)
        results = [result for answer in answers for result in answer["results"]]
        failures = [error for _, error in results if error] + ["no answer"] * (size - len(results))
        self.latest_start = max(self.latest_start, max(answer["late"] for answer in answers))
        return {"latencies": [spent for spent, error in results if not error], "failures": len(failures),
                "first_error": failures[0] if failures else None}

    def close(self):
        """Stop the load processes: each finishes (every task has returned by now) and exits.

        Not Pool.terminate(): its worker handler can fork a replacement worker while it terminates, and that orphan
        kept the caller's stdout open (tests/test_bench.py then waited for it until its time-out).
        """
        self.pool.close()
        self.pool.join()


def percentile(values, fraction):
    """Nearest-rank percentile of *values* (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]


# --- the baselines (run as `bench.py --serve stdlib|flask BODYFILE`) ---


def _fixed_answers(body_file):
    with open(body_file, encoding="utf-8") as handle:
        fixed = json.load(handle)
    return fixed["token"].encode(), fixed["role"].encode(), fixed["credentials"].encode()


def process_backlog():
    """The service's listen backlog (imsa.server.process.LISTEN_BACKLOG), for the baselines too."""
    from imsa.server import process

    return process.LISTEN_BACKLOG


def serve_stdlib(body_file):
    """Baseline (a): the same three answers from a minimal asyncio server — the limit for Python."""
    token, role, credentials = _fixed_answers(body_file)
    list_paths = {CREDENTIALS_PATH.encode(), CREDENTIALS_PATH.rstrip("/").encode()}
    role_path = CREDENTIALS_PATH.encode() + role
    ttl_name = TTL_HEADER.lower().encode()

    def answer(status, body, extra=b""):
        return (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)

    class Imds(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""

        def data_received(self, data):
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buffer[:end].split(b"\r\n")
                method, path = lines[0].split(b" ", 2)[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0"))
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                if method == b"PUT" and path == b"/latest/api/token":
                    ttl = headers.get(ttl_name, b"")
                    reply = answer(b"200 OK", token, TTL_HEADER.encode() + b": " + ttl + b"\r\n")
                elif method == b"GET" and path in list_paths:
                    reply = answer(b"200 OK", role)
                elif method == b"GET" and path == role_path:
                    reply = answer(b"200 OK", credentials)
                else:
                    reply = answer(b"404 Not Found", b"Not Found\n")
                self.transport.write(reply)
                if headers.get(b"connection", b"").lower() == b"close":
                    self.transport.close()
                    return

    async def main():
        server = await asyncio.get_running_loop().create_server(Imds, "127.0.0.1", 0, backlog=process_backlog())
        print(json.dumps({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()}), flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


def serve_flask(body_file):
    """Baseline (b): the same three answers from a bare Flask app on waitress, with the service's settings."""
    from flask import Flask, Response, request
    from waitress.server import create_server

    from imsa.server import process

    token, role, credentials = _fixed_answers(body_file)
    app = Flask("bench")

    @app.route("/latest/api/token", methods=["PUT"])
    def put_token():
        return Response(token, mimetype="text/plain", headers={TTL_HEADER: request.headers.get(TTL_HEADER, "")})

    @app.route(CREDENTIALS_PATH)
    @app.route(CREDENTIALS_PATH.rstrip("/"))
    def role_list():
        return Response(role, mimetype="text/plain")

    @app.route(CREDENTIALS_PATH + "<name>")
    def role_credentials(name):
        if name.encode() != role:
            return Response("Not Found\n", status=404, mimetype="text/plain")
        return Response(credentials, mimetype="text/plain")

    sock = process.bind_tcp("127.0.0.1", 0)
    server = create_server(app, sockets=[sock], **process.IMDS_SERVER_OPTIONS)
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)

    def on_signal(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    finally:
        server.close()


# --- processes started here, each stopped by its PID ---


class Processes:
    """Every process this run starts; stop_all() ends them by PID (TERM, then KILL)."""

    def __init__(self):
        self.started = []

    def add(self, process):
        """Remember *process* (a Popen) so that it is stopped at the end."""
        self.started.append(process)
        return process

    def stop_all(self):
        """TERM every live process, wait, KILL what is left."""
        for process in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()


def start_baseline(kind, body_file, processes, log):
    """Start baseline *kind* in its own process; its port and pid."""
    argv = [sys.executable, os.path.abspath(__file__), "--serve", kind, body_file]
    process = processes.add(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                             text=True, cwd=ROOT))
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"baseline {kind} did not start (see {log.name})")
    info = json.loads(line)
    return info["port"], process.pid


# --- /proc ---


def rss_mb(pid):
    """Resident set size of *pid* in MB (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pid):
    """(CPU seconds, times scheduled) of every thread of *pid*: schedstat (ns) where the kernel has it, else stat."""
    total_ns, slices = 0, 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as handle:
                run_ns, _wait_ns, count = handle.read().split()
            total_ns += int(run_ns)
            slices += int(count)
        return total_ns / 1e9, slices
    except (OSError, ValueError):
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), None


# --- the measurements ---


def measure_sequences(load, ports, pids, plan, rows, log):
    """Rows 1: sequences/s, server CPU per sequence and p50/p99 per server at concurrency 1 and 8, keep-alive
    and new connections.

    The servers take turns in short slices (plan.rounds per cell, the first server changing each round), and a
    ratio is the median of the per-round ratios: a burst of load from elsewhere on the machine lands in one
    round and moves the median little.
    """
    for name, port in ports.items():
        load.run(name, port, 8, True, plan.warmup_seconds)
    for concurrency in (1, 8):
        for keepalive in (True, False):
            merged = {name: {"count": 0, "seconds": 0.0, "latencies": [], "errors": 0, "first_error": None,
                             "cpu": 0.0, "rounds": []} for name in ports}
            order = list(ports)
            for turn in range(plan.rounds):
                for name in order[turn % len(order):] + order[:turn % len(order)]:
                    cell = merged[name]
                    got = load.run(name, ports[name], concurrency, keepalive, plan.cell_seconds / plan.rounds,
                                   pid=pids[name])
                    cell["rounds"].append((got["count"], got["cpu"]))
                    cell["cpu"] += got["cpu"]
                    cell["count"] += got["count"]
                    cell["seconds"] += got["seconds"]
                    cell["latencies"] += got["latencies"]
                    cell["errors"] += got["errors"]
                    cell["first_error"] = cell["first_error"] or got["first_error"]
            conn = "keepalive" if keepalive else "newconn"
            shown = "keep-alive" if keepalive else "new connections"
            rate = {name: cell["count"] / cell["seconds"] for name, cell in merged.items()}
            cpu = {name: cell["cpu"] / cell["count"] * 1e6 if cell["count"] else None for name, cell in merged.items()}
            p50 = {name: _ms(percentile(cell["latencies"], 0.50)) for name, cell in merged.items()}
            p99 = {name: _ms(percentile(cell["latencies"], 0.99)) for name, cell in merged.items()}
            errors = {name: cell["errors"] for name, cell in merged.items() if cell["errors"]}
            for name, cell in merged.items():
                if cell["errors"]:
                    log(f"{name} c{concurrency} {conn}: {cell['errors']} failed sequences, first: {cell['first_error']}")
            rate_ratios, cpu_ratios = _round_ratios(merged["imsa"]["rounds"], merged["flask"]["rounds"])
            rows.append(row(
                f"seq_c{concurrency}_{conn}", f"sequence, c={concurrency}, {shown}", "seq/s", rate,
                ratio_to="flask", ratio=_median(rate_ratios), target=("min", 0.9),
                detail={"sequences": {name: cell["count"] for name, cell in merged.items()}, "errors": errors,
                        "round_ratios": [round(value, 3) for value in rate_ratios]},
            ))
            rows.append(row(f"cpu_c{concurrency}_{conn}", f"  server CPU per sequence, c={concurrency}, {shown}", "µs",
                            cpu, ratio_to="flask", ratio=_median(cpu_ratios),
                            detail={"round_ratios": [round(value, 3) for value in cpu_ratios]}))
            rows.append(row(f"p50_c{concurrency}_{conn}", f"  p50 latency, c={concurrency}, {shown}", "ms", p50,
                            ratio_to="flask"))
            p99_target = {"absolute": ("max", 25.0)} if (concurrency, keepalive) == (8, False) else {}
            rows.append(row(f"p99_c{concurrency}_{conn}", f"  p99 latency, c={concurrency}, {shown}", "ms", p99,
                            ratio_to="flask", **p99_target))


def measure_bursts(load, ports, plan, rows, log):
    """Rows: BURST_SIZES clients at one instant against each server, the servers taking turns each round: failures
    (any request over BURST_TIMEOUT, refused or wrong), p50 / p99 of all rounds, and the maximum (the median of
    each round's): a ratio to the asyncio floor (a), whose figures are mostly the client's own cost."""
    time.sleep(0.5)  # the connections of earlier rows are gone
    for size in BURST_SIZES:
        got = {name: {"latencies": [], "failures": 0, "maxima": [], "first_error": None} for name in ports}
        order = list(ports)
        for turn in range(plan.burst_rounds):
            for name in order[turn % len(order):] + order[:turn % len(order)]:
                answer = load.burst(ports[name], size)
                cell = got[name]
                cell["latencies"] += answer["latencies"]
                cell["failures"] += answer["failures"]
                cell["first_error"] = cell["first_error"] or answer["first_error"]
                cell["maxima"].append(max(answer["latencies"], default=BURST_TIMEOUT * 3))
                time.sleep(0.2)  # TIME_WAIT and the accept queue settle between bursts
        for name, cell in got.items():
            if cell["failures"]:
                log(f"{name} burst of {size}: {cell['failures']} failed, first: {cell['first_error']}")
        title = f"burst of {size} clients (x{plan.burst_rounds})"
        failures = {name: cell["failures"] for name, cell in got.items()}
        detail = {"clients": size, "rounds": plan.burst_rounds, "failures": failures,
                  "worst_max_ms": {name: _ms(max(cell["maxima"])) for name, cell in got.items()}}
        rows.append(row(f"burst_{size}_failures", f"{title}: failures", "count", failures, ratio_to="stdlib",
                        absolute=("max", 0), detail=detail))
        for fraction, key in ((0.50, "p50"), (0.99, "p99")):
            rows.append(row(f"burst_{size}_{key}", f"  {key}", "ms",
                            {name: _ms(percentile(cell["latencies"], fraction)) for name, cell in got.items()},
                            ratio_to="stdlib"))
        rows.append(row(f"burst_{size}_max", "  max (median of the rounds')", "ms",
                        {name: _ms(_median(cell["maxima"])) for name, cell in got.items()}, ratio_to="stdlib",
                        target=("max", 1.25), detail=detail))


def _round_ratios(ours, theirs):
    """Per round: (our sequences / theirs, our CPU per sequence / theirs), where both are defined."""
    rates, cpus = [], []
    for (count, cpu), (base_count, base_cpu) in zip(ours, theirs):
        if count and base_count:
            rates.append(count / base_count)
            if cpu is not None and base_cpu:
                cpus.append((cpu / count) / (base_cpu / base_count))
    return rates, cpus


def _ms(seconds):
    return None if seconds is None else seconds * 1000


def _fetch_clients(ports, expected, plan, log):
    """Median ms of boto3.Session().get_credentials() and of botocore's fetcher alone, per server (interleaved)."""
    import boto3
    from botocore.utils import InstanceMetadataFetcher

    timings = {name: {"boto3": [], "fetcher": []} for name in ports}
    failures = {name: 0 for name in ports}
    for _ in range(plan.client_runs):
        for name, port in ports.items():
            endpoint = f"http://127.0.0.1:{port}/"
            os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = endpoint
            began = time.perf_counter()
            creds = boto3.Session().get_credentials()
            spent = time.perf_counter() - began
            if creds is None or creds.method != "iam-role" or creds.access_key != expected[name]:
                failures[name] += 1
            else:
                timings[name]["boto3"].append(spent)
            fetcher = InstanceMetadataFetcher(timeout=1, num_attempts=1, env={}, config={
                "ec2_metadata_service_endpoint": endpoint.rstrip("/"), "ec2_metadata_v1_disabled": True,
            })
            began = time.perf_counter()
            fetched = fetcher.retrieve_iam_role_credentials()
            spent = time.perf_counter() - began
            if fetched.get("access_key") != expected[name]:
                failures[name] += 1
            else:
                timings[name]["fetcher"].append(spent)
    os.environ.pop("AWS_EC2_METADATA_SERVICE_ENDPOINT", None)
    for name, count in failures.items():
        if count:
            log(f"{name}: {count} client fetches failed")
    return timings, failures


def measure_clients(ports, expected, plan, rows, log):
    """Row 2: a real client through IMDS: boto3's whole chain with a new session each time, and the fetcher alone."""
    timings, failures = _fetch_clients(ports, expected, plan, log)
    boto = {name: _ms(_median(t["boto3"])) for name, t in timings.items()}
    fetch = {name: _ms(_median(t["fetcher"])) for name, t in timings.items()}
    failed = {name: count for name, count in failures.items() if count}
    rows.append(row("boto3_get_credentials", "boto3.Session().get_credentials()", "ms", boto, ratio_to="stdlib",
                    target=("max", 1.3), detail={"runs": plan.client_runs, "failed": failed}))
    rows.append(row("botocore_fetcher", "  botocore InstanceMetadataFetcher alone", "ms", fetch, ratio_to="stdlib",
                    detail={"runs": plan.client_runs}))


def _median(values):
    return statistics.median(values) if values else None


def _imsa_argv(venv=None):
    """How to run imsa from *venv* (default: this interpreter's): its console script, else ``python -m imsa``."""
    python = os.path.join(venv, "bin", "python") if venv else sys.executable
    script = os.path.join(os.path.dirname(python), "imsa")
    return [script] if os.access(script, os.X_OK) else [python, "-m", "imsa"]


# --- a regular (non-editable) install of the working tree, for the CLI rows ---

# The editable install of .venv runs setuptools' import hook at every start (about 20 ms, twice a plain
# interpreter's start): CLI figures from it, and ratios to its `python -c pass`, are not what users see.
REGULAR_VENV = os.path.join(VENV, "bench-regular")
REGULAR_STAMP = ".imsa-bench-stamp"
INSTALL_TIMEOUT = 300
# What the installed package is built from: a change to any of them reinstalls it.
PACKAGE_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "imsa.service", "imsa.socket", "imsa-system.service",
                  "imsa-system.socket")


def _source_digest():
    """A digest of everything the package is built from: imsa/**.py and PACKAGE_INPUTS."""
    import hashlib

    digest = hashlib.sha256()
    files = [name for name in PACKAGE_INPUTS if os.path.exists(os.path.join(ROOT, name))]
    for directory, dirs, names in os.walk(os.path.join(ROOT, "imsa")):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        files += [os.path.relpath(os.path.join(directory, name), ROOT) for name in sorted(names) if name.endswith(".py")]
    for name in files:
        with open(os.path.join(ROOT, name), "rb") as handle:
            digest.update(name.encode() + b"\0" + handle.read() + b"\0")
    return digest.hexdigest()


def _requirements_digest():
    """A digest of setup.cfg's [options] install_requires: a change reinstalls the dependencies."""
    import configparser
    import hashlib

    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    return hashlib.sha256(parser.get("options", "install_requires", fallback="").encode()).hexdigest()


def regular_install(log):
    """A venv of its own with the working tree installed as a wheel (no editable hook): (venv path, how its
    dependencies got there). Reused while the sources and requirements are the ones it was built from; a
    rebuild is bounded by INSTALL_TIMEOUT per step.

    The dependencies come from the package index pip is configured with (``pip install WHEEL``); where that
    fails (offline), from .venv's site-packages through a .pth line, and the report says so.
    """
    import fcntl

    os.makedirs(VENV, exist_ok=True)
    wanted = {"source": _source_digest(), "requirements": _requirements_digest()}
    stamp_path = os.path.join(REGULAR_VENV, REGULAR_STAMP)
    with open(os.path.join(VENV, ".bench-regular.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        stamp = {}
        with contextlib.suppress(OSError, ValueError):
            with open(stamp_path, encoding="utf-8") as handle:
                stamp = json.load(handle)
        python = os.path.join(REGULAR_VENV, "bin", "python")
        if stamp.get("source") == wanted["source"] and stamp.get("requirements") == wanted["requirements"] \
                and os.access(python, os.X_OK):
            return REGULAR_VENV, stamp["dependencies"]
        began = time.monotonic()

        def step(argv):
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=INSTALL_TIMEOUT)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:4])} ...: {done.stderr.strip()[-2000:]}")
            return done

        fresh = not os.access(python, os.X_OK) or stamp.get("requirements") != wanted["requirements"]
        if fresh:
            shutil.rmtree(REGULAR_VENV, ignore_errors=True)
            step([sys.executable, "-m", "venv", REGULAR_VENV])  # on the base interpreter of .venv's
        build = tempfile.mkdtemp(prefix="imsa-bench-build-")
        try:
            # Built from a copy: the build's own files (build/, *.egg-info) stay out of the working tree.
            source = os.path.join(build, "source")
            shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
                ".venv", ".git", "tests", "build", "*.egg-info", "__pycache__", "node_modules", ".pytest_cache"))
            wheels = os.path.join(build, "wheels")
            step([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                  "--no-build-isolation", "-w", wheels, source])
            wheel = os.path.join(wheels, next(name for name in os.listdir(wheels) if name.endswith(".whl")))
            pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            dependencies = stamp.get("dependencies") if not fresh else None
            if dependencies is None:
                try:
                    step(pip + [wheel])
                    dependencies = "installed from the package index"
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    log(f"regular install: dependencies not installable ({str(error)[-300:]}); "
                        "using .venv's through a .pth line")
                    step(pip + ["--no-deps", "--no-index", wheel])
                    site = next(path for path in sys.path if path.endswith("site-packages"))
                    target = step([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
                    with open(os.path.join(target, "imsa-bench-deps.pth"), "w", encoding="utf-8") as handle:
                        handle.write(site + "\n")
                    dependencies = "from .venv's site-packages (offline)"
            else:
                step(pip + ["--no-deps", "--force-reinstall", "--no-index", wheel])
        finally:
            shutil.rmtree(build, ignore_errors=True)
        with open(stamp_path, "w", encoding="utf-8") as handle:
            json.dump(dict(wanted, dependencies=dependencies), handle)
        log(f"regular install: built in {time.monotonic() - began:.0f} s ({dependencies})")
        return REGULAR_VENV, dependencies


def _timed(argv, env=None):
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    return time.perf_counter() - began, done


# The CLI rows: (key, title, target: the most times `python -c pass` of the same venv). The targets.
CLI_ROWS = (
    ("status", "imsa status", 2.5),
    ("status_short", "imsa status --short (at each prompt)", 2.0),
    ("export", "imsa export P (session held)", 3.0),
    ("credential_process", "imsa credential-process P (session held)", 3.0),
    ("complete", "completion of imsa assume <TAB>", 3.0),
    ("shell_init", "imsa shell-init bash (once per new shell)", None),
)


def measure_cli(plan, rows, sts, log, work):
    """Rows 3 and 4: wall time of status, export and credential-process (session held), completion and assume
    (session cached), from a regular install of the working tree next to `python -c pass` of the same venv; the
    same from .venv's editable install, labelled, for reference. The two venvs take turns in every round."""
    regular, dependencies = regular_install(log)
    venvs = {"regular": regular, "editable": None}
    completions = os.path.join(work, "completions")
    complete_env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE="imsa assume ",
                        COMP_POINT="12", _ARGCOMPLETE_SUPPRESS_SPACE="0", _ARGCOMPLETE_STDOUT_FILENAME=completions)
    commands = {}
    for venv_name, venv in venvs.items():
        imsa = _imsa_argv(venv)
        python = os.path.join(venv, "bin", "python") if venv else sys.executable
        commands[venv_name] = {
            "python": ([python, "-c", "pass"], None),
            "status": (imsa + ["status"], None),
            "status_short": (imsa + ["status", "--short"], None),
            "export": (imsa + ["export", "c"], None),
            "credential_process": (imsa + ["credential-process", "c"], None),
            "complete": (imsa, complete_env),
            "shell_init": (imsa + ["shell-init", "bash"], None),
        }
        warm, done = _timed(imsa + ["export", "c"])  # role-c into the service's cache, profile c into imsa's
        if done.returncode != 0:
            raise RuntimeError(f"imsa export c failed: {done.stderr.strip()}")
    times = {venv_name: {name: [] for name in names} for venv_name, names in commands.items()}
    for _ in range(plan.cli_runs):
        for venv_name, names in commands.items():
            for name, (argv, env) in names.items():
                spent, done = _timed(argv, env)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
                times[venv_name][name].append(spent)
    with open(completions, encoding="utf-8") as handle:
        offered = sorted(name for name in handle.read().split("\n") if name and not name.startswith("-"))
    if "a" not in offered or "c" not in offered:
        raise RuntimeError(f"completion offered {offered}, not the profiles")

    before = sts.mark()
    assume_times = []
    for index in range(plan.assume_runs):
        spent, done = _timed(_imsa_argv(regular) + ["assume", f"switch{index}"])
        if done.returncode != 0:
            raise RuntimeError(f"imsa assume switch{index} failed: {done.stderr.strip()}")
        assume_times.append(spent)
    calls = sts.calls("AssumeRole", before)
    sessions = sts.calls("GetSessionToken", before)
    if calls != plan.assume_runs or sessions:
        log(f"assume: expected {plan.assume_runs} AssumeRole and no GetSessionToken, STS saw {calls} and {sessions}")

    for venv_name in venvs:
        python = _median(times[venv_name]["python"]) * 1000
        prefix, label = ("cli_", "") if venv_name == "regular" else ("cli_editable_", " [editable .venv]")
        base = "python -c pass" if venv_name == "regular" else "its python -c pass"
        for key, title, target in CLI_ROWS:
            value = _median(times[venv_name][key]) * 1000
            rows.append(row(f"{prefix}{key}", title + label, "ms", {"imsa": value}, base_value=python,
                            base_name=base, target=("max", target) if target and venv_name == "regular" else None,
                            detail={"runs": plan.cli_runs, "install": venv_name, "dependencies": dependencies}))
        rows.append(row(f"{prefix}python", "  python -c pass (reference)" + label, "ms", {"imsa": python},
                        detail={"runs": plan.cli_runs}))
    python = _median(times["regular"]["python"]) * 1000
    rows.append(row("cli_assume", "imsa assume P2 (session cached, 1 AssumeRole)", "ms",
                    {"imsa": _median(assume_times) * 1000}, base_value=python, base_name="python -c pass",
                    detail={"runs": plan.assume_runs, "assume_role_calls": calls, "get_session_token_calls": sessions}))


def measure_shell_hook(plan, rows, log, work):
    """The region hook of ``imsa shell-init bash`` at one prompt, next to an empty bash function: µs per call.

    It runs at every prompt, so it must cost nothing a person could notice. Measured on its full path: a control
    socket is there and the region file holds a region (a directory of its own, with a socket bound here).
    """
    bash = shutil.which("bash")
    if not bash:
        log("shell hook: no bash on this machine; row left empty")
        rows.append(row("shell_hook", "region hook at each prompt (bash)", "µs", {"imsa": None}))
        return
    run_dir = os.path.join(work, "hook")
    os.mkdir(run_dir, 0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(run_dir, "control.sock"))
    with open(os.path.join(run_dir, "region"), "w", encoding="ascii") as handle:
        handle.write("us-west-2\n")
    calls = 200 if plan.quick else 2000
    script = f"""eval "$("$@" shell-init bash)" || exit 9
empty() {{ :; }}
t0=$EPOCHREALTIME; for ((i = 0; i < {calls}; i++)); do _imsa_region; done; t1=$EPOCHREALTIME
for ((i = 0; i < {calls}; i++)); do empty; done; t2=$EPOCHREALTIME
echo "$t0 $t1 $t2 $AWS_REGION"
"""
    env = dict(os.environ, IMSA_CONTROL_SOCKET=os.path.join(run_dir, "control.sock"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):  # the hook leaves a region someone else set alone
        env.pop(name, None)
    try:
        done = subprocess.run([bash, "--norc", "--noprofile", "-c", script, "bench", *_imsa_argv()],
                              capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        listener.close()
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 4 or fields[3] != "us-west-2":
        raise RuntimeError(f"the shell hook did not run: {done.stdout.strip()} {done.stderr.strip()}")
    t0, t1, t2 = (float(value) for value in fields[:3])
    hook, empty = (t1 - t0) / calls * 1e6, (t2 - t1) / calls * 1e6
    rows.append(row("shell_hook", "region hook at each prompt (bash)", "µs", {"imsa": hook}, base_value=empty,
                    base_name="an empty bash function", absolute=("max", 1000.0), detail={"calls": calls}))


def measure_resources(load, ports, pids, plan, rows, log):
    """Row 5: RSS after rss_sequences sequences, and CPU seconds over the idle period (per minute)."""
    for name, port in ports.items():
        missing = plan.rss_sequences - load.served.get(name, 0)
        deadline = time.monotonic() + plan.rss_seconds
        while missing > 0 and time.monotonic() < deadline:
            per_worker = -(-missing // load.processes)
            load.run(name, port, load.processes, True, max(0.2, deadline - time.monotonic()), limit=per_worker)
            missing = plan.rss_sequences - load.served[name]
    served = dict(load.served)
    for name, count in served.items():
        if count < plan.rss_sequences:
            log(f"{name}: only {count} sequences before the RSS reading")
    rss = {name: rss_mb(pid) for name, pid in pids.items()}
    rows.append(row("rss", f"RSS after {plan.rss_sequences:,} sequences", "MB", rss, ratio_to="flask",
                    absolute=("max", 60.0), detail={"sequences": served}))

    # boto3's connection pools of the client rows keep their connections until they are collected: an idle
    # keep-alive connection is something to look after, not idleness (the service sweeps it every 30 s).
    import gc

    gc.collect()
    time.sleep(0.5)  # let the last connections close
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(plan.idle_seconds)
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    per_minute = {name: (after[name][0] - before[name][0]) * 60 / plan.idle_seconds for name in pids}
    wakeups = {name: (after[name][1] - before[name][1]) * 60 / plan.idle_seconds
               for name in pids if after[name][1] is not None}
    rows.append(row("idle_cpu", f"CPU while idle ({plan.idle_seconds} s), per minute", "s/min", per_minute,
                    ratio_to="flask", absolute=("max", 0.02), detail={"wakeups_per_minute": wakeups}))
    # Every thread's runs (schedstat): the event loop's, the refresher's (it wakes only for a real deadline) and the
    # waitress workers'. At most one a minute: a refresher deadline may fall in the window.
    rows.append(row("idle_wakeups", f"wake-ups while idle ({plan.idle_seconds} s), per minute", "/min", wakeups,
                    ratio_to="flask", absolute=("max", 1.0)))


def row(key, title, unit, values, ratio_to=None, ratio=None, target=None, absolute=None, base_value=None,
        base_name=None, detail=None):
    """One table row: imsa's figure, the baselines', the ratio (given, or of the figures) and the targets met."""
    value = values.get("imsa")
    if ratio_to is not None:
        base_name = NAMES[ratio_to]
        if ratio is None and values.get(ratio_to) and value is not None:
            ratio = value / values[ratio_to]
    elif ratio is None and base_value and value is not None:
        ratio = value / base_value
    targets, met = [], []
    if target is not None:
        kind, limit = target
        targets.append(f"{'≥' if kind == 'min' else '≤'} {limit:g}× {base_name}")
        met.append(ratio is not None and (ratio >= limit if kind == "min" else ratio <= limit))
    if absolute is not None:
        kind, limit = absolute
        targets.append(f"{'≥' if kind == 'min' else '≤'} {limit:g} {unit}")
        met.append(value is not None and (value >= limit if kind == "min" else value <= limit))
    return {
        "id": key, "title": title, "unit": unit,
        "imsa": value, "stdlib": values.get("stdlib"), "flask": values.get("flask"),
        "baseline": base_name, "baseline_value": base_value,
        "ratio": ratio, "target": "; ".join(targets) or None, "met": all(met) if met else None,
        "detail": detail or {},
    }


# --- the run ---


def machine():
    """What this run ran on (the numbers only mean something next to it)."""
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {
        "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(), "loadavg_start": os.getloadavg()[0],
    }


def isolate(work):
    """An environment like the tests': fresh HOME and config, no real AWS credentials, no proxies."""
    from conftest import _SCRUB, SERVICE_USER, service_run_dir

    for name in _SCRUB:
        os.environ.pop(name, None)
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, ".aws"))
    for name in ("config", "credentials"):
        open(os.path.join(home, ".aws", name), "w").close()
    run_dir = service_run_dir("imsa-bench-run-")  # the service may serve as 'nobody', who makes its run dir there
    os.environ.update({
        "HOME": home,
        "AWS_CONFIG_FILE": os.path.join(home, ".aws", "config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, ".aws", "credentials"),
        "IMSA_CONFIG": os.path.join(home, ".imsa"),
        "IMSA_CONTROL_SOCKET": os.path.join(run_dir, "run", "control.sock"),
        "AWS_EC2_METADATA_V1_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    if os.geteuid() == 0:
        os.environ["IMSA_SERVICE_USER"] = SERVICE_USER
    return home, run_dir


def run(plan, say):
    """Every measurement; returns the report (machine, settings, rows, notes)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import pathlib

    from conftest import MFA_CODE, start_service, start_sts, write_config

    began = time.monotonic()
    info = machine()
    notes = []
    phases = {}

    def log(text):
        notes.append(text)
        say(f"bench: {text}")

    work = tempfile.mkdtemp(prefix="imsa-bench-")
    home, run_dir = isolate(work)
    processes = Processes()
    load = None
    sts = None
    service = None
    baseline_log = open(os.path.join(work, "baselines.log"), "w")
    try:
        say("bench: starting the fake STS, the imsa service and the baselines")
        sts = start_sts(MFA_CODE)
        processes.add(sts.process)
        os.environ["AWS_ENDPOINT_URL_STS"] = sts.endpoint
        # One profile per assume run, each with its own session name, so each costs exactly one AssumeRole.
        switch = {f"switch{index}": {"extends": "base", "role_arn": sts.roles["role-b"],
                                     "role_session_name": f"bench-switch-{index}"} for index in range(plan.assume_runs)}
        write_config(pathlib.Path(home), sts, extra=switch)
        service = start_service()
        processes.add(service.process)
        service_pid, port = service.pid, service.port
        done = subprocess.run(_imsa_argv() + ["assume", "a", "--mfa-token", MFA_CODE], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"imsa assume a failed: {done.stderr.strip()}")

        # The baselines serve imsa's own answer bytes, so every server sends bodies of the same size.
        client = _Client(port, keepalive=True)
        _, _, token = client.request(b"PUT", b"/latest/api/token", [f"{TTL_HEADER}: {TOKEN_TTL}".encode()])
        auth = [TOKEN_HEADER.encode() + b": " + token]
        _, _, role = client.request(b"GET", CREDENTIALS_PATH.encode(), auth)
        _, _, credentials = client.request(b"GET", CREDENTIALS_PATH.encode() + role, auth)
        client.close()
        body_file = os.path.join(work, "answers.json")
        with open(body_file, "w", encoding="utf-8") as handle:
            json.dump({"token": "B" * len(token), "role": role.decode(), "credentials": credentials.decode()}, handle)
        ports = {"imsa": port}
        pids = {"imsa": service_pid}
        for kind in ("stdlib", "flask"):
            ports[kind], pids[kind] = start_baseline(kind, body_file, processes, baseline_log)
        access_key = json.loads(credentials)["AccessKeyId"]
        expected = {name: access_key for name in ports}

        rows = []
        load = Load(8)
        phases["setup"] = time.monotonic() - began
        say("bench: 1/6 IMDSv2 sequences")
        measure_sequences(load, ports, pids, plan, rows, log)
        phases["sequences"] = time.monotonic() - began - sum(phases.values())
        say("bench: 2/6 boto3 through IMDS")
        measure_clients(ports, expected, plan, rows, log)
        phases["clients"] = time.monotonic() - began - sum(phases.values())
        say("bench: 3-4/6 the CLI")
        measure_cli(plan, rows, sts, log, work)
        measure_shell_hook(plan, rows, log, work)
        phases["cli"] = time.monotonic() - began - sum(phases.values())
        # assume switched the served role; the resource rows only need the sequences to succeed, whatever role.
        say(f"bench: 5/6 RSS and {plan.idle_seconds} s idle")
        measure_resources(load, ports, pids, plan, rows, log)
        phases["resources"] = time.monotonic() - began - sum(phases.values())
        # Last: hundreds of connections at once grow the heap, and the RSS row above is after sequences alone.
        say("bench: 6/6 bursts of " + " and ".join(map(str, BURST_SIZES)) + " clients")
        measure_bursts(load, ports, plan, rows, log)
        rows.append(row("rss_after_bursts", "RSS after the bursts too", "MB",
                        {name: rss_mb(pid) for name, pid in pids.items()}, ratio_to="flask"))
        phases["bursts"] = time.monotonic() - began - sum(phases.values())
        if load.latest_start > 0.01:
            log(f"a load worker began {load.latest_start * 1000:.0f} ms late; rates may be a little low")
        busiest = max(info["loadavg_start"], os.getloadavg()[0])
        if busiest > info["usable_cpus"] / 2:
            log(f"the machine was busy (load {busiest:.1f} on {info['usable_cpus']} CPUs): ratios are noisy, "
                "absolute figures low; the per-round ratios are in --json")
    finally:
        if load is not None:
            load.close()
        processes.stop_all()
        if service is not None:
            with contextlib.suppress(OSError):
                os.unlink(service.log_path)
        baseline_log.close()
        if sts is not None:
            with contextlib.suppress(OSError):
                os.unlink(sts.recording)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()[0]
    return {
        "machine": info,
        "settings": {name: value for name, value in vars(plan).items()},
        "seconds": round(time.monotonic() - began, 1),
        "phases": {name: round(seconds, 1) for name, seconds in phases.items()},
        "rows": rows,
        "notes": notes,
    }


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "seq/s":
        return f"{value:,.0f}"
    if unit == "s/min":
        return f"{value:.4f}"
    if unit in ("count", "/min"):
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 or unit == "MB" else f"{value:.2f}"


def table(report):
    """The report as a plain-text table."""
    info = report["machine"]
    lines = [
        f"imsa bench: {info['usable_cpus']} CPUs ({info['cpu_model'] or 'unknown CPU'}), Linux {info['kernel']}, "
        f"Python {info['python']}, load {info['loadavg_start']:.2f} -> {info['loadavg_end']:.2f}, "
        f"{report['seconds']:.0f} s{' (--quick)' if report['settings']['quick'] else ''}",
        "",
        f"{'':48} {'unit':>6} {'imsa':>9} {'(a) stdlib':>11} {'(b) flask':>10} {'ratio':>20}  target",
    ]
    for entry in report["rows"]:
        unit = entry["unit"]
        ratio = "-"
        if entry["ratio"] is not None:
            ratio = f"{entry['ratio']:.2f}× {entry['baseline']}"
        target = entry["target"] or ""
        if entry["met"] is not None:
            target += "  met" if entry["met"] else "  MISSED"
        lines.append(
            f"{entry['title']:48} {unit:>6} {_fmt(entry['imsa'], unit):>9} {_fmt(entry['stdlib'], unit):>11} "
            f"{_fmt(entry['flask'], unit):>10} {ratio:>20}  {target}".rstrip()
        )
    if report["notes"]:
        lines.append("")
        lines.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(lines) + "\n"


def _use_project_venv(argv):
    """Re-run in the project's .venv when this interpreter lacks its packages (``scripts/bench.py`` from a shell)."""
    import importlib.util

    python = os.path.join(VENV, "bin", "python")
    if importlib.util.find_spec("moto") is None and os.access(python, os.X_OK) and sys.executable != python:
        os.execv(python, [python, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv))


def main(argv=None):
    """Run the benchmark (or, with --serve, one baseline server); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (≤ 1 min) with the same rows")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--serve", choices=("stdlib", "flask"), help=argparse.SUPPRESS)
    parser.add_argument("body_file", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _use_project_venv(argv)
    if args.serve:
        sys.path.insert(0, ROOT)
        (serve_stdlib if args.serve == "stdlib" else serve_flask)(args.body_file)
        return 0

    plan = Plan(args.quick)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    def over_time(_signum, _frame):
        raise TimeoutError(f"the benchmark ran past its bound of {plan.time_limit + 60} s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, over_time)
    signal.alarm(plan.time_limit + 60)  # a hard stop well past the planned time; servers are still stopped

    def say(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    try:
        report = run(plan, say)
    finally:
        signal.alarm(0)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
