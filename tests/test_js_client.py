"""The AWS SDK for JavaScript v3, a third real client beside botocore and the aws CLI, gets its role from imsa in
each delivery mode: IMDS, ``imsa exec`` (the container credentials endpoint) and ``credential_process``.

Each test runs tests/js/whoami.mjs (the SDK's default chain, then GetCallerIdentity at the fake STS) and checks
who STS says the caller is, which provider of the chain answered, and which chain variables node saw.

A JS SDK that finds no credentials walks its whole chain, down to IMDS at 169.254.169.254 in this machine's own
network namespace. So every test closes that path: the IMDS test points AWS_EC2_METADATA_SERVICE_ENDPOINT at the
service on loopback (never unset), the others set AWS_EC2_METADATA_DISABLED=true.
"""

import os
import shlex
import sys

from imdsv2 import service_credentials
from jsclient import WHOAMI, node, whoami  # noqa: F401 (node is a fixture)

# Variables that would hand the SDK other credentials than imsa's, had they reached node.
STALE = {"AWS_ACCESS_KEY_ID": "AKIASTALE00000000000", "AWS_SECRET_ACCESS_KEY": "stale", "AWS_SESSION_TOKEN": "stale",
         "AWS_PROFILE": "stale"}


def node_env(sts_env, **values):
    """This test's environment (isolated: no AWS keys, profile or endpoints of the machine's) plus *values*, and the
    fake STS's endpoint for whoami.mjs."""
    return dict(os.environ, WHOAMI_STS_ENDPOINT=sts_env.endpoint, **values)


def assumed(sts_env, role):
    """The ARN STS gives a caller with profile *role*'s credentials (write_config: role-X, session tester-X)."""
    return f"arn:aws:sts::{sts_env.account}:assumed-role/{role}/tester-{role[-1]}"


def test_over_imds_with_a_token_the_js_sdk_gets_the_active_role(active_service, sts_env, node):
    # The loopback service, never unset: without it the chain's last step is the real address. IMDSv1 off: the SDK
    # cannot fall back to tokenless GETs (which the service refuses by default), so it ran the token flow.
    env = node_env(sts_env, AWS_EC2_METADATA_SERVICE_ENDPOINT=active_service.endpoint,
                   AWS_EC2_METADATA_V1_DISABLED="true")
    got = whoami([node, WHOAMI], env)
    assert got["Arn"] == assumed(sts_env, "role-a")
    assert got["provider"] == [], "the chain's IMDS provider tags nothing; another provider answered"
    assert got["env"] == ["AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_V1_DISABLED"]
    _, served = service_credentials(active_service)
    assert got["AccessKeyId"] == served["AccessKeyId"][-4:]


def test_under_imsa_exec_the_js_sdk_gets_the_commands_role_from_the_container_endpoint(active_service, sts_env, node):
    # IMDS disabled: should the endpoint fail, the chain must not go on to the real address. The stale keys and
    # profile given to imsa exec come first in the SDK's chain: imsa removes them from what node gets.
    env = node_env(sts_env, AWS_EC2_METADATA_DISABLED="true", **STALE)
    got = whoami([sys.executable, "-m", "imsa", "exec", "b", "--", node, WHOAMI], env)
    assert got["Arn"] == assumed(sts_env, "role-b")
    assert got["provider"] == ["CREDENTIALS_HTTP"]
    assert got["env"] == ["AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                          "AWS_EC2_METADATA_DISABLED"]
    assert active_service.client.status()["active"]["profile"] == "a"


def test_through_credential_process_the_js_sdk_gets_the_profiles_role_from_the_services_session(
        active_service, sts_env, node, tmp_path):
    # JS runs credential_process through a shell, botocore splits it without one: quote for both.
    config = tmp_path / "aws-config"
    config.write_text(f"[profile c]\ncredential_process = {shlex.quote(sys.executable)} -m imsa credential-process c\n")
    # IMDS disabled: should the process fail, the chain must not go on to the real address.
    env = node_env(sts_env, AWS_CONFIG_FILE=str(config), AWS_PROFILE="c", AWS_EC2_METADATA_DISABLED="true")
    before = sts_env.mark()
    got = whoami([node, WHOAMI], env)
    assert got["Arn"] == assumed(sts_env, "role-c")
    assert got["provider"] == ["CREDENTIALS_PROCESS", "CREDENTIALS_PROFILE_PROCESS"]
    assert got["env"] == ["AWS_PROFILE", "AWS_EC2_METADATA_DISABLED"]
    # The MFA session the service holds since `imsa assume a`: credential-process made no other.
    assert sts_env.calls("GetSessionToken", before) == 0
