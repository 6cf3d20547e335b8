"""IAM Roles Anywhere: imsa's AWS4-X509 signer against a strict CreateSession fake (tests/roles_anywhere_fake.py)
that verifies the signature and chain as AWS does and mints through moto; the credentials it returns must be
ones moto authenticates. Every PKI is made per test."""

import datetime
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.parse

import boto3
import pytest

from conftest import (
    SERVICE_UID, answer_on_terminal, one_error_line, run_imsa, run_without_terminal, shared_tmpdir,
)
from roles_anywhere_fake import PROFILE_ARN, REGION, TRUST_ANCHOR_ARN, FakeRolesAnywhere, Pki, now

from imsa.errors import ConfigError
from imsa.sources import roles_anywhere
from imsa.sources.roles_anywhere import Anchor, SessionRefused
from imsa.sts_settings import StsSettings

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture
def pki(tmp_path):
    """A fresh PKI: P-384 root (the trust anchor), RSA intermediate, foreign CA, TLS certificate for 127.0.0.1."""
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki(str(directory))


@pytest.fixture
def fake(pki, sts_server):
    """The strict CreateSession endpoint; its profile lists role-a and role-b."""
    server = FakeRolesAnywhere(pki, sts_server.endpoint, sts_server.users["bob"],
                               [sts_server.roles["role-a"], sts_server.roles["role-b"]]).start()
    yield server
    server.stop()


def anchor(files, fake):
    """The Anchor of a leaf's *files* at the fake."""
    return Anchor(files["certificate"], files["private_key"], TRUST_ANCHOR_ARN, PROFILE_ARN, REGION,
                  files["intermediates"], fake.url)


def settings(pki):
    """StsSettings that trust the test root (how the CLI passes AWS_CA_BUNDLE on)."""
    with open(pki.ca_bundle) as handle:
        return StsSettings(ca_bundle=handle.read(), ca_bundle_path=pki.ca_bundle)


def caller(sts_server, creds):
    """GetCallerIdentity at moto with *creds*: moto checks the signature and the session token."""
    client = boto3.client("sts", endpoint_url=sts_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=creds.access_key_id, aws_secret_access_key=creds.secret_access_key,
                          aws_session_token=creds.session_token)
    return client.get_caller_identity()["Arn"]


LEAVES = {
    "rsa-fullchain": dict(kind="rsa", via="intermediate", form="fullchain"),
    "rsa-separate-intermediates": dict(kind="rsa", via="intermediate", form="separate"),
    "p256-under-root": dict(kind="p256", via="root", form="leaf"),
    "p256-fullchain": dict(kind="p256", via="intermediate", form="fullchain"),
    "p384-signed-with-sha384": dict(kind="p384", via="root", form="leaf", hash_name="sha384"),
    "p384-separate-intermediates": dict(kind="p384", via="intermediate", form="separate"),
}


@pytest.mark.parametrize("case", sorted(LEAVES))
def test_each_key_type_and_chain_form_gets_credentials_moto_authenticates(pki, fake, sts_server, case):
    files = pki.leaf(case, **LEAVES[case])
    creds = anchor(files, fake).create_session(sts_server.roles["role-a"], settings=settings(pki))
    assert caller(sts_server, creds).startswith(f"arn:aws:sts::{sts_server.account}:assumed-role/role-a/")
    expected = "AWS4-X509-RSA-SHA256" if LEAVES[case]["kind"] == "rsa" else "AWS4-X509-ECDSA-SHA256"
    assert fake.sessions[-1]["algorithm"] == expected
    assert fake.sessions[-1]["serial"] == files["cert"].serial_number


def test_the_p384_label_comes_from_the_key_not_the_cas_hash(pki):
    # The PyPI signer's bug (SOURCES.md §3): a SHA-384-signed certificate gave AWS4-X509-ECDSA-SHA384.
    files = pki.leaf("p384", kind="p384", via="root", form="leaf", hash_name="sha384")
    identity = roles_anywhere.load_identity(files["certificate"], files["private_key"])
    headers = roles_anywhere.signed_request(identity, "https://127.0.0.1:1/sessions", b"{}", REGION)
    assert headers["authorization"].startswith("AWS4-X509-ECDSA-SHA256 Credential=")


def send(fake, pki, headers, body):
    """POST /sessions to the fake with exactly *headers* and *body*; (status, message)."""
    context = ssl.create_default_context(cafile=pki.ca_bundle)
    parts = urllib.parse.urlsplit(fake.url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=10)
    try:
        connection.request("POST", "/sessions", body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read()).get("message")
    finally:
        connection.close()


def signed(pki, fake, sts_server, files=None, **kwargs):
    files = files or pki.leaf("leaf", kind="rsa")
    identity = roles_anywhere.load_identity(files["certificate"], files["private_key"], files["intermediates"])
    body = roles_anywhere.session_body(TRUST_ANCHOR_ARN, PROFILE_ARN, sts_server.roles["role-a"], 900)
    return roles_anywhere.signed_request(identity, fake.url + "/sessions", body, REGION, **kwargs), body


def test_an_untampered_request_is_accepted_by_the_same_path(pki, fake, sts_server):
    # The control of the tamper tests below: the same request, sent the same way, unchanged.
    headers, body = signed(pki, fake, sts_server)
    assert send(fake, pki, headers, body)[0] == 201


def test_a_tampered_body_is_refused(pki, fake, sts_server):
    headers, body = signed(pki, fake, sts_server)
    status, message = send(fake, pki, headers, body.replace(b"900", b"3600"))
    assert (status, message) == (403, "the signature does not verify")


def test_a_wrong_serial_is_refused(pki, fake, sts_server):
    headers, body = signed(pki, fake, sts_server)
    serial = headers["authorization"].split("Credential=")[1].split("/")[0]
    headers["authorization"] = headers["authorization"].replace(f"Credential={serial}/", f"Credential={int(serial) + 1}/")
    status, message = send(fake, pki, headers, body)
    assert (status, message) == (403, "the certificate's serial number is not the one in Credential")


def refused(pki, fake, sts_server, files, **kwargs):
    """The SessionRefused line imsa gives for a CreateSession with *files*."""
    with pytest.raises(SessionRefused) as caught:
        anchor(files, fake).create_session(sts_server.roles["role-a"], settings=settings(pki), **kwargs)
    return str(caught.value)


def test_a_stale_date_is_refused_with_a_clear_line(pki, fake, sts_server):
    files = pki.leaf("leaf", kind="p256")
    line = refused(pki, fake, sts_server, files, now=now() - datetime.timedelta(minutes=10))
    assert line.startswith(f"Roles Anywhere refused CreateSession for {sts_server.roles['role-a']} (403): Signature "
                           "expired")


def test_a_foreign_ca_is_refused_with_a_clear_line(pki, fake, sts_server):
    line = refused(pki, fake, sts_server, pki.leaf("foreign", kind="p256", via="foreign", form="leaf"))
    assert line.endswith("(403): untrusted certificate chain: it does not lead to the trust anchor")


def test_a_leaf_without_its_intermediate_is_refused(pki, fake, sts_server):
    line = refused(pki, fake, sts_server, pki.leaf("alone", kind="rsa", form="leaf"))
    assert "untrusted certificate chain" in line


def test_an_expired_leaf_is_refused_with_a_clear_line(pki, fake, sts_server):
    files = pki.leaf("old", kind="rsa", not_before=now() - datetime.timedelta(days=60),
                     not_after=now() - datetime.timedelta(days=1))
    line = refused(pki, fake, sts_server, files)
    assert line.endswith("is not valid now (expired or not yet valid)")


def test_a_role_the_profile_does_not_list_is_refused(pki, fake, sts_server):
    files = pki.leaf("leaf", kind="rsa")
    with pytest.raises(SessionRefused, match="the profile does not list this role"):
        anchor(files, fake).create_session(sts_server.roles["role-c"], settings=settings(pki))


def test_a_key_that_is_not_the_certificates_is_a_config_error(pki):
    one, other = pki.leaf("one", kind="rsa"), pki.leaf("other", kind="rsa")
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        roles_anywhere.load_identity(one["certificate"], other["private_key"])


def test_an_encrypted_key_needs_its_passphrase(pki):
    files = pki.leaf("locked", kind="p384", passphrase="open sesame")
    with pytest.raises(ConfigError, match="is encrypted and no passphrase was given"):
        roles_anywhere.load_identity(files["certificate"], files["private_key"])
    with pytest.raises(ConfigError, match="the passphrase is wrong"):
        roles_anywhere.load_identity(files["certificate"], files["private_key"], passphrase=b"wrong")
    identity = roles_anywhere.load_identity(files["certificate"], files["private_key"], passphrase=b"open sesame")
    assert identity.algorithm == "AWS4-X509-ECDSA-SHA256"


# --- imsa credential-process as a drop-in for aws_signing_helper credential-process ---


def helper_line(program, files, role_arn):
    """needroleshere's README line (aws_signing_helper's options), with *program* in its place."""
    return (f"{program} credential-process --certificate {files['certificate']} --private-key {files['private_key']} "
            f"--trust-anchor-arn {TRUST_ANCHOR_ARN} --profile-arn {PROFILE_ARN} --role-arn {role_arn}")


@pytest.fixture
def helper_env(isolated_env, pki, fake, sts_server):
    """The environment an SDK runs the credential_process in: imsa on PATH, the fake as Roles Anywhere's endpoint
    and the test root trusted (AWS_CA_BUNDLE, as for any AWS endpoint)."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["AWS_ENDPOINT_URL_ROLESANYWHERE"] = fake.url
    env["AWS_CA_BUNDLE"] = pki.ca_bundle
    env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = "us-east-1"
    return env


def test_the_drop_in_line_works_with_only_the_binary_name_changed(isolated_env, pki, fake, sts_server, helper_env):
    files = pki.leaf("server", kind="rsa", form="fullchain")
    role = sts_server.roles["role-b"]
    (isolated_env / ".aws" / "config").write_text(f"[profile ra]\ncredential_process = {helper_line('imsa', files, role)}\n")
    aws = subprocess.run([os.path.join(VENV_BIN, "aws"), "sts", "get-caller-identity", "--profile", "ra",
                          "--endpoint-url", sts_server.endpoint, "--output", "json"],
                         capture_output=True, text=True, env=helper_env, timeout=60, stdin=subprocess.DEVNULL)
    assert aws.returncode == 0, aws.stderr
    assert ":assumed-role/role-b/" in json.loads(aws.stdout)["Arn"]
    code = ("import boto3, sys; print(boto3.Session(profile_name='ra').client('sts', endpoint_url=sys.argv[1])"
            ".get_caller_identity()['Arn'])")
    sdk = subprocess.run([sys.executable, "-c", code, sts_server.endpoint], capture_output=True, text=True,
                         env=helper_env, timeout=60, stdin=subprocess.DEVNULL)
    assert sdk.returncode == 0, sdk.stderr
    assert ":assumed-role/role-b/" in sdk.stdout
    assert len(fake.sessions) == 2


def test_credential_process_prints_version_1_json_with_separate_intermediates(pki, fake, sts_server, helper_env):
    files = pki.leaf("split", kind="p384", form="separate")
    role = sts_server.roles["role-a"]
    done = run_imsa("credential-process", "--certificate", files["certificate"], "--private-key", files["private_key"],
                    "--intermediates", files["intermediates"], "--trust-anchor-arn", TRUST_ANCHOR_ARN,
                    "--profile-arn", PROFILE_ARN, "--role-arn", role, "--session-duration", "900", env=helper_env)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["Version"] == 1 and body["AccountId"] == sts_server.account
    assert set(body) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration", "AccountId"}


def test_credential_process_refusals_are_one_line_with_exit_codes(pki, fake, sts_server, helper_env):
    files = pki.leaf("foreign", kind="p256", via="foreign", form="leaf")
    args = ["credential-process", "--certificate", files["certificate"], "--private-key", files["private_key"],
            "--trust-anchor-arn", TRUST_ANCHOR_ARN, "--profile-arn", PROFILE_ARN, "--role-arn", sts_server.roles["role-a"]]
    done = run_imsa(*args, env=helper_env)
    assert done.returncode == 4 and done.stdout == ""
    assert done.stderr.splitlines() == [f"imsa: error: Roles Anywhere refused CreateSession for "
                                        f"{sts_server.roles['role-a']} (403): untrusted certificate chain: it does "
                                        "not lead to the trust anchor"]
    missing = run_imsa(*args[:-2], env=helper_env)
    assert missing.returncode == 3
    assert missing.stderr == "imsa: error: credential-process: Roles Anywhere needs --role-arn\n"
    both = run_imsa("credential-process", "someprofile", *args[1:], env=helper_env)
    assert both.returncode == 2 and "not both" in both.stderr
    gone = run_imsa(*[word if word != files["private_key"] else "/nonexistent/key.pem" for word in args], env=helper_env)
    assert gone.returncode == 3
    assert gone.stderr == "imsa: error: private key /nonexistent/key.pem cannot be read: No such file or directory\n"


def test_an_encrypted_key_is_opened_with_a_passphrase_typed_on_the_terminal(pki, fake, sts_server, helper_env,
                                                                             monkeypatch):
    for name in ("AWS_ENDPOINT_URL_ROLESANYWHERE", "AWS_CA_BUNDLE"):
        monkeypatch.setenv(name, helper_env[name])
    files = pki.leaf("locked", kind="rsa", passphrase="open sesame")
    args = ["credential-process", "--certificate", files["certificate"], "--private-key", files["private_key"],
            "--trust-anchor-arn", TRUST_ANCHOR_ARN, "--profile-arn", PROFILE_ARN, "--role-arn", sts_server.roles["role-a"]]
    process, prompts, stdout, stderr = answer_on_terminal(args, ["open sesame"])
    assert process.returncode == 0, stderr
    assert prompts == [f"Passphrase for {files['private_key']}: "]
    assert json.loads(stdout)["Version"] == 1
    # Without a terminal (an SDK running it in the background) it says why, and never reads stdin.
    done = run_without_terminal(*args, env=helper_env)
    assert one_error_line(done, 3) == (f"imsa: error: private key {files['private_key']} is encrypted and there is no "
                                       "terminal to ask its passphrase on")


# --- as a source the service mints from: ~/.aws/config profiles with the signing helper's line ---


@pytest.fixture
def service_pki():
    """A PKI in a directory the service's user can reach, its files that user's (the service reads them)."""
    directory = shared_tmpdir("imsa-pki-")
    owner = (SERVICE_UID, SERVICE_UID) if os.geteuid() == 0 else None
    yield Pki(directory, owner)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def short_fake(service_pki, sts_server):
    """The fake, its credentials lasting 20 s: imsa renews them at half that."""
    server = FakeRolesAnywhere(service_pki, sts_server.endpoint, sts_server.users["bob"],
                               [sts_server.roles["role-a"], sts_server.roles["role-b"]], lifetime=20).start()
    yield server
    server.stop()


@pytest.fixture
def ra_env(monkeypatch, service_pki, short_fake):
    """The CLI's environment: the fake as Roles Anywhere's endpoint, the test root trusted."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", short_fake.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", service_pki.ca_bundle)
    return short_fake


def test_a_signing_helper_profile_is_served_and_a_renewed_certificate_is_used_at_the_next_refresh(
        isolated_env, sts_env, service_pki, ra_env, service):
    files = service_pki.leaf("host", kind="p256", form="fullchain")
    role_a, role_c = sts_env.roles["role-a"], sts_env.roles["role-c"]
    (isolated_env / ".aws" / "config").write_text(
        f"[profile ra]\ncredential_process = {helper_line('aws_signing_helper', files, role_a)}\nregion = us-east-1\n"
        f"[profile ra-c]\nrole_arn = {role_c}\nsource_profile = ra\n")
    listed = run_imsa("list", "--json")
    assert listed.returncode == 0, listed.stderr
    done = run_imsa("assume", "ra")
    assert done.returncode == 0, done.stderr
    assert f"new session from Roles Anywhere certificate {files['certificate']}" in done.stderr
    status = service.client.status()
    assert status["active"]["role_arn"] == role_a and status["active"]["source"].startswith("Roles Anywhere")
    assert [s["kind"] for s in status["sessions"]] == ["roles_anywhere"]
    served = imds_credentials(service)
    assert ":assumed-role/role-a/" in caller_of(sts_env, served)
    assert ra_env.sessions[-1]["serial"] == files["cert"].serial_number
    # A chain from it: CreateSession for role-a, then AssumeRole of role-c, on the one session.
    chained = run_imsa("export", "ra-c", "--format", "json")
    assert chained.returncode == 0, chained.stderr
    assert ":assumed-role/role-c/" in caller_of(sts_env, json.loads(chained.stdout))
    # The certificate is renewed on disk (new key, new serial); the service reads it at its next refresh.
    renewed = service_pki.leaf("host", kind="rsa", form="fullchain")
    assert renewed["cert"].serial_number != files["cert"].serial_number
    deadline = time.monotonic() + 40
    while ra_env.sessions[-1]["serial"] != renewed["cert"].serial_number and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ra_env.sessions[-1]["serial"] == renewed["cert"].serial_number
    assert ra_env.sessions[-1]["algorithm"] == "AWS4-X509-RSA-SHA256"
    assert ":assumed-role/role-a/" in caller_of(sts_env, imds_credentials(service))


def imds_credentials(service):
    """What IMDS serves now (IMDSv2, as SDKs ask)."""
    token = http_call(service, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    headers = {"X-aws-ec2-metadata-token": token}
    name = http_call(service, "GET", "/latest/meta-data/iam/security-credentials/", headers).strip()
    return json.loads(http_call(service, "GET", f"/latest/meta-data/iam/security-credentials/{name}", headers))


def http_call(service, method, path, headers):
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        return answer.read().decode()
    finally:
        connection.close()


def caller_of(sts_server, body):
    """GetCallerIdentity at moto with IMDS or credential_process JSON *body*."""
    client = boto3.client("sts", endpoint_url=sts_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=body["AccessKeyId"], aws_secret_access_key=body["SecretAccessKey"],
                          aws_session_token=body.get("Token") or body.get("SessionToken"))
    return client.get_caller_identity()["Arn"]
