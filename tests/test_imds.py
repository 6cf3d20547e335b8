"""The IMDS data plane over real sockets: the token rules, the paths SDKs read, and the guards."""

import calendar
import json
import re
import time

import pytest

from conftest import http, start_service, stop_process

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
CREDS = "/latest/meta-data/iam/security-credentials/"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def get_token(service, ttl="21600"):
    status, headers, body = http(service.host, service.port, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200
    return body.decode()


def get(service, path, token=None, **kwargs):
    headers = {TOKEN: token} if token else {}
    headers.update(kwargs.pop("headers", {}))
    return http(service.host, service.port, "GET", path, headers, **kwargs)


@pytest.mark.parametrize("ttl", ["1", "21600", "300"])
def test_token_put_echoes_the_ttl_it_granted(active_service, ttl):
    status, headers, body = http(active_service.host, active_service.port, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200
    assert headers[TTL] == ttl
    assert headers["Content-Type"].startswith("text/plain")
    assert body and not body.strip() != body, "no whitespace around the token"


@pytest.mark.parametrize("ttl", ["0", "21601", "-1", "1e3", "", "abc", "5.0", "+5", ["60", "60"], None])
def test_token_put_with_a_bad_ttl_is_400(active_service, ttl):
    headers = {} if ttl is None else {TTL: ttl}
    status, _, _ = http(active_service.host, active_service.port, "PUT", "/latest/api/token", headers)
    assert status == 400


# What local proxies and forwarders add to a request they pass on (many add Via alone).
PROXY_HEADERS = {
    "X-Forwarded-For": "10.0.0.1", "Forwarded": "for=10.0.0.1;proto=http", "Via": "1.1 tinyproxy (tinyproxy/1.11.1)",
    "X-Real-IP": "10.0.0.1", "X-Forwarded-Host": "169.254.169.254",
}


@pytest.mark.parametrize("header", sorted(PROXY_HEADERS))
def test_token_put_through_a_forwarder_is_403(active_service, header):
    # Only X-Forwarded-For was refused: a local proxy that adds only Via (tinyproxy by default) passed.
    svc = active_service
    for name in (header, header.lower()):
        status, _, body = http(svc.host, svc.port, "PUT", "/latest/api/token", {TTL: "60", name: PROXY_HEADERS[header]})
        assert status == 403, (name, status, body)
        assert f"{header} not allowed".encode() in body
    assert http(svc.host, svc.port, "PUT", "/latest/api/token", {TTL: "60"})[0] == 200


def test_get_on_the_token_path_is_405_and_versioned_put_is_403(active_service):
    assert http(active_service.host, active_service.port, "GET", "/latest/api/token")[0] == 405
    assert http(active_service.host, active_service.port, "PUT", "/2021-03-23/api/token", {TTL: "60"})[0] == 403


def test_tokens_are_required_by_default(active_service):
    assert get(active_service, CREDS)[0] == 401
    assert get(active_service, CREDS + "role-a")[0] == 401
    assert get(active_service, "/latest/meta-data/instance-id")[0] == 401


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1],
    lambda t: t + "x",
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: "A" * len(t),
    lambda t: t[:16],
    lambda t: "",
])
def test_forged_or_truncated_tokens_are_401(active_service, mangle):
    token = get_token(active_service)
    assert get(active_service, CREDS, mangle(token) or " ")[0] == 401


def test_an_expired_token_is_401(active_service):
    # A 1-second token is valid until at least 1 s after its PUT was sent: an answer received within that second
    # must be 200 (a busy machine may need a few tries to see one); then, polled, it turns 401 and stays so.
    for _ in range(20):
        sent = time.monotonic()
        token = get_token(active_service, "1")
        status = get(active_service, CREDS, token)[0]
        if time.monotonic() - sent < 1:
            assert status == 200
            break
    else:
        pytest.fail("no token PUT and GET within one second in 20 tries")
    deadline = time.monotonic() + 10
    while get(active_service, CREDS, token)[0] == 200:
        assert time.monotonic() < deadline, "a 1-second token still valid after 10 s"
        time.sleep(0.1)
    assert time.monotonic() - sent >= 1, "the token expired before its second"
    assert get(active_service, CREDS, token)[0] == 401


def test_role_list_is_exactly_one_name_with_and_without_slash(active_service):
    token = get_token(active_service)
    for path in (CREDS, CREDS.rstrip("/")):
        status, _, body = get(active_service, path, token)
        assert status == 200
        assert body == b"role-a"


def test_credentials_have_all_seven_fields_and_25_minutes(active_service):
    token = get_token(active_service)
    status, headers, body = get(active_service, CREDS + "role-a", token)
    assert status == 200
    data = json.loads(body)
    assert set(data) == {"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    assert data["Code"] == "Success" and data["Type"] == "AWS-HMAC"
    assert STAMP.match(data["Expiration"]) and STAMP.match(data["LastUpdated"])
    expires = calendar.timegm(time.strptime(data["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
    assert expires - time.time() >= 25 * 60
    assert get(active_service, CREDS + "other-role", token)[0] == 404


def test_doubled_leading_slash_is_served_like_a_single_one(active_service):
    token = get_token(active_service)
    status, _, body = get(active_service, "/" + CREDS, token)
    assert (status, body) == (200, b"role-a")
    status, _, _ = http(active_service.host, active_service.port, "PUT", "//latest/api/token", {TTL: "60"})
    assert status == 200


def test_extended_paths_are_404(active_service):
    token = get_token(active_service)
    assert get(active_service, "/latest/meta-data/iam/security-credentials-extended/", token)[0] == 404
    assert get(active_service, "/latest/meta-data/iam/security-credentials-extended/role-a", token)[0] == 404


def test_instance_paths_and_region_only_when_the_profile_has_one(active_service):
    token = get_token(active_service)
    status, _, body = get(active_service, "/latest/meta-data/instance-id", token)
    assert status == 200 and body.startswith(b"i-")
    status, _, body = get(active_service, "/latest/meta-data/iam/info", token)
    info = json.loads(body)
    assert info["Code"] == "Success" and info["InstanceProfileArn"].endswith(":instance-profile/role-a")
    for path in ("/latest/meta-data/placement/region", "/latest/meta-data/placement/availability-zone",
                 "/latest/dynamic/instance-identity/document"):
        assert get(active_service, path, token)[0] == 404

    from conftest import run_imsa

    assert run_imsa("assume", "r").returncode == 0
    assert get(active_service, "/latest/meta-data/placement/region", token)[2] == b"us-west-2"
    assert get(active_service, "/latest/meta-data/placement/availability-zone/", token)[2] == b"us-west-2a"
    document = json.loads(get(active_service, "/latest/dynamic/instance-identity/document", token)[2])
    assert document["region"] == "us-west-2" and document["accountId"] == "123456789012"


def test_head_is_allowed_on_metadata_paths(active_service):
    token = get_token(active_service)
    assert http(active_service.host, active_service.port, "HEAD", CREDS, {TOKEN: token})[0] == 200


# --- guards ---


@pytest.mark.parametrize("host", [
    "attacker.example", "localhost", "127.0.0.2", "169.254.169.254", "{ip}", "{ip}:1", "{ip}:{port}0", "",
])
def test_a_foreign_host_header_is_refused(active_service, host):
    value = host.format(ip=active_service.host, port=active_service.port)
    status, _, body = http(active_service.host, active_service.port, "PUT", "/latest/api/token", {TTL: "60"},
                           host_header=value or False)
    assert status == 403
    assert b"Host" in body


def test_origin_or_referer_is_refused(active_service):
    token = get_token(active_service)
    for header in ({"Origin": "http://example.com"}, {"Referer": "http://example.com/"}):
        status, _, body = get(active_service, CREDS, token, headers=header)
        assert status == 403 and b"browser" in body
        assert http(active_service.host, active_service.port, "PUT", "/latest/api/token",
                    dict(header, **{TTL: "60"}))[0] == 403


def test_refusals_are_logged_without_secrets(active_service):
    token = get_token(active_service)
    get(active_service, CREDS, token, headers={"Origin": "http://example.com"})
    log = active_service.wait_for_log("browser requests not allowed")
    assert token not in log


def test_no_role_before_assume_is_404(service):
    status, _, body = http(service.host, service.port, "PUT", "/latest/api/token", {TTL: "60"})
    token = body.decode()
    assert get(service, CREDS, token)[0] == 404


def test_allow_imdsv1_serves_tokenless_gets_but_still_checks_given_tokens(isolated_env, sts_env):
    running = start_service(["--allow-imdsv1"])
    try:
        assert get(running, CREDS)[0] == 404  # no role yet, but not 401
        assert get(running, CREDS, "bogus-token-value-that-is-long")[0] == 401
    finally:
        stop_process(running.process)


def test_control_routes_do_not_exist_on_the_tcp_listener(active_service):
    token = get_token(active_service)
    for path in ("/status", "/stop", "/activate", "/sessions", "/credentials"):
        assert get(active_service, path, token)[0] == 404
        status, _, _ = http(active_service.host, active_service.port, "POST", path,
                            {TOKEN: token, "Content-Type": "application/json"}, b"{}")
        assert status in (404, 405)
