"""The organisation's defaults: ``*.yaml`` files in ~/.imsa's form under the system directory ($IMSA_SYSTEM_CONFIG_DIR
in tests, /etc/imsa otherwise), merged under the user's ~/.imsa key by key, shown by ``imsa list``, refused whole
when broken or writable by anyone but root."""

import json
import os
import pathlib
import pwd

import pytest
import yaml

from conftest import needs_root, one_error_line, run_imsa, run_without_terminal
from test_oidc import Provider
from test_aws_config import role_of
from test_aws_profiles import caller, imds_fetch
from test_sso import browser


@pytest.fixture
def system_dir(isolated_env):
    """The organisation's directory of this test (what a package would install as /etc/imsa), mode 0755."""
    path = pathlib.Path(os.environ["IMSA_SYSTEM_CONFIG_DIR"])
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def install(directory, name, profiles):
    """Write *profiles* as the organisation's file *name*, 0644 as a package installs it."""
    path = directory / name
    path.write_text(profiles if isinstance(profiles, str) else yaml.safe_dump(profiles))
    path.chmod(0o644)
    return path


def user_profiles(home, profiles):
    path = home / ".imsa"
    path.write_text(yaml.safe_dump(profiles))
    path.chmod(0o600)


@pytest.fixture
def provider(isolated_env, sts_env, monkeypatch, tmp_path):
    found = Provider(sts_env, isolated_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", found.front.endpoint)
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    yield found
    found.stop()


def corp(provider, **changes):
    """The organisation's provider definition."""
    values = {"oidc_discovery_url": provider.fake.discovery_url, "oidc_client_id": "imsa-cli",
              "oidc_roles_url": provider.fake.issuer + "/roles", "region": "eu-west-1"}
    values.update(changes)
    return {"corp": values}


def listing(*args):
    done = run_imsa("list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)}


def test_a_provider_the_organisation_defines_serves_the_users_profile_by_name(provider, system_dir, isolated_env,
                                                                             service, sts_env):
    corp_file = install(system_dir, "corp.yaml", corp(provider))
    user_profiles(isolated_env, {"web-a": {"extends": "corp", "role_arn": provider.roles["a"]}})
    done = run_without_terminal("assume", "web-a")
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"
    rows = listing()
    assert rows["web-a"]["origin"] == str(isolated_env / ".imsa") and rows["web-a"]["kind"] == "web_identity"
    assert rows["web-a"]["region"] == "eu-west-1"
    assert rows["web-a"]["settings"] == {"oidc_discovery_url": str(corp_file), "oidc_client_id": str(corp_file),
                                         "oidc_roles_url": str(corp_file), "region": str(corp_file),
                                         "role_arn": str(isolated_env / ".imsa")}
    assert rows["corp"]["origin"] == str(corp_file)
    text = run_imsa("list")
    assert f"imsa: web-a: oidc_client_id, oidc_discovery_url, oidc_roles_url, region from {corp_file} (the " \
           "organisation's defaults)" in text.stderr


def test_the_users_own_value_wins_key_by_key(provider, system_dir, isolated_env, service, sts_env):
    corp_file = install(system_dir, "corp.yaml", corp(provider, oidc_client_id="someone-elses-client"))
    user_profiles(isolated_env, {"corp": {"oidc_client_id": "imsa-cli", "region": "us-east-1"},
                                 "web-a": {"extends": "corp", "role_arn": provider.roles["a"]}})
    rows = listing()
    assert rows["web-a"]["region"] == "us-east-1"
    assert rows["web-a"]["settings"]["oidc_client_id"] == str(isolated_env / ".imsa")
    assert rows["web-a"]["settings"]["oidc_discovery_url"] == str(corp_file)
    assert rows["corp"]["origin"] == str(isolated_env / ".imsa")
    done = run_without_terminal("assume", "web-a")  # the fake provider knows imsa-cli only
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"


def test_a_later_file_of_the_organisation_wins_and_other_files_are_not_read(isolated_env, system_dir):
    install(system_dir, "10-base.yaml", {"base": {"aws_access_key_id": "AKIAEXAMPLE000000000", "region": "eu-west-1"}})
    install(system_dir, "20-site.yml", {"base": {"region": "eu-central-1"}})
    install(system_dir, "README", "not: [yaml")
    (system_dir / "system").mkdir(mode=0o700)
    install(system_dir / "system", "broken.yaml", "not: [yaml")  # the system mode's own directory: never read
    user_profiles(isolated_env, {"me": {"extends": "base", "aws_secret_access_key": "secret"}})
    assert listing()["me"]["region"] == "eu-central-1"


@pytest.mark.parametrize("text, message", [
    ("corp: [unclosed", "invalid YAML"),
    ("corp:\n  oidc_client_idd: x\n", "profile 'corp', key 'oidc_client_idd': unknown key (did you mean 'oidc_client_id'?)"),
    ("corp:\n  aws_access_key_id: AKIAEXAMPLE000000000\n  aws_secret_access_key: s\n", "must hold no secret key"),
])
def test_a_broken_file_of_the_organisation_is_one_error_naming_it(isolated_env, system_dir, text, message):
    path = install(system_dir, "corp.yaml", text)
    user_profiles(isolated_env, {"me": {"aws_access_key_id": "AKIAEXAMPLE000000000", "aws_secret_access_key": "s"}})
    for args in (["list"], ["assume", "me"]):
        line = one_error_line(run_without_terminal(*args), 3)
        assert line.startswith(f"imsa: error: {path}") and message in line, line


@pytest.mark.parametrize("target, mode", [("file", 0o664), ("file", 0o646), ("directory", 0o775)])
def test_files_others_could_write_are_refused(isolated_env, system_dir, target, mode):
    path = install(system_dir, "corp.yaml", {"base": {"region": "eu-west-1"}})
    (path if target == "file" else system_dir).chmod(mode)
    line = one_error_line(run_without_terminal("list"), 3)
    shown = path if target == "file" else system_dir
    assert f"{shown}: the organisation's defaults must belong to root and be writable by root only" in line, line


@needs_root("needs root: it gives the file to another user")
def test_a_file_owned_by_another_user_is_refused(isolated_env, system_dir):
    path = install(system_dir, "corp.yaml", {"base": {"region": "eu-west-1"}})
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    line = one_error_line(run_without_terminal("list"), 3)
    assert f"{path}: the organisation's defaults must belong to root" in line and f"uid {nobody.pw_uid}" in line


def test_without_a_users_file_the_organisations_profiles_are_listed(isolated_env, system_dir):
    path = install(system_dir, "corp.yaml", {"base": {"aws_access_key_id": "AKIAEXAMPLE000000000"}})
    assert listing()["base"]["origin"] == str(path)


def test_completion_offers_the_organisations_profiles(isolated_env, system_dir):
    install(system_dir, "corp.yaml", {"corp": {"region": "eu-west-1"}})
    user_profiles(isolated_env, {"mine": {"extends": "corp"}})
    from imsa import config

    assert {"corp", "mine"} <= set(config.profile_names())
