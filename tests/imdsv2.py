"""A minimal IMDSv2 client over raw sockets for the attack, fuzz, fault and soak tests: exactly what SDKs send.

It uses conftest's ``http()`` (one request per connection, the headers given and nothing else), so a test sees
every status and body as the service sent them.
"""

import json

from conftest import http

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
TOKEN_PATH = "/latest/api/token"
CREDS = "/latest/meta-data/iam/security-credentials/"


class ImdsError(AssertionError):
    """One step of the IMDSv2 sequence did not answer 200."""

    def __init__(self, step, status, body):
        super().__init__(f"{step}: HTTP {status}: {body[:200]!r}")
        self.step = step
        self.status = status
        self.body = body


def put_token(host, port, ttl="21600", timeout=5):
    """PUT /latest/api/token; the token text."""
    status, _, body = http(host, port, "PUT", TOKEN_PATH, {TTL: ttl}, timeout=timeout)
    if status != 200:
        raise ImdsError("token", status, body)
    return body.decode()


def fetch_credentials(host, port, timeout=5):
    """The sequence every SDK runs (token, role list, role): (role name, credentials JSON)."""
    token = put_token(host, port, timeout=timeout)
    status, _, body = http(host, port, "GET", CREDS, {TOKEN: token}, timeout=timeout)
    if status != 200:
        raise ImdsError("role list", status, body)
    role = body.decode()
    status, _, body = http(host, port, "GET", CREDS + role, {TOKEN: token}, timeout=timeout)
    if status != 200:
        raise ImdsError("credentials", status, body)
    data = json.loads(body)
    if data.get("Code") != "Success":
        raise ImdsError("credentials", status, body)
    return role, data


def service_credentials(service, timeout=5):
    """fetch_credentials() against a conftest Service."""
    return fetch_credentials(service.host, service.port, timeout=timeout)
