"""STS calls and MFA codes, with botocore's Stubber on a real STS client: exact parameters, re-prompts, mfa_process."""

import datetime
import shlex
import sys

import botocore.session
import pytest
from botocore.stub import Stubber

from imsa import sts
from imsa.config import Profile
from imsa.credentials import Credentials
from imsa.errors import MfaError, StsError

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY"
MFA_SERIAL = "arn:aws:iam::123456789012:mfa/alice"
ROLE = "arn:aws:iam::123456789012:role/admin"
REFUSED = "MultiFactorAuthentication failed with invalid MFA one time pass code."
NOW = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)

# One botocore session for the module: its loader keeps the STS model after the first client.
_BOTOCORE = botocore.session.get_session()


def sts_answer(key_id="ASIASESSION000000001", hours=12):
    """A GetSessionToken / AssumeRole response body as botocore returns it."""
    return {
        "Credentials": {
            "AccessKeyId": key_id,
            "SecretAccessKey": "temporary-secret-" + key_id,
            "SessionToken": "token-" + key_id,
            "Expiration": NOW + datetime.timedelta(hours=hours),
        }
    }


class StubbedSts:
    """A real botocore STS client under a Stubber, and a client factory that hands it out and records its calls."""

    def __init__(self):
        self.client = _BOTOCORE.create_client(
            "sts", region_name="us-east-1", aws_access_key_id="AKIAUNUSED0000000000", aws_secret_access_key="unused"
        )
        self.stubber = Stubber(self.client)
        self.factory_calls = []

    def factory(self, access_key_id, secret_access_key, session_token=None, settings=None):
        """Stands in for sts.sts_client; records the region of the settings it was given."""
        self.factory_calls.append((access_key_id, secret_access_key, session_token, settings.region))
        return self.client

    def refuse_mfa(self, times=1):
        """Make the next *times* GetSessionToken calls fail as AWS does for a wrong code."""
        for _ in range(times):
            self.stubber.add_client_error("get_session_token", "AccessDenied", REFUSED, 403)


@pytest.fixture
def stub():
    """A StubbedSts whose every queued response must be used by the end of the test."""
    stubbed = StubbedSts()
    with stubbed.stubber:
        yield stubbed
        stubbed.stubber.assert_no_pending_responses()


def profile(**overrides):
    """A profile with alice's keys and MFA device; *overrides* replace fields."""
    fields = {
        "name": "a",
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "mfa_serial_number": MFA_SERIAL,
        "role_arn": ROLE,
        "role_session_name": "alice",
    }
    fields.update(overrides)
    return Profile(**fields)


class Prompt:
    """An injected prompt: answers from a list and records the texts it was shown."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.texts = []

    def __call__(self, text):
        self.texts.append(text)
        return self.answers.pop(0)


def session_credentials():
    return Credentials("ASIASESSION000000001", "session-secret", "session-token", NOW + datetime.timedelta(hours=12))


# --- exact parameters ---


def test_get_session_token_sends_duration_serial_and_code(stub):
    stub.stubber.add_response(
        "get_session_token",
        sts_answer(),
        {"DurationSeconds": 43200, "SerialNumber": MFA_SERIAL, "TokenCode": "123456"},
    )
    creds = sts.get_session_token(profile(), "123456", stub.factory, now=lambda: NOW)
    assert creds.access_key_id == "ASIASESSION000000001"
    assert creds.expiration == NOW + datetime.timedelta(hours=12)
    assert stub.factory_calls == [(KEY_ID, SECRET, None, "us-east-1")]  # the long-term keys, no token


def test_get_session_token_uses_the_profiles_session_duration_and_region(stub):
    stub.stubber.add_response(
        "get_session_token",
        sts_answer(),
        {"DurationSeconds": 3600, "SerialNumber": MFA_SERIAL, "TokenCode": "654321"},
    )
    sts.get_session_token(profile(session_duration_seconds=3600, region="eu-west-1"), "654321", stub.factory)
    assert stub.factory_calls == [(KEY_ID, SECRET, None, "eu-west-1")]


def test_get_session_token_without_mfa_device_sends_no_serial_or_code(stub):
    stub.stubber.add_response("get_session_token", sts_answer(), {"DurationSeconds": 43200})
    prompt = Prompt()
    sts.new_session(profile(mfa_serial_number=None), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert prompt.texts == []  # no MFA device: nobody is asked


def test_assume_role_sends_arn_session_name_duration_and_external_id(stub):
    stub.stubber.add_response(
        "assume_role",
        sts_answer("ASIAROLE000000000001", hours=1),
        {"RoleArn": ROLE, "RoleSessionName": "alice", "DurationSeconds": 1800, "ExternalId": "ext-42"},
    )
    spec = profile(duration_seconds=1800, external_id="ext-42", region="eu-west-1").role_spec()
    creds = sts.assume_role(session_credentials(), spec, stub.factory)
    assert creds.access_key_id == "ASIAROLE000000000001"
    # The session credentials, with their token, never the long-term keys.
    assert stub.factory_calls == [("ASIASESSION000000001", "session-secret", "session-token", "eu-west-1")]


def test_assume_role_without_external_id_sends_none(stub):
    stub.stubber.add_response(
        "assume_role",
        sts_answer("ASIAROLE000000000001", hours=1),
        {"RoleArn": ROLE, "RoleSessionName": "alice", "DurationSeconds": 3600},
    )
    sts.assume_role(session_credentials(), profile().role_spec(), stub.factory)


def test_assume_role_refused_is_an_sts_error_naming_the_action(stub):
    stub.stubber.add_client_error("assume_role", "AccessDenied", "not authorized to perform sts:AssumeRole", 403)
    with pytest.raises(StsError) as raised:
        sts.assume_role(session_credentials(), profile().role_spec(), stub.factory)
    assert str(raised.value) == "STS AssumeRole failed: AccessDenied: not authorized to perform sts:AssumeRole"
    assert raised.value.exit_code == 4


# --- MFA codes from the prompt ---


def test_code_that_is_not_six_digits_is_asked_again(stub):
    stub.stubber.add_response(
        "get_session_token", sts_answer(), {"DurationSeconds": 43200, "SerialNumber": MFA_SERIAL, "TokenCode": "123456"}
    )
    prompt = Prompt("12345", "12345a", "123456")
    sts.new_session(profile(), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert len(prompt.texts) == 3
    assert MFA_SERIAL in prompt.texts[0] and "6 digits" not in prompt.texts[0]
    assert "6 digits" in prompt.texts[1] and MFA_SERIAL in prompt.texts[1]


def test_typing_no_code_at_all_gives_up_after_a_few_tries(stub):
    prompt = Prompt(*["x"] * sts.MFA_TYPOS)
    with pytest.raises(MfaError, match="6-digit"):
        sts.new_session(profile(), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert len(prompt.texts) == sts.MFA_TYPOS


def test_refused_code_is_asked_again_and_the_next_one_used(stub):
    stub.refuse_mfa()
    stub.stubber.add_response(
        "get_session_token", sts_answer(), {"DurationSeconds": 43200, "SerialNumber": MFA_SERIAL, "TokenCode": "222222"}
    )
    prompt = Prompt("111111", "222222")
    creds = sts.new_session(profile(), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert creds.access_key_id == "ASIASESSION000000001"
    assert len(prompt.texts) == 2


def test_refused_code_three_times_gives_up_with_mfa_error(stub):
    stub.refuse_mfa(times=sts.MFA_ATTEMPTS)
    prompt = Prompt("111111", "222222", "333333", "444444")
    with pytest.raises(MfaError) as raised:
        sts.new_session(profile(), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert len(prompt.texts) == 3 and prompt.answers == ["444444"]
    assert raised.value.exit_code == 4
    message = str(raised.value)
    assert "MFA code" in message and "3 attempts" in message and "\n" not in message


def test_given_code_that_sts_refuses_is_not_retried(stub):
    stub.refuse_mfa()
    prompt = Prompt("222222")
    with pytest.raises(MfaError) as raised:
        sts.new_session(profile(), sts.MfaSource(profile(), given="111111", prompt=prompt), stub.factory)
    assert prompt.texts == []
    assert str(raised.value) == (
        f"STS refused the MFA code (AccessDenied: {REFUSED}); run the command again with the current code"
    )


def test_given_code_that_is_not_six_digits_never_reaches_sts(stub):
    with pytest.raises(MfaError) as raised:
        sts.new_session(profile(), sts.MfaSource(profile(), given="12345"), stub.factory)
    assert "--mfa-token" in str(raised.value) and "6 digits" in str(raised.value)


def test_other_sts_errors_are_not_taken_for_a_wrong_code(stub):
    invalid = "The security token included is invalid."
    stub.stubber.add_client_error("get_session_token", "InvalidClientTokenId", invalid, 403)
    prompt = Prompt("111111", "222222")
    with pytest.raises(StsError) as raised:
        sts.new_session(profile(), sts.MfaSource(profile(), prompt=prompt), stub.factory)
    assert not isinstance(raised.value, MfaError)
    assert len(prompt.texts) == 1
    assert str(raised.value) == f"STS GetSessionToken failed: InvalidClientTokenId: {invalid}"


# --- MFA codes from mfa_process ---


def script(tmp_path, body):
    """A command line that runs *body* as a Python script (no shell involved)."""
    path = tmp_path / "mfa code.py"  # a space, to check the command is split like a shell would
    path.write_text(body)
    return shlex.join([sys.executable, str(path)])


def test_mfa_process_code_is_sent_to_sts(stub, tmp_path):
    command = script(tmp_path, "print('  654321  ')\n")
    stub.stubber.add_response(
        "get_session_token", sts_answer(), {"DurationSeconds": 43200, "SerialNumber": MFA_SERIAL, "TokenCode": "654321"}
    )
    prompt = Prompt()
    with_process = profile(mfa_process=command)
    sts.new_session(with_process, sts.MfaSource(with_process, prompt=prompt), stub.factory)
    assert prompt.texts == []


def test_mfa_process_failure_reports_its_stderr(stub, tmp_path):
    command = script(tmp_path, "import sys\nsys.stderr.write('starting\\nyubikey not inserted\\n')\nsys.exit(1)\n")
    with_process = profile(mfa_process=command)
    with pytest.raises(MfaError) as raised:
        sts.new_session(with_process, sts.MfaSource(with_process, prompt=Prompt()), stub.factory)
    assert str(raised.value).startswith("mfa_process failed: yubikey not inserted (")
    assert raised.value.exit_code == 4


def test_mfa_process_printing_garbage_is_an_mfa_error(stub, tmp_path):
    command = script(tmp_path, "print('no code today')\n")
    with_process = profile(mfa_process=command)
    with pytest.raises(MfaError) as raised:
        sts.new_session(with_process, sts.MfaSource(with_process, prompt=Prompt()), stub.factory)
    assert str(raised.value).startswith("mfa_process did not print a 6-digit code (")
    assert "no code today" not in str(raised.value)


def test_mfa_process_that_does_not_exist(stub, tmp_path):
    with_process = profile(mfa_process=str(tmp_path / "no-such-command"))
    with pytest.raises(MfaError) as raised:
        sts.new_session(with_process, sts.MfaSource(with_process, prompt=Prompt()), stub.factory)
    assert "command not found" in str(raised.value)
    assert "runs without a shell" in str(raised.value)


SHELL_HINT = "mfa_process runs without a shell; for pipes, redirections, ~ or $VARIABLES use: sh -c '...'"


@pytest.mark.parametrize("body", [
    "import sys\nsys.exit(2)\n",  # the '|' and the next command arrive as arguments: a usage error
    "import sys\nprint(' '.join(sys.argv[1:]))\n",  # or are printed back: no 6-digit code
], ids=["fails", "prints-its-arguments"])
def test_a_failing_mfa_process_says_it_runs_without_a_shell(stub, tmp_path, body):
    # Written as in a shell ("... | head -1"); without a shell the pipe is just two more arguments.
    command = script(tmp_path, body) + " | head -1"
    with_process = profile(mfa_process=command)
    with pytest.raises(MfaError) as raised:
        sts.new_session(with_process, sts.MfaSource(with_process, prompt=Prompt()), stub.factory)
    assert str(raised.value).endswith(f"({SHELL_HINT})"), str(raised.value)


def test_an_mfa_process_that_is_not_executable_is_an_mfa_error(stub, tmp_path):
    path = tmp_path / "code.txt"
    path.write_text("123456\n")
    with_process = profile(mfa_process=str(path))
    with pytest.raises(MfaError) as raised:
        sts.new_session(with_process, sts.MfaSource(with_process, prompt=Prompt()), stub.factory)
    assert str(raised.value) == f"mfa_process: cannot run {path}: Permission denied ({SHELL_HINT})"
    assert raised.value.exit_code == 4


def test_given_code_wins_over_mfa_process(stub, tmp_path):
    command = script(tmp_path, "raise SystemExit('must not run')\n")
    stub.stubber.add_response(
        "get_session_token", sts_answer(), {"DurationSeconds": 43200, "SerialNumber": MFA_SERIAL, "TokenCode": "123456"}
    )
    with_process = profile(mfa_process=command)
    sts.new_session(with_process, sts.MfaSource(with_process, given="123456"), stub.factory)
