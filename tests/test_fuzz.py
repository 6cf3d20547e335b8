"""Fuzzing the live service with hypothesis: random methods, paths, headers and bodies on the IMDS port and the
control socket. Never a 5xx, never credentials without a valid token, and the service alive and correct after.

Bounded for CI: 1500 examples per listener, and never more than BUDGET seconds each (about 30 s in all);
``IMSA_LONG_TESTS=1`` runs 30000 examples per listener within ten minutes each.
"""

import json
import os
import socket
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imdsv2 import TOKEN, TTL, put_token, service_credentials

LONG = os.environ.get("IMSA_LONG_TESTS") == "1"
BUDGET = 600 if LONG else 20
FUZZ = settings(
    max_examples=30000 if LONG else 1500, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def exchange(sock, request, timeout=5):
    """Send raw *request* bytes and read the whole answer (the request says Connection: close): (status, bytes)."""
    sock.settimeout(timeout)
    try:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413, 431) before reading everything: read that answer
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1."), f"no HTTP answer to {request[:300]!r}: {data[:300]!r}"
    return int(data.split(b" ", 2)[1]), data


class Deep:
    """A deeply nested JSON body, kept small in hypothesis's reports."""

    def __init__(self, depth, as_object):
        self.depth, self.as_object = depth, as_object

    def __bytes__(self):
        if self.as_object:
            return b'{"a":' * self.depth + b"1" + b"}" * self.depth
        return b"[" * self.depth + b"]" * self.depth

    def __repr__(self):
        return f"Deep({self.depth}, as_object={self.as_object})"


def build(method, target, headers, body):
    """A raw HTTP/1.1 request; framing (Content-Length, Connection) is always right, everything else is as given."""
    body = bytes(body)
    lines = [method.encode("latin-1") + b" " + target + b" HTTP/1.1"]
    for name, value in headers:
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1"))
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- strategies ---

METHODS = st.one_of(
    st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND", "get", "Get"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'*+-.^_`|~", min_size=1, max_size=12),
)
SEGMENTS = st.one_of(
    st.sampled_from([
        "latest", "meta-data", "iam", "security-credentials", "security-credentials-extended", "role-a", "role-b",
        "info", "api", "token", "instance-id", "placement", "region", "availability-zone", "dynamic",
        "instance-identity", "document", "2021-03-23", "status", "sessions", "activate", "credentials", "stop",
        "..", ".", "%2e%2e", "%2E%2e", "%2e", "%2f", "%2F..%2F", "%00", "%ff", "%", "%zz", "~", ";", "a;b=c",
        "ü", "рол", "😀", "\u202e", "a" * 300,
    ]),
    st.text(min_size=0, max_size=20),
)
QUERIES = st.one_of(st.just(""), st.sampled_from(["?", "?a=b", "?x=%00", "?..=/"]), st.text(max_size=20).map(lambda t: "?" + t))


@st.composite
def targets(draw):
    """A request target: absolute paths with odd segments, doubled slashes, encodings, unicode, or absolute URIs."""
    segments = draw(st.lists(SEGMENTS, max_size=7))
    joiner = draw(st.sampled_from(["/", "/", "/", "//"]))
    prefix = draw(st.sampled_from(["/", "/", "//", "///", "", "http://evil.example/", "http://127.0.0.1/", "*"]))
    text = prefix + joiner.join(segments) + draw(st.sampled_from(["", "/", "//"])) + draw(QUERIES)
    # Unicode goes out as UTF-8 (what a browser would send); spaces and controls would just make it a 400.
    raw = text.encode("utf-8", "surrogatepass")
    return bytes(b for b in raw if b > 0x20 and b != 0x7f) or b"/"


HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f"),
                       max_size=80)
HEADER_NAMES = st.one_of(
    st.sampled_from([TTL, TOKEN, "X-Forwarded-For", "Origin", "Referer", "Content-Type", "Accept", "Expect",
                     "X-aws-ec2-metadata-token-ttl-seconds ", "Forwarded", "X-Real-IP", "Cookie", "Authorization",
                     "X-HTTP-Method-Override", "Upgrade"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=24),
)


# --- IMDS ---


@pytest.fixture
def fuzz_target(active_service):
    """The active service, its valid Host and token, and the secrets it serves (which must never leak)."""
    svc = active_service
    role, creds = service_credentials(svc)
    token = put_token(svc.host, svc.port)
    secrets = [creds["AccessKeyId"].encode(), creds["SecretAccessKey"].encode(), creds["Token"].encode()]
    return svc, f"{svc.host}:{svc.port}", token, secrets


@st.composite
def imds_requests(draw, host, token):
    method = draw(METHODS)
    target = draw(targets())
    headers = []
    host_choice = draw(st.sampled_from(["good", "good", "good", "none", "fuzz", "two"]))
    if host_choice in ("good", "two"):
        headers.append(("Host", host))
    if host_choice in ("fuzz", "two"):
        headers.append(("Host", draw(st.sampled_from([host.upper(), host + ".", host.split(":")[0], "localhost"]) | HEADER_VALUE)))
    token_choice = draw(st.sampled_from(["valid", "valid", "none", "fuzz", "mangled"]))
    if token_choice == "valid":
        headers.append((TOKEN, token))
    elif token_choice == "fuzz":
        headers.append((TOKEN, draw(HEADER_VALUE)))
    elif token_choice == "mangled":
        headers.append((TOKEN, token[:-1] + draw(st.sampled_from("AB_-x"))))
    for _ in range(draw(st.integers(0, 4))):
        headers.append((draw(HEADER_NAMES), draw(HEADER_VALUE)))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=512)))
    return method, target, headers, body


def passes_guards(method, target, headers, host, token):
    """Whether a request satisfies every guard a credentials answer needs (checked after the fact)."""
    names = [name.lower() for name, _ in headers]
    hosts = [value for name, value in headers if name.lower() == "host"]
    tokens = [value for name, value in headers if name.lower() == TOKEN.lower()]
    return (hosts == [host] and "origin" not in names and "referer" not in names and tokens == [token]
            and method in ("GET", "HEAD"))


def check_imds_answer(request, status, data, host, token, secrets):
    method, target, headers, _ = request
    assert status < 500, data[:500]
    leaked = [secret for secret in secrets if secret in data]
    if leaked:
        assert status == 200 and passes_guards(method, target, headers, host, token), (
            f"credentials answered to {build(*request)[:500]!r}")
    tokens = [value for name, value in headers if name.lower() == TOKEN.lower()]
    if token not in tokens and method != "PUT" and status == 200:
        # Without a valid token only the token route itself may answer 200 (OPTIONS lists its methods).
        assert b"/api/token" in target and method == "OPTIONS", data[:300]


def assert_alive_and_correct(svc, role="role-a", key_id=None):
    got_role, creds = service_credentials(svc)
    assert got_role == role
    if key_id:
        assert creds["AccessKeyId"] == key_id
    assert svc.client.status()["pid"] == svc.pid
    time.sleep(0.2)
    log = svc.log()
    assert "Traceback" not in log and "request failed" not in log, log[-3000:]


def test_fuzz_imds_requests(fuzz_target):
    svc, host, token, secrets = fuzz_target
    before = service_credentials(svc)[1]["AccessKeyId"]
    stop_at = time.monotonic() + BUDGET

    @FUZZ
    @given(request=imds_requests(host, token))
    @example(request=("GET", b"/latest/meta-data/iam/security-credentials/role-a/..", [("Host", host), (TOKEN, token)], b""))
    @example(request=("GET", b"/latest/meta-data/iam/security-credentials/%2e%2e/role-a", [("Host", host)], b""))
    @example(request=("PUT", b"/latest/meta-data/iam/security-credentials/role-a", [("Host", host), (TTL, "60")], b""))
    @example(request=("OPTIONS", b"/latest/meta-data/iam/security-credentials/role-a", [("Host", host)], b""))
    @example(request=("GET", b"http://evil.example/latest/meta-data/iam/security-credentials/role-a",
                      [("Host", host), (TOKEN, token), (TOKEN, token)], b""))
    @example(request=("GET", "/latest/meta-data/iam/security-credentials/rôle".encode(), [("Host", host), (TOKEN, token)], b""))
    def one(request):
        if time.monotonic() > stop_at:
            return
        sock = socket.create_connection((svc.host, svc.port))
        status, data = exchange(sock, build(*request))
        check_imds_answer(request, status, data, host, token, secrets)

    one()
    assert_alive_and_correct(svc, key_id=before)


# --- the control socket ---

FINGERPRINTS = st.one_of(st.sampled_from(["0" * 32, "f" * 32, "F" * 32, "0" * 31, "g" * 32, ""]),
                         st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), HEADER_VALUE)
TIMESTAMPS = st.one_of(
    st.sampled_from(["2099-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                     "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2030-02-30T00:00:00Z", "2030-01-01T00:00:00",
                     "2030-01-01T00:00:00+25:00", "now", ""]),
    st.builds(lambda moment, zone: moment.isoformat() + zone, st.datetimes(), st.sampled_from(["Z", "+14:00", "-12:00", ""])),
    HEADER_VALUE,
)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), HEADER_VALUE)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HEADER_VALUE, inner, max_size=4),
                           max_leaves=12)


@st.composite
def control_bodies(draw, roles):
    kind = draw(st.sampled_from(["spec", "session", "json", "deep", "bytes"]))
    if kind == "spec":
        fields = {"profile": st.one_of(st.sampled_from(["a", "x/y", "", "p" * 129]), HEADER_VALUE, JSON_LEAVES),
                  "fingerprint": FINGERPRINTS,
                  "role_arn": st.one_of(st.sampled_from(roles + ["arn:aws:iam::123456789012:role/none", "nope"]), JSON_LEAVES),
                  "role_session_name": st.one_of(st.sampled_from(["ab", "a", "x" * 65]), HEADER_VALUE),
                  "duration_seconds": st.one_of(st.sampled_from([900, 3600, 899, 3601, True, -1, 10 ** 30]), JSON_LEAVES),
                  "external_id": HEADER_VALUE, "region": st.sampled_from(["us-east-1", "xx", ""]),
                  "extra": JSON_VALUES}
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
        return json.dumps({name: draw(fields[name]) for name in chosen}).encode()
    if kind == "session":
        credentials = draw(st.one_of(JSON_VALUES, st.fixed_dictionaries({
            "access_key_id": st.one_of(st.just("ASIAFUZZ0000000000"), JSON_LEAVES),
            "secret_access_key": st.one_of(st.just("s"), JSON_LEAVES),
            "session_token": st.one_of(st.just("t"), JSON_LEAVES),
            "expiration": st.one_of(TIMESTAMPS, JSON_LEAVES),
        }, optional={"issued": st.one_of(TIMESTAMPS, JSON_LEAVES)})))
        return json.dumps({"fingerprint": draw(FINGERPRINTS), "credentials": credentials}).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "deep":
        return Deep(draw(st.integers(10, 150000)), draw(st.booleans()))
    return draw(st.binary(max_size=512))


@st.composite
def control_requests(draw, roles):
    if draw(st.integers(0, 9)) < 7:  # mostly what the CLI sends, with fuzzed bodies: that is where the code is
        method, content_type = "POST", "application/json"
        route = draw(st.sampled_from([b"/sessions", b"/activate", b"/credentials"]))
    else:
        method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]), METHODS))
        route = draw(st.one_of(
            st.sampled_from(["/status", "/sessions", "/activate", "/credentials", "/sessions/" + "0" * 32, "/stop/..",
                             "//status", "/status/", "/%73tatus", "/sessions/%2e%2e/stop"]),
            st.builds(lambda fp: "/sessions/" + fp, FINGERPRINTS),
        ).map(lambda text: text.encode("utf-8", "surrogatepass")) | targets())
        content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                             "application/x-www-form-urlencoded", "application/json; charset=utf-16"]))
    headers = [("Host", draw(st.sampled_from(["localhost", "localhost", "", "evil.example"]))), ("Content-Type", content_type)]
    for _ in range(draw(st.integers(0, 2))):
        headers.append((draw(HEADER_NAMES), draw(HEADER_VALUE)))
    return method, route, headers, draw(control_bodies(roles))


def is_stop(request):
    # POST /stop would (rightly) stop the service the test needs; its refusal rules are tested in test_control.py.
    method, route, _, _ = request
    path = urllib.parse.unquote_to_bytes(route.split(b"?")[0])
    return method == "POST" and b"stop" in path


def check_control_answer(status, data):
    if status == 502:  # STS refused or no session for the profile: an upstream answer, in JSON, by design
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body.get("kind") == "sts" and body.get("error"), data[:500]
        return
    assert status < 500, data[:800]


def test_fuzz_control_socket(active_service, sts_env):
    svc = active_service
    before = service_credentials(svc)[1]["AccessKeyId"]
    roles = sorted(sts_env.roles.values())
    stop_at = time.monotonic() + BUDGET

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(svc.socket)
        return sock

    @FUZZ
    @given(request=control_requests(roles))
    def one(request):
        if is_stop(request) or time.monotonic() > stop_at:
            return
        status, data = exchange(connect(), build(*request))
        check_control_answer(status, data)

    one()
    assert_alive_and_correct(svc, key_id=before)


# --- regressions the fuzzers found ---


def post_control(svc, route, body):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(svc.socket)
    return exchange(sock, build("POST", route.encode(), [("Host", "localhost"), ("Content-Type", "application/json")], body))


@pytest.mark.parametrize("expiration", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.parametrize("field", ["expiration", "issued"])
def test_regression_a_timestamp_beyond_year_1_or_9999_in_utc_was_a_500(service, expiration, field):
    # datetime raises OverflowError (not ValueError) converting these to UTC: the control socket answered 500.
    credentials = {"access_key_id": "ASIAFUZZ0000000000", "secret_access_key": "s", "session_token": "t",
                   "expiration": "2099-01-01T00:00:00Z"}
    credentials[field] = expiration
    status, data = post_control(service, "/sessions", json.dumps({"fingerprint": "a" * 32, "credentials": credentials}).encode())
    assert status == 400 and b"timestamp" in data.split(b"\r\n\r\n", 1)[1], data
    assert service.client.status()["pid"] == service.pid


@pytest.mark.parametrize("route", ["/activate", "/credentials", "/sessions", "/stop"])
def test_regression_deeply_nested_json_was_a_500(service, route):
    # json.loads raises RecursionError (not ValueError) on deep nesting; Flask's silent get_json let it through.
    status, data = post_control(service, route, b"[" * 100000 + b"]" * 100000)
    assert status == 400 and b"JSON" in data, data[:500]
    assert service.client.status()["pid"] == service.pid


@pytest.mark.parametrize("body", [b"\x00\x00", b"\x00{", b"{\x00", b"\x00\x00\x00{", b'\xff\xfe{\x00}\x00'])
@pytest.mark.parametrize("route", ["/activate", "/sessions"])
def test_regression_nul_bytes_in_a_json_body_were_a_500(service, route, body):
    # Handed bytes, json.loads guesses UTF-16 or UTF-32 from NUL bytes; after the privilege drop that codec could
    # not be imported (a stdlib the served user cannot read), and LookupError made a 500. Found by test_fuzz.
    status, data = post_control(service, route, body)
    assert status == 400 and b"JSON" in data, data[:500]
