"""Faults, end to end: STS unreachable or answering errors during rotation, the MFA session running out, the
service killed with SIGKILL, and ~/.imsa broken while the service runs.

Rotation within seconds comes from the fake STS's ``--role-lifetime`` (imsa rotates at half a short lifetime);
failures come from tests/sts_proxy.py between imsa and the fake STS. The backoff arithmetic (5 s doubling to
5 min) is tested on an injected clock in tests/test_store.py; here the real clock shows its first two steps.
"""

import datetime
import json
import os
import signal
import threading
import time

import pytest

from conftest import MFA_CODE, http, run_imsa, service_user_args, start_service, start_sts, stop_process, write_config
from imdsv2 import CREDS, TOKEN, fetch_credentials, put_token, service_credentials
from sts_proxy import StsProxy
from imsa.client import Client


def parse_time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def sample(service):
    """One SDK-like credentials fetch: ("ok", key id, expiration) or ("expired", message) — and never anything
    expired: a served Expiration must be later than the moment the request was sent."""
    sent = time.time()
    token = put_token(service.host, service.port)
    status, _, body = http(service.host, service.port, "GET", CREDS, {TOKEN: token})
    assert status == 200, body
    status, _, body = http(service.host, service.port, "GET", CREDS + body.decode(), {TOKEN: token})
    assert status == 200, body
    data = json.loads(body)
    if data["Code"] != "Success":
        assert data["Code"] == "CredentialsExpired" and "AccessKeyId" not in data, data
        return ("expired", data["Message"])
    expiration = parse_time(data["Expiration"])
    assert expiration > sent, f"served expired credentials: {data['Expiration']} at {sent}"
    return ("ok", data["AccessKeyId"], expiration)


@pytest.fixture
def short_sts():
    """A fake STS of its own whose role credentials live 36 s (so imsa rotates them 18 s after issue)."""
    server = start_sts(extra_args=["--role-lifetime", "36"])
    yield server
    server.stop()


class Scenario:
    """One service behind one proxy, failing STS in two steps, then letting it through.

    A watcher thread polls the service's log every 50 ms for "rotation failed" lines: it notes when each
    appeared and moves the proxy to the next step right away, whatever the test's own loop is busy with.
    """

    POLL = 0.05

    def __init__(self, name, faults, proxy, service, env):
        self.name, self.faults, self.proxy, self.service, self.env = name, faults, proxy, service, env
        self.samples = []
        self.failure_times = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def apply(self, step):
        fault = self.faults[step] if step < len(self.faults) else "forward"
        if fault == "forward":
            self.proxy.forward()
        elif fault == "refuse":
            self.proxy.refuse()
        else:
            self.proxy.fail(fault)

    def start_watching(self):
        self._watcher.start()

    def stop_watching(self):
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(5)

    def _watch(self):
        while not self._stop.wait(self.POLL):
            logged = self.service.log().count("rotation failed")
            while len(self.failure_times) < logged:
                self.failure_times.append(time.monotonic())
                self.apply(len(self.failure_times))


def test_sts_unreachable_or_failing_keeps_valid_credentials_backs_off_and_recovers(isolated_env, short_sts, monkeypatch):
    # Two services side by side on one timeline: STS refused (twice), and STS answering errors (Throttling,
    # then AccessDenied). Each must keep serving its valid credentials, retry after 5 s then 10 s, and rotate
    # again once STS answers, without a restart. Intervals come from the proxy's own timestamps of the tries it
    # saw; a refused try reaches no one, so there the watcher's log times stand in (bounds allow for its 50 ms).
    write_config(isolated_env, short_sts)
    scenarios = []
    try:
        for name, faults in (("unreachable", ["refuse", "refuse"]), ("errors", ["Throttling", "AccessDenied"])):
            proxy = StsProxy(short_sts.endpoint)
            socket_path = os.path.join(os.path.dirname(os.environ["IMSA_CONTROL_SOCKET"]), f"{name}.sock")
            monkeypatch.setenv("IMSA_CONTROL_SOCKET", socket_path)
            env = dict(os.environ, AWS_ENDPOINT_URL_STS=proxy.endpoint, IMSA_CONTROL_SOCKET=socket_path)
            service = start_service(env=env)
            scenarios.append(Scenario(name, faults, proxy, service, env))
        for scenario in scenarios:
            done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=scenario.env)
            assert done.returncode == 0, done.stderr
            scenario.first = sample(scenario.service)
            scenario.apply(0)
            scenario.start_watching()
        # Rotation is due 18 s after the first credentials, then 5 s and 10 s of retries: about 35 s in all.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for scenario in scenarios:
                scenario.samples.append(sample(scenario.service))
                if scenario.failure_times and not hasattr(scenario, "status_during"):
                    status = run_imsa("status", env=scenario.env)
                    scenario.status_during = (status.returncode, status.stdout)
            if all(s.samples[-1][0] == "ok" and s.samples[-1][1] != s.first[1] for s in scenarios):
                break
            time.sleep(0.5)
        for scenario in scenarios:
            scenario.stop_watching()

        for scenario in scenarios:
            name = scenario.name
            keys = [entry[1] for entry in scenario.samples]
            assert all(entry[0] == "ok" for entry in scenario.samples), f"{name}: valid credentials all along"
            assert keys[-1] != scenario.first[1], f"{name}: rotation recovered once STS answered"
            assert set(keys) == {scenario.first[1], keys[-1]}, f"{name}: no other credentials in between"
            assert scenario.service.client.status()["pid"] == scenario.service.pid, f"{name}: no restart"
            assert len(scenario.failure_times) == 2, (name, scenario.service.log()[-3000:])
            log = scenario.service.log()
            assert "still serving valid credentials; next try in 5 s" in log, log[-2000:]
            assert "still serving valid credentials; next try in 10 s" in log, log[-2000:]
            code, text = scenario.status_during
            assert code == 0 and "last error:" in text, (name, text)
        # The errors scenario: every try reached the proxy, which noted when. The first of a pass comes a few
        # hundredths of a second after the pass starts, and a pass starts when the backoff says or a little later:
        # 5 s, then 10 s, each give or take the time to make an STS client (well under a second).
        errors = scenarios[1]
        tries = {}
        for when, action, outcome in errors.proxy.actions():
            if action == "AssumeRole":
                kind = outcome if outcome in ("Throttling", "AccessDenied") else "recovered" if tries else "assume"
                tries.setdefault(kind, when)
        assert set(tries) == {"assume", "Throttling", "AccessDenied", "recovered"}, errors.proxy.actions()
        first_wait = tries["AccessDenied"] - tries["Throttling"]
        second_wait = tries["recovered"] - tries["AccessDenied"]
        assert 4.0 <= first_wait < 9.0 <= second_wait <= 15, tries
        assert "Throttling: Rate exceeded" in errors.status_during[1]
        # The unreachable scenario: its failed tries reached no one; the log shows each failure after its try
        # (botocore retries a refused connection once, within about a second), and the proxy sees the recovery.
        refused = scenarios[0]
        first_wait = refused.failure_times[1] - refused.failure_times[0]
        assert 2.5 <= first_wait <= 9.0, first_wait
        after = refused.proxy.actions(since=refused.failure_times[0])
        assert after and all(outcome.startswith("forwarded") for _, _, outcome in after), after
        recovery = [when for when, action, _ in after if action == "AssumeRole"][0]
        assert 7.5 <= recovery - refused.failure_times[1] <= 15, (recovery, refused.failure_times)
    finally:
        for scenario in scenarios:
            scenario.stop_watching()
            stop_process(scenario.service.process)
            scenario.proxy.close()


def test_an_expiring_mfa_session_stops_credentials_at_their_expiry_and_status_says_what_to_run(isolated_env, monkeypatch):
    # Session 6 s, role credentials 4 s: rotations about 2 s apart while the session lasts, so the last
    # credentials end at most 4 s after it; then IMDS and `imsa status` say to run imsa assume.
    sts = start_sts(extra_args=["--role-lifetime", "4", "--session-lifetime", "6"])
    service = None
    try:
        write_config(isolated_env, sts)
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(env=env)
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env)
        assert done.returncode == 0, done.stderr
        session_end = time.time() + 6  # the session was made before this, so it ends before this
        samples = []  # (sent, received, sample): the service decided between the two
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sent = time.time()
            result = sample(service)  # asserts, for each "ok", that it expires after `sent`: never served expired
            samples.append((sent, time.time(), result))
            if result[0] == "expired" and sent > session_end + 4:
                break
            time.sleep(0.2)
        served = [(sent, entry) for sent, _, entry in samples if entry[0] == "ok"]
        expired = [(sent, received, entry) for sent, received, entry in samples if entry[0] == "expired"]
        assert len({entry[1] for _, entry in served}) >= 2, "rotated while the session lasted"
        last_expiration = max(entry[2] for _, entry in served)
        assert last_expiration <= session_end + 4, "no credentials made after the session ended"
        assert expired and expired[-1][0] > session_end + 4, "credentials stop"
        assert expired[0][1] >= last_expiration, "nothing stopped before the last credentials expired"
        assert all(sent < expired[0][0] for sent, _ in served), "once stopped, never served again"
        assert "run: imsa assume a" in expired[-1][2][1]
        mark = sts.mark()
        status = run_imsa("status", env=env)
        assert status.returncode == 1
        assert "run: imsa assume a" in status.stderr
        time.sleep(1)
        assert sts.calls("AssumeRole", since=mark) == 0, "no STS call without a session"
        # A new MFA session brings everything back, in the same service.
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env).returncode == 0
        assert sample(service)[0] == "ok"
        assert service.client.status()["pid"] == service.pid
    finally:
        if service is not None:
            stop_process(service.process)
        sts.stop()


def test_a_service_killed_with_sigkill_is_reported_not_running_and_start_works_again(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    listen = ["--listen", "127.0.0.1:0", *service_user_args()]
    started = run_imsa("start", *listen)
    assert started.returncode == 0, started.stderr
    first = Client().status()
    second = None
    try:
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{first['pid']}") and time.monotonic() < deadline:
            time.sleep(0.05)
        for args in (["status"], ["stop"], ["assume", "a", "--mfa-token", MFA_CODE]):
            done = run_imsa(*args)
            assert done.returncode == 5, (args, done.stderr)
            assert "not running" in done.stderr and "imsa start" in done.stderr
        assert os.path.exists(first["control_socket"]), "the killed service left its socket behind"
        again = run_imsa("start", *listen)
        assert again.returncode == 0, again.stderr
        second = Client().status()
        assert second["pid"] != first["pid"]
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
        host, port = second["listen"].rsplit(":", 1)
        assert fetch_credentials(host, int(port))[0] == "role-a"
        assert run_imsa("stop").returncode == 0
        second = None
    finally:
        if second is not None:
            os.kill(second["pid"], signal.SIGTERM)


def test_config_broken_while_the_service_runs_keeps_serving_and_the_cli_reports_it(active_service, isolated_env):
    svc = active_service
    before = service_credentials(svc)[1]
    config = isolated_env / ".imsa"
    good = config.read_text()
    config.write_text(good + "\nbroken: [unclosed\n  - : :\n")
    try:
        role, creds = service_credentials(svc)
        assert (role, creds["AccessKeyId"]) == ("role-a", before["AccessKeyId"])
        assert run_imsa("status").returncode == 0
        for args in (["assume", "b"], ["export", "a"]):
            done = run_imsa(*args)
            assert done.returncode == 3, done.stderr
            assert f"{config}:" in done.stderr and "invalid YAML" in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert service_credentials(svc)[1]["AccessKeyId"] == before["AccessKeyId"]
    finally:
        config.write_text(good)
    assert run_imsa("assume", "b").returncode == 0
    assert service_credentials(svc)[0] == "role-b"
    assert svc.client.status()["pid"] == svc.pid
