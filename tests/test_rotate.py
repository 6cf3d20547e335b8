"""imsa rotate against moto's IAM: the new key works, the old one is deleted, the store holds only the new one."""

import os

import boto3
import botocore.exceptions
import pytest
import yaml

from conftest import MFA_CODE, MFA_SERIAL, one_error_line, run_imsa, start_sts, write_profiles
from imsa import secrets
from test_secrets import PASSPHRASE, add_on_terminal


@pytest.fixture
def fresh_sts(monkeypatch):
    """A fake STS + IAM of this test's own: rotating deletes a user's key, which no other test may share."""
    server = start_sts()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", server.endpoint)
    yield server
    server.stop()


@pytest.fixture
def file_store(monkeypatch):
    monkeypatch.setenv(secrets.STORE_VARIABLE, "file")
    monkeypatch.setenv(secrets.PASSPHRASE_VARIABLE, PASSPHRASE)
    secrets._opened.clear()
    yield secrets.default_directory()
    secrets._opened.clear()


def caller(server, key_id, secret):
    return boto3.client("sts", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                        aws_secret_access_key=secret).get_caller_identity()["Arn"]


def test_rotate_replaces_the_key_everywhere(fresh_sts, file_store, isolated_env):
    alice = fresh_sts.users["alice"]
    old_id, old_secret = alice["aws_access_key_id"], alice["aws_secret_access_key"]
    add_on_terminal("work", old_id, old_secret, "--mfa-serial", MFA_SERIAL)
    before = fresh_sts.mark()
    done = run_imsa("rotate", "work", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    # With an MFA device, IAM is called with an MFA session.
    assert fresh_sts.calls("GetSessionToken", before) == 1
    assert fresh_sts.actions(before).count("CreateAccessKey") == 1
    new_id = yaml.safe_load((isolated_env / ".imsa").read_text())["work"]["aws_access_key_id"]
    assert new_id != old_id
    stored_id, new_secret = secrets.get_keys("work")
    assert stored_id == new_id and new_secret != old_secret
    assert len(os.listdir(file_store)) == 1  # only the new key is held
    assert caller(fresh_sts, new_id, new_secret).endswith(":user/alice")
    with pytest.raises(botocore.exceptions.ClientError):
        caller(fresh_sts, old_id, old_secret)
    iam = boto3.client("iam", endpoint_url=fresh_sts.endpoint, region_name="us-east-1", aws_access_key_id=new_id,
                       aws_secret_access_key=new_secret)
    keys = [key["AccessKeyId"] for key in iam.list_access_keys(UserName="alice")["AccessKeyMetadata"]]
    assert keys == [new_id]
    exported = run_imsa("export", "work", "--mfa-token", MFA_CODE)
    assert exported.returncode == 0, exported.stderr


def test_rotate_refuses_plain_keys(isolated_env, sts_env):
    write_profiles(isolated_env / ".imsa", {"p": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
                                                  "aws_secret_access_key": "plain"}})
    done = run_imsa("rotate", "p")
    assert "imsa migrate" in one_error_line(done, 2)
