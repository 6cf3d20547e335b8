"""moto's server as a strict STS for imsa's tests, run as its own process: ``python tests/sts_server.py``.

It prints one JSON line (endpoint, the users' long-term keys, role ARNs by role name; ``path-role`` has the IAM
path ``/service-role/``) on stdout once it serves, then runs until SIGTERM. Strictness is moto's own IAM
authentication (``INITIAL_NO_AUTH_ACTION_COUNT``): every request's SigV4 signature is checked and the caller's IAM
policies and the role's trust policy are enforced.

moto alone cannot authenticate what its own GetSessionToken returns (one fixed key pair that no principal owns,
and it refuses session tokens on user keys), so in strict mode AssumeRole from an MFA session — imsa's whole
point — would always fail. Two additions close that gap, nothing is loosened:
- GetSessionToken mints a fresh key, secret and token per call, bound to the calling IAM user;
- the authenticator accepts those credentials *with their token*, verifies the signature with their secret, and
  applies the owning user's policies, as AWS does for session credentials.
With ``--mfa-code CODE`` GetSessionToken also refuses any other TokenCode, with AWS's AccessDenied text.

Knobs of the fake STS itself (imsa is not touched), for the fault and soak tests:
- ``--role-lifetime SECONDS``: every AssumeRole answer expires this many seconds after it is issued, whatever
  DurationSeconds asked for (STS's minimum is 900 s); imsa rotates at half the lifetime, so rotations take seconds.
- ``--session-lifetime SECONDS``: the same for GetSessionToken (the MFA session).
- ``--issued-log PATH``: append one JSON line per credentials issued (``action``, ``AccessKeyId``,
  ``SecretAccessKey``, ``SessionToken``, ``Expiration``, and ``RoleArn`` for AssumeRole), so a test can check
  that every triple IMDS served came, whole, from one STS answer for the role it was served as.
Shortened expirations are whole seconds, as real STS sends them.
"""

import argparse
import datetime
import json
import secrets
import signal
import string
import sys
import threading

ACCOUNT = "123456789012"
# carol's keys are for the tests that scan files for a secret: no other test writes them anywhere.
USERS = ("alice", "bob", "carol")
ROLES = ("role-a", "role-b", "role-c", "role-d")
DENIED_ROLE = "role-denied"
# A role with an IAM path: its ARN is arn:aws:iam::ACCOUNT:role/service-role/path-role, its name path-role.
PATH_ROLE = ("/service-role/", "path-role")


def _random(alphabet, length):
    return "".join(secrets.choice(alphabet) for _ in range(length))


class Issued:
    """Where issued credentials are logged (``--issued-log``), one JSON line each, written under a lock."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def record(self, action, key_id, secret, token, expiration, role_arn=None):
        """Append one issued triple (a no-op without --issued-log)."""
        if not self.path:
            return
        line = json.dumps({
            "action": action, "AccessKeyId": key_id, "SecretAccessKey": secret, "SessionToken": token,
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"), "RoleArn": role_arn,
        })
        with self.lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


def _expires_in(seconds):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now + datetime.timedelta(seconds=seconds)


def install_role_knobs(role_lifetime, issued):
    """Shorten AssumeRole lifetimes (--role-lifetime) and log every role triple issued (--issued-log)."""
    from moto.sts.models import STSBackend

    original = STSBackend.assume_role

    def assume_role(self, *args, **kwargs):
        role = original(self, *args, **kwargs)
        if role_lifetime is not None:
            role.expiration = _expires_in(role_lifetime).replace(tzinfo=role.expiration.tzinfo)
        issued.record("AssumeRole", role.access_key_id, role.secret_access_key, role.session_token, role.expiration,
                      role.role_arn)
        return role

    STSBackend.assume_role = assume_role


def install_role_principals():
    """A trust policy that names a role also trusts that role's sessions, as in AWS (role chaining).

    moto compares a caller's ARN with the policy's principals literally, so the session of an assumed role
    (``arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION``) never matched ``arn:aws:iam::ACCOUNT:role/ROLE``.
    """
    from moto.iam.access_control import IAMPolicyStatement

    original = IAMPolicyStatement._check_principal

    def check_principal(self, principal):
        if original(self, principal):
            return True
        parts = principal.split(":", 5)
        if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
            role = parts[5].split("/")[1]
            return original(self, f"arn:{parts[1]}:iam::{parts[4]}:role/{role}")
        return False

    IAMPolicyStatement._check_principal = check_principal


def install_session_credentials(mfa_code, session_lifetime=None, issued=None):
    """Patch moto so that GetSessionToken credentials are real, per-caller and authenticated."""
    from moto.core.responses import ActionResult
    from moto.iam import access_control
    from moto.iam.models import iam_backends
    from moto.sts.exceptions import STSClientError
    from moto.sts.responses import TokenResponse

    sessions = {}

    class SessionAccessKey(access_control.IAMUserAccessKey):
        def __init__(self, account_id, partition, access_key_id, headers):
            self.account_id = account_id
            self.partition = partition
            entry = sessions[access_key_id]
            if headers.get("X-Amz-Security-Token") != entry["token"]:
                raise access_control.CreateAccessKeyFailure(reason="InvalidToken")
            self._owner_user_name = entry["user"]
            self._access_key_id = access_key_id
            self._secret_access_key = entry["secret"]
            self._session_token = entry["token"]

        def create_credentials(self):
            from botocore.credentials import Credentials

            return Credentials(self._access_key_id, self._secret_access_key, self._session_token)

    original_create = access_control.create_access_key

    def create_access_key(account_id, partition, access_key_id, headers):
        if access_key_id in sessions:
            return SessionAccessKey(account_id, partition, access_key_id, headers)
        return original_create(account_id, partition, access_key_id, headers)

    access_control.create_access_key = create_access_key

    def get_session_token(self):
        if mfa_code is not None and self._get_param("TokenCode") != mfa_code:
            raise STSClientError("AccessDenied", "MultiFactorAuthentication failed with invalid MFA one time pass code. ")
        duration = self._get_int_param("DurationSeconds", 43200)
        caller = self.get_access_key()
        user = iam_backends[ACCOUNT]["aws"].get_user_from_access_key_id(caller)
        key_id = "ASIA" + _random(string.ascii_uppercase + string.digits, 16)
        secret = _random(string.ascii_letters + string.digits, 40)
        token = _random(string.ascii_letters + string.digits, 300)
        if session_lifetime is not None:
            expiration = _expires_in(session_lifetime)
        else:
            expiration = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=duration)
        if issued is not None:
            issued.record("GetSessionToken", key_id, secret, token, expiration)
        sessions[key_id] = {"user": user.name if user else "unknown", "secret": secret, "token": token}
        return ActionResult({
            "Credentials": {
                "AccessKeyId": key_id,
                "SecretAccessKey": secret,
                "SessionToken": token,
                "Expiration": expiration,
            }
        })

    TokenResponse.get_session_token = get_session_token


def populate(endpoint):
    """Create the users, their keys and policies, and the roles, while authentication is still off."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIASETUP0000000000",
        aws_secret_access_key="setup",
    )
    keys = {}
    for user in USERS:
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        iam.put_user_policy(
            UserName=user, PolicyName="sts",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "sts:*", "Resource": "*"},
                # Users manage access keys (imsa rotate). moto checks actions only, not the resource, so the
                # self-service policy's "own user" scope cannot be written here.
                {"Effect": "Allow", "Action": ["iam:CreateAccessKey", "iam:DeleteAccessKey", "iam:ListAccessKeys",
                                               "iam:GetUser"], "Resource": "*"}]}),
        )
    # The users, and each of ROLES for role chaining (~/.aws/config: a role whose source is another role).
    trusted = [f"arn:aws:iam::{ACCOUNT}:user/{user}" for user in USERS]
    trusted += [f"arn:aws:iam::{ACCOUNT}:role/{role}" for role in ROLES]
    roles = {}
    for role in ROLES + (DENIED_ROLE,):
        principal = trusted if role != DENIED_ROLE else f"arn:aws:iam::{ACCOUNT}:user/nobody"
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}]}
        roles[role] = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        if role != DENIED_ROLE:  # what a role's credentials may do: assume the next role of a chain, no more
            iam.put_role_policy(
                RoleName=role, PolicyName="chain",
                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                    {"Effect": "Allow", "Action": ["sts:AssumeRole", "sts:GetCallerIdentity"], "Resource": "*"}]}),
            )
    path, name = PATH_ROLE
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole"}]}
    roles[name] = iam.create_role(Path=path, RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    return keys, roles


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mfa-code", default=None, help="the only TokenCode GetSessionToken accepts")
    parser.add_argument("--role-lifetime", type=int, default=None, help="AssumeRole credentials expire after SECONDS")
    parser.add_argument("--session-lifetime", type=int, default=None, help="GetSessionToken credentials expire after SECONDS")
    parser.add_argument("--issued-log", default=None, help="append every issued triple to PATH as JSON lines")
    args = parser.parse_args()

    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    issued = Issued(args.issued_log)
    install_session_credentials(args.mfa_code, args.session_lifetime, issued)
    install_role_knobs(args.role_lifetime, issued)
    install_role_principals()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    keys, roles = populate(endpoint)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    print(json.dumps({"endpoint": endpoint, "account": ACCOUNT, "users": keys, "roles": roles}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
