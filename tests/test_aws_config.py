"""~/.aws/config and ~/.aws/credentials as a source: botocore's chain rules, imsa's MFA model, clear errors.

The differential tests resolve the same files with boto3 (``boto3.Session(profile_name=…)``) and with imsa, both
against the strict fake STS, and compare the role each ends up with.
"""

import json
import os
import stat
import sys
import textwrap

import pytest

from imsa import sts, sts_settings
from imsa.errors import ConfigError
from imsa.sources import aws_config
from imsa.sources.environment import Environment
from imsa.sources.iam_user import Keys
from imsa.sources.process import Process

from conftest import MFA_SERIAL, start_sts

ROLE = "arn:aws:iam::123456789012:role/{}"
KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def write_aws(home, config="", credentials=""):
    """Write ~/.aws/config and ~/.aws/credentials under *home* (0600) and return their paths."""
    directory = home / ".aws"
    directory.mkdir(exist_ok=True)
    paths = []
    for name, text in (("config", config), ("credentials", credentials)):
        path = directory / name
        path.write_text(textwrap.dedent(text))
        path.chmod(0o600)
        paths.append(path)
    return paths


def resolve(name, environ=None):
    return aws_config.load(environ).get(name, environ)


@pytest.fixture
def keys_home(isolated_env):
    """A home whose credentials file has long-term keys under [base]."""
    write_aws(isolated_env, credentials=f"[base]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    return isolated_env


def add_config(home, text):
    (home / ".aws" / "config").write_text(textwrap.dedent(text))


# --- resolution ---


def test_three_hop_chain_is_one_mfa_session_then_two_roles(keys_home):
    add_config(keys_home, f"""
        [profile a]
        role_arn = {ROLE.format('a')}
        source_profile = base
        mfa_serial = {MFA_SERIAL}
        external_id = ext-123
        role_session_name = alice-a
        [profile b]
        role_arn = {ROLE.format('b')}
        source_profile = a
        region = eu-west-1
    """)
    b = resolve("b")
    assert [hop.role_arn for hop in b.hops] == [ROLE.format("a"), ROLE.format("b")]
    assert b.hops[0].external_id == "ext-123" and b.hops[0].role_session_name == "alice-a"
    assert b.region == "eu-west-1" and b.origin == str(keys_home / ".aws" / "config")
    assert isinstance(b.source, Keys) and b.source.mfa_serial_number == MFA_SERIAL
    assert b.source.aws_access_key_id == KEY
    # a and b share the session: same keys, same device
    assert resolve("a").fingerprint == b.fingerprint
    spec = b.role_spec()
    assert spec["role_arn"] == ROLE.format("b") and [hop["role_arn"] for hop in spec["via"]] == [ROLE.format("a")]
    assert SECRET not in json.dumps(spec)


def test_same_keys_and_device_in_imsa_and_aws_config_share_one_session(keys_home):
    from imsa.config import Profile

    add_config(keys_home, f"[profile a]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nmfa_serial = {MFA_SERIAL}\n")
    imsa_profile = Profile(name="x", aws_access_key_id=KEY, aws_secret_access_key=SECRET, mfa_serial_number=MFA_SERIAL)
    assert resolve("a").fingerprint == imsa_profile.fingerprint


def test_mfa_serial_on_the_keys_profile_counts_for_the_whole_chain(isolated_env):
    write_aws(isolated_env, config=f"""
        [profile base]
        mfa_serial = {MFA_SERIAL}
        [profile a]
        role_arn = {ROLE.format('a')}
        source_profile = base
    """, credentials=f"[base]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    assert resolve("a").source.mfa_serial_number == MFA_SERIAL


def test_two_devices_on_one_chain_are_refused_naming_both(keys_home):
    add_config(keys_home, f"""
        [profile a]
        role_arn = {ROLE.format('a')}
        source_profile = base
        mfa_serial = {MFA_SERIAL}
        [profile b]
        role_arn = {ROLE.format('b')}
        source_profile = a
        mfa_serial = arn:aws:iam::123456789012:mfa/other
    """)
    with pytest.raises(ConfigError, match=r"\[profile b\], key 'mfa_serial'.*mfa/other differs from .*mfa/alice"):
        resolve("b")


def test_self_source_uses_the_profiles_own_keys(isolated_env):
    write_aws(isolated_env, config=f"[profile self]\nrole_arn = {ROLE.format('a')}\nsource_profile = self\n",
              credentials=f"[self]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    profile = resolve("self")
    assert [hop.role_arn for hop in profile.hops] == [ROLE.format("a")]
    assert profile.source.aws_access_key_id == KEY


def test_a_source_with_keys_and_a_role_uses_its_keys(isolated_env):
    write_aws(isolated_env, config=f"""
        [profile mid]
        role_arn = {ROLE.format('mid')}
        source_profile = mid
        [profile top]
        role_arn = {ROLE.format('top')}
        source_profile = mid
    """, credentials=f"[mid]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    assert [hop.role_arn for hop in resolve("top").hops] == [ROLE.format("top")]


@pytest.mark.parametrize("config, message", [
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = l2\n"
     f"[profile l2]\nrole_arn = {ROLE.format('b')}\nsource_profile = l1\n",
     r"\[profile l2\], key 'source_profile': infinite loop .*l1 -> l2 -> l1"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = l1\n",
     r"\[profile l1\], key 'source_profile': infinite loop"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\ncredential_source = Environment\n",
     r"\[profile l1\]: has both source_profile and credential_source"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = nowhere\n",
     r"\[profile l1\], key 'source_profile': the source_profile 'nowhere' does not exist"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\n",
     r"\[profile l1\], key 'role_arn': a role needs source_profile or credential_source"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\ncredential_source = Laptop\n",
     r"key 'credential_source': 'Laptop' is not a valid credential source"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\ncredential_source = Ec2InstanceMetadata\n",
     r"Ec2InstanceMetadata is where imsa itself serves"),
    ("[profile l1]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = base\n",
     r"\[profile l1\], key 'role_arn': 'arn:aws:iam::1:role/x' is not an IAM role ARN"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nduration_seconds = soon\n",
     r"key 'duration_seconds': must be a whole number of seconds, not 'soon'"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nduration_seconds = 50000\n",
     r"key 'duration_seconds': must be between 900 and 43200"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nregion = moon\n",
     r"key 'region': 'moon' is not a region name"),
    (f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nrole_session_name = a b\n",
     r"key 'role_session_name'"),
    ("[profile l1]\nsso_session = corp\nsso_account_id = 123456789012\n",
     r"\[profile l1\], key 'sso_session': there is no \[sso-session corp\] section"),
    ("[sso-session corp]\nsso_region = us-east-1\n[profile l1]\nsso_session = corp\nsso_account_id = 123456789012\n"
     "sso_role_name = Admin\n", r"\[sso-session corp\]: sso_start_url is missing"),
    ("[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n"
     "[profile l1]\nsso_session = corp\nsso_account_id = 123456789012\n",
     r"\[profile l1\], key 'sso_role_name': missing"),
    ("[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n"
     "[profile l1]\nsso_session = corp\nsso_account_id = 12345\nsso_role_name = Admin\n",
     r"\[profile l1\], key 'sso_account_id': '12345' is not a 12-digit account id"),
    ("[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n"
     "[profile l1]\nsso_session = corp\nsso_region = eu-west-1\nsso_account_id = 123456789012\n"
     "sso_role_name = Admin\n", r"\[profile l1\], key 'sso_region': differs from sso_region of \[sso-session corp\]"),
    ("[profile l1]\nsso_start_url = ftp://corp\nsso_region = us-east-1\nsso_account_id = 123456789012\n"
     "sso_role_name = Admin\n", r"\[profile l1\], key 'sso_start_url': must be an http:// or https:// URL"),
    (f"[profile sso]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n"
     f"sso_account_id = 123456789012\nsso_role_name = Admin\n"
     f"[profile l1]\nrole_arn = {ROLE.format('a')}\nsource_profile = sso\nmfa_serial = {MFA_SERIAL}\n",
     r"\[profile sso\]: mfa_serial on a chain from IAM Identity Center"),
    ("[profile l1]\nregion = us-east-1\n", r"\[profile l1\]: has no credentials"),
])
def test_config_errors_name_file_section_and_key(keys_home, config, message):
    add_config(keys_home, config)
    with pytest.raises(ConfigError, match=message) as raised:
        resolve("l1")
    assert str(raised.value).startswith(str(keys_home / ".aws"))


def test_partial_and_temporary_keys_in_the_credentials_file_are_refused(isolated_env):
    write_aws(isolated_env, config=f"[profile a]\nrole_arn = {ROLE.format('a')}\nsource_profile = half\n"
                                   f"[profile b]\nrole_arn = {ROLE.format('a')}\nsource_profile = temp\n",
              credentials=f"[half]\naws_access_key_id = {KEY}\n"
                          f"[temp]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\naws_session_token = T\n")
    credentials = isolated_env / ".aws" / "credentials"
    with pytest.raises(ConfigError, match=rf"{credentials}: \[half\], key 'aws_secret_access_key': missing"):
        resolve("a")
    with pytest.raises(ConfigError, match=r"\[temp\], key 'aws_session_token': temporary keys in a file carry no"):
        resolve("b")


def test_a_secret_never_appears_in_an_error(isolated_env):
    write_aws(isolated_env, credentials=f"[bad]\naws_access_key_id = not-a-key\naws_secret_access_key = {SECRET}\n")
    with pytest.raises(ConfigError) as raised:
        resolve("bad")
    assert SECRET not in str(raised.value) and "not-a-key" not in str(raised.value)


def test_long_durations_are_cut_to_the_chaining_hour_with_a_note(keys_home):
    add_config(keys_home, f"[profile a]\nrole_arn = {ROLE.format('a')}\nsource_profile = base\nduration_seconds = 7200\n")
    profile = resolve("a")
    assert profile.hops[0].duration_seconds == 3600
    assert len(profile.notes) == 1 and "7200" in profile.notes[0] and "role-chaining" in profile.notes[0]


def test_environment_and_files_honour_the_aws_variables(isolated_env, tmp_path):
    config, credentials = tmp_path / "cfg", tmp_path / "creds"
    config.write_text(f"[profile e]\nrole_arn = {ROLE.format('a')}\ncredential_source = Environment\n")
    credentials.write_text("")
    environ = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
               "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    profile = resolve("e", environ)
    assert isinstance(profile.source, Environment) and profile.origin == str(config)
    # long-term keys from the environment share the session of the same keys anywhere else
    assert profile.fingerprint == Keys(KEY, SECRET).fingerprint
    temporary = dict(environ, AWS_SESSION_TOKEN="token")
    with pytest.raises(ConfigError, match="without AWS_CREDENTIAL_EXPIRATION"):
        resolve("e", temporary)
    del environ["AWS_ACCESS_KEY_ID"]
    with pytest.raises(ConfigError, match=r"\[profile e\], key 'credential_source': .*AWS_ACCESS_KEY_ID"):
        resolve("e", environ)


def test_process_root_fingerprint_needs_no_run_and_hides_arguments(isolated_env):
    write_aws(isolated_env, config="[profile p]\ncredential_process = /opt/vault/get --password hunter2\n"
                                   f"[profile r]\nrole_arn = {ROLE.format('a')}\nsource_profile = p\n")
    profile = resolve("r")
    assert isinstance(profile.source, Process)
    assert profile.source.label == "credential_process get" and "hunter2" not in repr(profile.role_spec())


def test_broken_ini_names_the_file(isolated_env):
    write_aws(isolated_env, config="[profile a\nrole_arn = x\n")
    with pytest.raises(ConfigError, match=r"\.aws/config: cannot be parsed"):
        aws_config.load()


def test_missing_files_mean_no_profiles(isolated_env):
    assert aws_config.load().names == []


# --- against the strict fake STS ---


def signers(sts_server, since):
    """(Action, signing key id, form parameters) of each request the fake STS recorded after *since*."""
    import base64
    import urllib.parse

    found = []
    with open(sts_server.recording, "rb") as handle:
        handle.seek(since)
        for line in handle.read().decode().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            params = {key: values[0] for key, values in urllib.parse.parse_qs(body).items()}
            authorization = {key.lower(): value for key, value in entry["headers"].items()}.get("authorization", "")
            key_id = authorization.split("Credential=", 1)[-1].split("/", 1)[0]
            found.append((params.get("Action"), key_id, params))
    return found


def imsa_identity(name, environ=None, mfa=None):
    """The ARN GetCallerIdentity names with the credentials imsa makes for *name* (session, then the hops)."""
    import boto3

    profile = resolve(name, environ)
    settings = sts_settings.resolve()
    session = profile.source.new_session(mfa or sts.MfaSource(profile.source, "123456"), settings)
    creds = sts.assume_chain(session, dict(profile.role_spec(), sts=settings)) if profile.hops else session
    client = boto3.client("sts", region_name="us-east-1", aws_access_key_id=creds.access_key_id,
                          aws_secret_access_key=creds.secret_access_key, aws_session_token=creds.session_token)
    return client.get_caller_identity()["Arn"]


def boto3_identity(name):
    import boto3

    return boto3.Session(profile_name=name).client("sts", region_name="us-east-1").get_caller_identity()["Arn"]


def role_of(arn):
    """``assumed-role/NAME`` of an assumed-role ARN (the session name differs by design: imsa-USER vs botocore's)."""
    return "/".join(arn.split(":")[5].split("/")[:2])


@pytest.fixture(scope="module")
def sts_without_mfa():
    """A fake STS whose GetSessionToken takes no MFA code: the chains compared with boto3 have no device."""
    server = start_sts(mfa_code=None)
    yield server
    server.stop()


@pytest.fixture
def shapes(isolated_env, sts_without_mfa, monkeypatch, tmp_path):
    """~/.aws files with one profile per shape, on alice's keys, for the fake STS's roles."""
    sts_env = sts_without_mfa
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts_env.endpoint)
    alice = sts_env.users["alice"]
    roles = sts_env.roles
    process = tmp_path / "keys-process"
    process.write_text("#!/bin/sh\n" + "printf '%s\\n' '" + json.dumps({
        "Version": 1, "AccessKeyId": alice["aws_access_key_id"],
        "SecretAccessKey": alice["aws_secret_access_key"]}) + "'\n")
    process.chmod(stat.S_IRWXU)
    write_aws(isolated_env, config=f"""
        [profile a]
        role_arn = {roles['role-a']}
        source_profile = base
        [profile chain]
        role_arn = {roles['role-b']}
        source_profile = a
        [profile self]
        role_arn = {roles['role-c']}
        source_profile = self
        [profile env]
        role_arn = {roles['role-d']}
        credential_source = Environment
        [profile proc]
        credential_process = {process}
        [profile from-proc]
        role_arn = {roles['role-b']}
        source_profile = proc
        [profile ext]
        role_arn = {roles['role-c']}
        source_profile = base
        external_id = ext-123
        [profile long]
        role_arn = {roles['role-d']}
        source_profile = base
        duration_seconds = 7200
        [profile keys-and-role]
        role_arn = {roles['role-a']}
        source_profile = self
        [profile loop1]
        role_arn = {roles['role-a']}
        source_profile = loop2
        [profile loop2]
        role_arn = {roles['role-b']}
        source_profile = loop1
        [profile both]
        role_arn = {roles['role-a']}
        source_profile = base
        credential_source = Environment
        [profile orphan]
        role_arn = {roles['role-a']}
        source_profile = nowhere
    """, credentials=f"""
        [base]
        aws_access_key_id = {alice['aws_access_key_id']}
        aws_secret_access_key = {alice['aws_secret_access_key']}
        [self]
        aws_access_key_id = {alice['aws_access_key_id']}
        aws_secret_access_key = {alice['aws_secret_access_key']}
    """)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", alice["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", alice["aws_secret_access_key"])
    return sts_env


ROLE_SHAPES = {  # profile -> the fake STS's role it ends in
    "a": "role-a", "chain": "role-b", "self": "role-c", "env": "role-d", "from-proc": "role-b", "ext": "role-c",
    "long": "role-d", "keys-and-role": "role-a",
}


@pytest.mark.parametrize("name", sorted(ROLE_SHAPES))
def test_imsa_ends_in_the_role_boto3_resolves(shapes, name):
    expected = f"assumed-role/{ROLE_SHAPES[name]}"
    assert role_of(boto3_identity(name)) == expected
    assert role_of(imsa_identity(name)) == expected


@pytest.mark.parametrize("name, botocore_error, imsa_message", [
    ("loop1", "InfiniteLoopConfigError", "infinite loop"),
    ("both", "InvalidConfigError", "has both source_profile and credential_source"),
    ("orphan", "InvalidConfigError", "does not exist"),
])
def test_imsa_refuses_what_boto3_refuses(shapes, name, botocore_error, imsa_message):
    with pytest.raises(Exception) as boto3_raised:
        boto3_identity(name)
    assert type(boto3_raised.value).__name__ == botocore_error
    with pytest.raises(ConfigError, match=imsa_message):
        imsa_identity(name)


def test_the_chain_is_one_session_then_assume_role_hops(shapes):
    """external_id goes on its hop; GetSessionToken is signed by the root keys, each AssumeRole by the previous."""
    alice = shapes.users["alice"]["aws_access_key_id"]
    mark = shapes.mark()
    imsa_identity("chain")
    calls = [(action, key, params) for action, key, params in signers(shapes, mark) if action != "GetCallerIdentity"]
    assert [action for action, _, _ in calls] == ["GetSessionToken", "AssumeRole", "AssumeRole"]
    assert calls[0][1] == alice and "SerialNumber" not in calls[0][2]
    assert calls[1][1].startswith("ASIA") and calls[1][2]["RoleArn"] == shapes.roles["role-a"]
    assert calls[2][1] not in (alice, calls[1][1]) and calls[2][2]["RoleArn"] == shapes.roles["role-b"]
    assert all("SerialNumber" not in params and "TokenCode" not in params for _, _, params in calls[1:])


def test_process_with_temporary_credentials_is_the_session(isolated_env, sts_env, tmp_path):
    """A credential_process that prints temporary credentials: no GetSessionToken, AssumeRole signed by them."""
    import boto3

    alice = sts_env.users["alice"]
    temporary = boto3.client("sts", region_name="us-east-1", aws_access_key_id=alice["aws_access_key_id"],
                             aws_secret_access_key=alice["aws_secret_access_key"]).get_session_token(
        SerialNumber=MFA_SERIAL, TokenCode="123456")["Credentials"]
    process = tmp_path / "session-process"
    process.write_text(f"#!{sys.executable}\nimport json\nprint(json.dumps({{'Version': 1, "
                       f"'AccessKeyId': {temporary['AccessKeyId']!r}, 'SecretAccessKey': "
                       f"{temporary['SecretAccessKey']!r}, 'SessionToken': {temporary['SessionToken']!r}, "
                       f"'Expiration': {temporary['Expiration'].isoformat()!r}}}))\n")
    process.chmod(stat.S_IRWXU)
    write_aws(isolated_env, config=f"[profile p]\ncredential_process = {process}\n"
                                   f"[profile r]\nrole_arn = {sts_env.roles['role-a']}\nsource_profile = p\n")
    mark = sts_env.mark()
    assert role_of(imsa_identity("r")) == "assumed-role/role-a"
    calls = [(action, key) for action, key, _ in signers(sts_env, mark) if action != "GetCallerIdentity"]
    assert calls == [("AssumeRole", temporary["AccessKeyId"])]


def test_a_failing_process_is_one_line(isolated_env, sts_env, tmp_path):
    process = tmp_path / "broken"
    process.write_text("#!/bin/sh\necho not json\n")
    process.chmod(stat.S_IRWXU)
    write_aws(isolated_env, config=f"[profile p]\ncredential_process = {process} --flag\n")
    with pytest.raises(Exception, match=r"\[profile p\], key 'credential_process': credential_process broken did "
                                        r"not print JSON"):
        imsa_identity("p")
    assert os.path.exists(process)

