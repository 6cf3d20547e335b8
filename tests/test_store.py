"""The store and its refresher, driven by an injected clock; what IMDS serves is read by botocore over a socket."""

import datetime
import json
import threading

import pytest
from botocore.utils import InstanceMetadataFetcher

from imsa.server import imds
from imsa.credentials import Credentials
from imsa.errors import StsError
from imsa.server.store import RoleSpec, Store

T0 = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
FP = "f" * 32
SPEC = RoleSpec(profile="a", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-a",
                role_session_name="tester", duration_seconds=3600)


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += datetime.timedelta(**delta)


class FakeSts:
    """AssumeRole that issues numbered one-hour credentials, or fails while ``failing`` is set."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = 0
        self.failing = None

    def __call__(self, session, spec):
        self.calls += 1
        if self.failing:
            raise StsError(self.failing)
        n = self.calls
        return Credentials(f"ASIAROLE{n:012d}", f"secret-{n}", f"token-{n}",
                           self.clock() + datetime.timedelta(seconds=spec["duration_seconds"]), issued=self.clock())


def session(clock, hours=12):
    return Credentials("ASIASESSION00000001", "s", "t", clock() + datetime.timedelta(hours=hours), issued=clock())


@pytest.fixture
def world():
    clock = Clock()
    sts = FakeSts(clock)
    store = Store(assume=sts, clock=clock)
    store.put_session(FP, session(clock))
    return clock, sts, store


def test_activate_serves_new_credentials_atomically(world):
    clock, sts, store = world
    assert store.served() is None
    store.activate(SPEC)
    served = store.served()
    assert served.spec == SPEC and served.credentials.access_key_id == "ASIAROLE000000000001"
    assert served.credentials.secret_access_key == "secret-1" and served.credentials.session_token == "token-1"


def test_rotation_happens_before_30_minutes_are_left(world):
    clock, sts, store = world
    store.activate(SPEC)
    clock.advance(minutes=29, seconds=59)
    store.refresh_once()
    assert sts.calls == 1
    clock.advance(seconds=1)  # exactly 30 min left
    due = store.refresh_once()
    assert sts.calls == 2
    served = store.served().credentials
    assert served.access_key_id == "ASIAROLE000000000002"
    assert served.remaining(clock()) == datetime.timedelta(hours=1)
    assert due == served.expiration - datetime.timedelta(minutes=30)  # rotated with 30 min left (README)


def test_served_credentials_keep_25_minutes_while_sts_works(world):
    clock, sts, store = world
    store.activate(SPEC)
    for _ in range(24 * 12):  # a day in 5-minute steps
        clock.advance(minutes=5)
        if store.session(FP).remaining(clock()) < datetime.timedelta(hours=1):
            store.put_session(FP, session(clock))  # the user renews the MFA session before it ends
        store.refresh_once()
        assert store.served().credentials.remaining(clock()) >= datetime.timedelta(minutes=25)


def test_sts_failure_keeps_valid_credentials_backs_off_and_recovers(world):
    clock, sts, store = world
    store.activate(SPEC)
    first = store.served().credentials
    clock.advance(minutes=31)
    sts.failing = "Throttling: Rate exceeded"
    due = store.refresh_once()
    assert store.served().credentials == first
    assert due == clock() + datetime.timedelta(seconds=5)  # retried after 5 s, doubling to 5 min (README)
    assert store.status()["active"]["last_error"] == "Throttling: Rate exceeded"
    delays = []
    for _ in range(8):
        clock.now = due
        calls = sts.calls
        due = store.refresh_once()
        assert sts.calls == calls + 1
        delays.append(due - clock())
    assert delays[:3] == [datetime.timedelta(seconds=seconds) for seconds in (10, 20, 40)]
    assert delays[-1] == datetime.timedelta(minutes=5)
    assert store.served().credentials == first  # still valid: the retries took about 15 of its 29 minutes
    sts.failing = None
    clock.now = due
    store.refresh_once()
    assert store.served().credentials.access_key_id != first.access_key_id
    assert store.status()["active"]["last_error"] is None


def test_before_its_retry_time_a_failed_role_is_not_retried(world):
    clock, sts, store = world
    store.activate(SPEC)
    clock.advance(minutes=31)
    sts.failing = "AccessDenied"
    store.refresh_once()
    calls = sts.calls
    clock.advance(seconds=1)
    store.refresh_once()
    assert sts.calls == calls


def test_an_expired_session_stops_rotation_without_calling_sts(world):
    clock, sts, store = world
    store.put_session(FP, session(clock, hours=1))
    store.activate(SPEC)
    clock.advance(minutes=61)
    calls = sts.calls
    store.refresh_once()
    assert sts.calls == calls
    assert store.session(FP) is None
    assert "imsa assume a" in store.status()["active"]["last_error"]


def test_a_new_session_clears_the_backoff(world):
    clock, sts, store = world
    store.activate(SPEC)
    clock.advance(minutes=31)
    sts.failing = "ExpiredToken"
    store.refresh_once()
    sts.failing = None
    store.put_session(FP, session(clock))
    store.refresh_once()
    assert store.served().credentials.access_key_id == "ASIAROLE000000000003"


def test_a_profile_without_role_serves_the_session(world):
    clock, sts, store = world
    spec = RoleSpec(profile="base", fingerprint=FP)
    store.activate(spec)
    assert store.served().credentials.access_key_id == "ASIASESSION00000001"
    assert sts.calls == 0


def test_credentials_for_caches_until_rotation_is_due(world):
    clock, sts, store = world
    other = RoleSpec(profile="b", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-b",
                     role_session_name="tester")
    first = store.credentials_for(other)
    assert store.credentials_for(other) is first and sts.calls == 1
    clock.advance(minutes=31)
    assert store.credentials_for(other) is not first and sts.calls == 2
    assert store.served() is None


def test_pinned_profiles_are_rotated_too(world):
    clock, sts, store = world
    store.activate(SPEC)
    other = RoleSpec(profile="b", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-b",
                     role_session_name="tester")
    store.credentials_for(other)
    store.pin(other)
    clock.advance(minutes=31)
    store.refresh_once()
    assert sts.calls == 4
    store.unpin(other)
    clock.advance(minutes=31)
    store.refresh_once()
    assert sts.calls == 5


def test_short_lived_roles_rotate_at_half_their_lifetime(world):
    clock, sts, store = world
    short = RoleSpec(profile="s", fingerprint=FP, role_arn=SPEC.role_arn, role_session_name="t", duration_seconds=900)
    store.activate(short)
    clock.advance(minutes=7)
    store.refresh_once()
    assert sts.calls == 1
    clock.advance(minutes=1)
    store.refresh_once()
    assert sts.calls == 2


def test_the_refresher_thread_sleeps_until_woken_and_rotates(world):
    clock, sts, store = world
    rotated = threading.Event()
    real_assume = store._minters["credentials"]

    def assume(session_creds, spec):
        creds = real_assume(session_creds, spec)
        if sts.calls >= 2:
            rotated.set()
        return creds

    store._minters["credentials"] = assume
    store.activate(SPEC)
    store.start()
    try:
        clock.advance(minutes=45)
        with store._wake:
            store._poke()
        assert rotated.wait(5)
    finally:
        store.stop()
    assert not store._thread.is_alive()


# --- what botocore reads over a real socket once nothing valid is left ---


@pytest.fixture
def live_imds(world):
    from waitress.server import create_server

    clock, sts, store = world
    server = create_server(imds.create_app(store.served, "127.0.0.1", 0, clock=clock), host="127.0.0.1", port=0,
                           threads=2)
    port = server.effective_port
    server.application = imds.create_app(store.served, "127.0.0.1", port, clock=clock)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield clock, sts, store, f"http://127.0.0.1:{port}"
    # Closed in the loop's own thread (a close from here raced its poll: EBADF in that thread), then waited for.
    server.trigger.pull_trigger(server.close)
    thread.join(timeout=10)
    server.task_dispatcher.shutdown(timeout=2)


def fetch(endpoint):
    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, config={
        "ec2_metadata_service_endpoint": endpoint, "ec2_metadata_v1_disabled": True})
    return fetcher.retrieve_iam_role_credentials()


def test_nothing_expired_is_ever_served(live_imds):
    clock, sts, store, endpoint = live_imds
    store.put_session(FP, session(clock, hours=1))
    store.activate(SPEC)
    assert fetch(endpoint)["access_key"] == "ASIAROLE000000000001"
    sts.failing = "Network unreachable"
    clock.advance(minutes=45)
    store.refresh_once()
    assert fetch(endpoint)["access_key"] == "ASIAROLE000000000001"  # still valid: 15 min left
    clock.advance(minutes=15)
    store.refresh_once()
    assert fetch(endpoint) == {}
    import urllib.request

    token = urllib.request.urlopen(urllib.request.Request(
        endpoint + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read()
    body = urllib.request.urlopen(urllib.request.Request(
        endpoint + "/latest/meta-data/iam/security-credentials/role-a",
        headers={"X-aws-ec2-metadata-token": token.decode()})).read().decode()
    assert "ASIAROLE" not in body and "imsa assume a" in body


def imds_get(endpoint, path):
    """(status, body) of one IMDSv2 read, with a fresh token."""
    import urllib.error
    import urllib.request

    token = urllib.request.urlopen(urllib.request.Request(
        endpoint + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read()
    request = urllib.request.Request(endpoint + path, headers={"X-aws-ec2-metadata-token": token.decode()})
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_regression_a_switch_between_role_list_and_role_answered_404(live_imds):
    # An SDK lists the role, then asks for it: `imsa assume` in between made that 404 and the SDK's whole
    # credential load failed (tests/test_soak.py saw 138 in 30 s). The replaced role is answered for 5 s.
    clock, sts, store, endpoint = live_imds
    other = RoleSpec(profile="b", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-b",
                     role_session_name="tester")
    path = "/latest/meta-data/iam/security-credentials/"
    store.activate(SPEC)
    assert imds_get(endpoint, path) == (200, "role-a")
    store.activate(other)
    status, body = imds_get(endpoint, path + "role-a")
    assert status == 200 and json.loads(body)["AccessKeyId"] == "ASIAROLE000000000001", "role-a's own credentials"
    assert json.loads(imds_get(endpoint, path + "role-b")[1])["AccessKeyId"] == "ASIAROLE000000000002"
    assert imds_get(endpoint, path) == (200, "role-b"), "the list names only the active role"
    clock.advance(seconds=5)  # the grace the README documents
    assert imds_get(endpoint, path + "role-a")[0] == 200
    clock.advance(seconds=1)
    assert imds_get(endpoint, path + "role-a")[0] == 404, "only for a moment"
    assert imds_get(endpoint, path + "role-c")[0] == 404


def test_regression_switch_grace_never_serves_expired_credentials_and_keeps_one_step(live_imds):
    clock, sts, store, endpoint = live_imds
    short_fp = "e" * 32
    store.put_session(short_fp, Credentials("ASIASHORT0000000001", "s", "t", clock() + datetime.timedelta(seconds=3),
                                            issued=clock()))
    store.activate(RoleSpec(profile="base", fingerprint=short_fp))
    store.activate(SPEC)
    clock.advance(seconds=4)  # within the grace, but the replaced session credentials have expired
    status, body = imds_get(endpoint, "/latest/meta-data/iam/security-credentials/base")
    assert status == 200 and "ASIASHORT" not in body and json.loads(body)["Code"] == "CredentialsExpired"
    other = RoleSpec(profile="b", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-b",
                     role_session_name="tester")
    for spec in (other, SPEC, other):
        store.activate(spec)
    served = store.served()
    assert served.previous.spec == SPEC and served.previous.previous is None, "one step of history, no chain"
    store.activate(other)  # the same profile again: nothing is replaced
    assert store.served().previous.spec == SPEC


def test_a_chain_is_minted_from_the_session_with_its_hops_and_status_names_the_source(world):
    clock, sts, store = world
    seen = []
    real = store._minters["credentials"]

    def mint(session_creds, spec):
        seen.append((session_creds.access_key_id, spec["via"], spec["role_arn"]))
        return real(session_creds, spec)

    store._minters["credentials"] = mint
    hop = ("arn:aws:iam::123456789012:role/role-a", "hop-a", 3600, "ext-1")
    chained = RoleSpec(profile="b", fingerprint=FP, role_arn="arn:aws:iam::123456789012:role/role-b",
                       role_session_name="t", via=(hop,), origin="/home/u/.aws/config")
    store.put_session(FP, session(clock), label="keys ****0001 + MFA arn:aws:iam::123456789012:mfa/u")
    store.activate(chained)
    assert seen == [("ASIASESSION00000001", [{"role_arn": hop[0], "role_session_name": "hop-a",
                                              "duration_seconds": 3600, "external_id": "ext-1"}],
                     "arn:aws:iam::123456789012:role/role-b")]
    active = store.status()["active"]
    assert active["via"] == [hop[0]] and active["origin"] == "/home/u/.aws/config"
    assert active["source"].startswith("keys ****0001")
    assert store.status()["sessions"][0]["kind"] == "credentials"


def test_a_session_of_an_unknown_kind_is_refused(world):
    clock, _, store = world
    with pytest.raises(ValueError, match="unknown session kind"):
        store.put_session(FP, session(clock), kind="telepathy")
