"""~/.imsa: every configuration error names file, line, profile and key, exits 3, and never shows the secret."""

import os
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import MFA_CODE, one_error_line, run_imsa, write_config
from imsa import config
from imsa.errors import ConfigError

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY"
MFA_SERIAL = "arn:aws:iam::123456789012:mfa/alice"
ROLE = "arn:aws:iam::123456789012:role/admin"

# Lines 1-4; the profiles a test adds start on line 5.
BASE = f"""\
base:
  aws_access_key_id: {KEY_ID}
  aws_secret_access_key: {SECRET}
  mfa_serial_number: {MFA_SERIAL}
"""


def write(home, text, mode=0o600):
    """Write *text* as the config file; returns its path as a string."""
    path = home / ".imsa"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def config_error(home, text, profile=None):
    """The ConfigError message load() (or get(*profile*)) raises for *text*; checks it never shows the secret."""
    path = write(home, text)
    with pytest.raises(ConfigError) as raised:
        loaded = config.load(path)
        if profile is not None:
            loaded.get(profile)
    message = str(raised.value)
    assert raised.value.exit_code == 3
    assert SECRET not in message and SECRET[:8] not in message
    assert len(message.splitlines()) == 1, message
    return message


def assert_names(message, path, line, profile, key):
    """The message starts with ``path:line: profile 'P', key 'K'``."""
    assert message.startswith(f"{path}:{line}: profile {profile!r}, key {key!r}: "), message


def assert_cli_config_error(profile="x", *extra):
    """``imsa assume PROFILE`` exits 3 with one ``imsa: error:`` line and no traceback; returns that line."""
    done = run_imsa("assume", profile, *extra)
    line = one_error_line(done, 3)
    assert SECRET not in done.stderr
    return line


# --- one test per error ---


def test_broken_yaml_names_the_file_and_line(isolated_env):
    text = BASE + "a:\n  extends: base\n  role_arn: a: b\n"
    message = config_error(isolated_env, text)
    assert message.startswith(f"{isolated_env / '.imsa'}:7: invalid YAML: ")
    assert "mapping values are not allowed" in message
    line = assert_cli_config_error("a")
    assert ".imsa:7: invalid YAML" in line


def test_unknown_key_suggests_the_closest_known_key(isolated_env):
    text = BASE + f"a:\n  extends: base\n  role_ar: {ROLE}\n"
    message = config_error(isolated_env, text)
    assert_names(message, isolated_env / ".imsa", 7, "a", "role_ar")
    assert "unknown key" in message and "did you mean 'role_arn'?" in message
    line = assert_cli_config_error("a")
    assert "key 'role_ar'" in line and "'role_arn'" in line


def test_string_where_a_number_of_seconds_is_expected(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: base\n  duration_seconds: '3600'\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "duration_seconds")
    assert "whole number of seconds" in message and "str" in message


def test_number_where_a_string_is_expected(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: base\n  role_session_name: 12345\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "role_session_name")
    assert "must be a string, not int" in message
    assert_cli_config_error("a")


def test_boolean_duration_is_not_taken_as_a_number(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: base\n  duration_seconds: true\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "duration_seconds")
    assert "not bool" in message


def test_secret_of_the_wrong_type_is_not_echoed(isolated_env):
    text = f"a:\n  aws_access_key_id: {KEY_ID}\n  aws_secret_access_key: [{SECRET}]\n"
    message = config_error(isolated_env, text)
    assert_names(message, isolated_env / ".imsa", 3, "a", "aws_secret_access_key")
    assert "must be a string, not list" in message


def test_extends_cycle_between_two_profiles(isolated_env):
    text = BASE + "a:\n  extends: b\nb:\n  extends: a\n"
    message = config_error(isolated_env, text)
    assert_names(message, isolated_env / ".imsa", 6, "a", "extends")
    assert "extends cycle 'a' -> 'b' -> 'a'" in message
    line = assert_cli_config_error("a")
    assert "cycle" in line


def test_extends_cycle_of_a_profile_with_itself(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: a\n")
    assert_names(message, isolated_env / ".imsa", 6, "a", "extends")
    assert "extends cycle 'a' -> 'a'" in message


def test_extends_cycle_is_reported_at_a_profile_on_the_loop(isolated_env):
    # c only leads into the loop; the error points at the loop itself.
    text = BASE + "c:\n  extends: a\na:\n  extends: b\nb:\n  extends: a\n"
    message = config_error(isolated_env, text)
    assert_names(message, isolated_env / ".imsa", 8, "a", "extends")
    assert "extends cycle 'a' -> 'b' -> 'a'" in message


def test_extends_a_missing_parent(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: bsae\n")
    assert_names(message, isolated_env / ".imsa", 6, "a", "extends")
    assert "unknown profile 'bsae'" in message
    assert_cli_config_error("a")


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::12345:role/admin",
        "arn:aws:iam::123456789012:user/admin",
        "admin",
        "arn:aws:iam::123456789012:role/",
    ],
)
def test_bad_role_arn(isolated_env, arn):
    message = config_error(isolated_env, BASE + f"a:\n  extends: base\n  role_arn: '{arn}'\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "role_arn")
    assert "IAM role ARN" in message and repr(arn) in message


@pytest.mark.parametrize("name", ["x", "x" * 65, "alice smith"], ids=["1-char", "65-chars", "space"])
def test_session_name_outside_sts_rules(isolated_env, name):
    message = config_error(isolated_env, BASE + f"a:\n  extends: base\n  role_session_name: '{name}'\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "role_session_name")
    assert "2-64 characters" in message


@pytest.mark.parametrize("name", ["xy", "x" * 64, "alice.smith@example.com"])
def test_session_names_sts_accepts_are_accepted(isolated_env, name):
    path = write(isolated_env, BASE + f"a:\n  extends: base\n  role_session_name: '{name}'\n")
    assert config.load(path).get("a").session_name == name


def test_role_duration_over_an_hour_explains_role_chaining(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: base\n  duration_seconds: 7200\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", "duration_seconds")
    assert "between 900 and 3600" in message and "role chaining" in message
    line = assert_cli_config_error("a")
    assert "role chaining" in line


@pytest.mark.parametrize("seconds", [899, 129601, 0, -1])
def test_session_duration_outside_900_to_129600(isolated_env, seconds):
    message = config_error(isolated_env, BASE.replace("base:\n", f"base:\n  session_duration_seconds: {seconds}\n"))
    assert_names(message, isolated_env / ".imsa", 2, "base", "session_duration_seconds")
    assert "between 900 and 129600" in message


@pytest.mark.parametrize("seconds", [900, 129600])
def test_session_duration_limits_are_inclusive(isolated_env, seconds):
    path = write(isolated_env, BASE.replace("base:\n", f"base:\n  session_duration_seconds: {seconds}\n"))
    assert config.load(path).get("base").session_duration_seconds == seconds


@pytest.mark.parametrize("missing", ["aws_access_key_id", "aws_secret_access_key"])
def test_missing_long_term_key_is_named(isolated_env, missing):
    text = "".join(line + "\n" for line in BASE.splitlines() if not line.strip().startswith(missing))
    text += f"a:\n  extends: base\n  role_arn: {ROLE}\n"
    message = config_error(isolated_env, text, profile="a")
    line_of_a = text.splitlines().index("a:") + 1
    assert message.startswith(f"{isolated_env / '.imsa'}:{line_of_a}: profile 'a': missing {missing!r}")
    assert "extends" in message  # says where else it may be set
    line = assert_cli_config_error("a")
    assert repr(missing) in line


def test_unknown_profile_suggests_the_closest_name(isolated_env):
    text = BASE + "production:\n  extends: base\nstaging:\n  extends: base\n"
    message = config_error(isolated_env, text, "prodution")
    assert message.startswith(f"{isolated_env / '.imsa'}: no profile 'prodution'")
    assert "did you mean 'production'?" in message
    line = assert_cli_config_error("prodution")
    assert "did you mean 'production'?" in line


def test_unknown_profile_without_a_close_name_lists_the_profiles(isolated_env):
    message = config_error(isolated_env, BASE + "production:\n  extends: base\n", "zzz")
    assert "no profile 'zzz'" in message and "(profiles: 'base', 'production')" in message


def test_missing_config_file(isolated_env):
    path = isolated_env / ".imsa"
    assert not path.exists()
    with pytest.raises(ConfigError) as raised:
        config.load(str(path))
    assert str(raised.value).startswith(f"{path}: no such file")
    line = assert_cli_config_error("a")
    assert str(path) in line and "no such file" in line


def test_config_file_that_is_a_yaml_list(isolated_env):
    message = config_error(isolated_env, "- base\n- a\n")
    assert message == f"{isolated_env / '.imsa'}: must be a mapping of profile names to settings, not list"
    assert_cli_config_error("a")


def test_profile_that_is_not_a_mapping(isolated_env):
    message = config_error(isolated_env, BASE + "a: base\n")
    assert message.startswith(f"{isolated_env / '.imsa'}:5: profile 'a': must be a mapping")


def test_imsa_config_variable_chooses_the_file(isolated_env, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text(BASE)
    os.chmod(other, 0o600)
    monkeypatch.setenv("IMSA_CONFIG", str(other))
    assert config.load().path == str(other)
    assert config.load().get("base").aws_access_key_id == KEY_ID


# --- mistakes YAML itself lets pass ---


def test_a_profile_defined_twice_names_both_lines(isolated_env):
    # YAML keeps the last one silently: a copy-paste slip would pick another role with exit 0.
    text = BASE + f"a:\n  extends: base\n  role_arn: {ROLE}\na:\n  extends: base\n  role_arn: {ROLE}-2\n"
    message = config_error(isolated_env, text)
    assert message == f"{isolated_env / '.imsa'}:8: profile 'a' is defined twice (lines 5 and 8); rename or remove one"
    line = assert_cli_config_error("a")
    assert "defined twice (lines 5 and 8)" in line


def test_a_key_set_twice_in_one_profile_names_both_lines(isolated_env):
    text = BASE + f"a:\n  extends: base\n  role_arn: {ROLE}\n  region: eu-west-1\n  role_arn: {ROLE}-2\n"
    message = config_error(isolated_env, text)
    assert message == (f"{isolated_env / '.imsa'}:9: profile 'a', key 'role_arn': set twice in this profile "
                       "(lines 7 and 9); remove one")
    assert_cli_config_error("a")


def test_a_secret_set_twice_is_reported_without_showing_it(isolated_env):
    message = config_error(isolated_env, BASE + f"  aws_secret_access_key: {SECRET}\n")
    assert_names(message, isolated_env / ".imsa", 5, "base", "aws_secret_access_key")
    assert "(lines 3 and 5)" in message


def test_a_key_given_twice_deeper_down_names_both_lines(isolated_env):
    message = config_error(isolated_env, BASE + "a:\n  extends: base\n  region: {x: 1,\n    x: 2}\n")
    assert message.startswith(f"{isolated_env / '.imsa'}:8: key 'x' is given twice in one mapping (lines 7 and 8)")


def test_yaml_merge_keys_overridden_by_the_profile_are_not_duplicates(isolated_env):
    path = write(isolated_env, BASE.replace("base:", "base: &base") + "a:\n  <<: *base\n  region: eu-west-1\n"
                 "b:\n  <<: *base\n  mfa_serial_number: arn:aws:iam::123456789012:mfa/bob\n")
    loaded = config.load(path)
    assert loaded.get("a").aws_access_key_id == KEY_ID and loaded.get("a").region == "eu-west-1"
    assert loaded.get("b").mfa_serial_number == "arn:aws:iam::123456789012:mfa/bob"


@pytest.mark.parametrize("key,hint", [
    ("region_name", "use 'region' (older imsa files called it region_name)"),
    ("source_profile", "use 'extends' (source_profile is what ~/.aws/config calls it)"),
])
def test_keys_of_other_files_point_to_their_imsa_name(isolated_env, key, hint):
    message = config_error(isolated_env, BASE + f"a:\n  extends: base\n  {key}: eu-west-1\n")
    assert_names(message, isolated_env / ".imsa", 7, "a", key)
    assert message.endswith(f": unknown key; {hint}")
    assert hint in assert_cli_config_error("a")


@pytest.mark.parametrize("text,line", [
    (f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n", 1),
    ("# from ~/.aws/config\n\n[profile dev]\nregion=eu-west-1\n[profile prod]\nregion = eu-west-1\n", 3),
], ids=["credentials", "config"])
def test_an_ini_file_is_named_as_such(isolated_env, text, line):
    message = config_error(isolated_env, text)
    assert message == f"{isolated_env / '.imsa'}:{line}: this looks like an INI file; ~/.imsa is YAML (see README, Configuration)"
    assert "INI file" in assert_cli_config_error("default")


@pytest.mark.parametrize("written,shown", [("123", "int 123"), ("yes", "bool True"), ("1.5", "float 1.5"), ("~", "NoneType None")])
def test_a_profile_name_yaml_reads_as_no_text_names_its_line(isolated_env, written, shown):
    message = config_error(isolated_env, BASE + f"{written}:\n  extends: base\n")
    assert message == f"{isolated_env / '.imsa'}:5: this profile name is read by YAML as {shown}, not as text; put it in quotes"
    assert_cli_config_error("base")


@pytest.mark.parametrize("name", ["a\nimsa: error: forged", "a\rb", "a\tb", "a\x1b[31mb", "a\u2028b", "a\x85b"],
                         ids=["newline", "return", "tab", "escape", "line-separator", "next-line"])
def test_a_profile_name_with_a_control_character_is_refused_at_its_line(isolated_env, name):
    message = config_error(isolated_env, BASE + yaml.safe_dump({name: {"extends": "base"}}))
    assert message == (f"{isolated_env / '.imsa'}:5: profile {name!r}: a profile name must not contain control "
                       "characters or line breaks")


def test_a_newline_in_a_profile_name_cannot_forge_a_second_error_line(isolated_env):
    # Found by test_any_mapping_of_profiles_gives_a_profile_or_a_config_error: the "profiles: ..." hint of an
    # unknown profile echoed the names raw, so this file made a second "imsa: error:" line of its own.
    write(isolated_env, BASE + yaml.safe_dump({"x\nimsa: error: forged": {"extends": "base"}}))
    line = assert_cli_config_error("zzz")
    assert "forged" in line and "\\n" in line


def test_names_in_the_profile_list_are_quoted(isolated_env):
    message = config_error(isolated_env, BASE + "'a, b':\n  extends: base\n", "zzz")
    assert message.endswith("(profiles: 'a, b', 'base')")


# --- what works ---


def test_extends_resolves_child_over_parent_at_three_levels(isolated_env):
    path = write(
        isolated_env,
        BASE
        + textwrap.dedent(
            f"""\
        parent:
          extends: base
          region: eu-west-1
          role_arn: {ROLE}
          duration_seconds: 1800
        child:
          extends: parent
          role_arn: arn:aws:iam::123456789012:role/child
          role_session_name: kid
        """
        ),
    )
    loaded = config.load(path)
    child = loaded.get("child")
    assert child.role_arn == "arn:aws:iam::123456789012:role/child"  # child over parent
    assert child.region == "eu-west-1"  # from parent
    assert child.duration_seconds == 1800  # from parent
    assert child.aws_access_key_id == KEY_ID  # from grandparent
    assert child.aws_secret_access_key == SECRET
    assert child.mfa_serial_number == MFA_SERIAL
    assert child.session_name == "kid"
    parent = loaded.get("parent")
    assert parent.role_arn == ROLE and parent.role_session_name is None
    base = loaded.get("base")
    assert base.role_arn is None and base.region is None and base.duration_seconds == 3600


def test_original_imsa_format_works_unchanged(isolated_env):
    # The file format of the original tool: only its six keys, profiles extending a "default" one.
    path = write(
        isolated_env,
        textwrap.dedent(
            f"""\
        default:
          aws_access_key_id: {KEY_ID}
          aws_secret_access_key: {SECRET}
          mfa_serial_number: {MFA_SERIAL}
          role_session_name: alice

        dev:
          extends: default
          role_arn: arn:aws:iam::111111111111:role/developer

        prod:
          extends: default
          role_arn: arn:aws:iam::222222222222:role/readonly
          role_session_name: alice-prod
        """
        ),
    )
    loaded = config.load(path)
    assert loaded.names == ["default", "dev", "prod"]
    dev = loaded.get("dev")
    assert (dev.name, dev.role_arn, dev.session_name) == ("dev", "arn:aws:iam::111111111111:role/developer", "alice")
    assert dev.duration_seconds == 3600 and dev.session_duration_seconds == 43200
    assert dev.region is None and dev.external_id is None and dev.mfa_process is None
    prod = loaded.get("prod")
    assert prod.session_name == "alice-prod" and prod.mfa_serial_number == MFA_SERIAL
    assert dev.fingerprint == prod.fingerprint  # one MFA session serves both
    assert loaded.get("default").role_arn is None


def test_readable_by_others_warns_but_still_works(isolated_env):
    path = write(isolated_env, BASE, mode=0o644)
    warnings = []
    assert config.load(path, warn=warnings.append).get("base").aws_access_key_id == KEY_ID
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0] and path in warnings[0]
    assert SECRET not in warnings[0]


def test_owner_only_file_gives_no_warning(isolated_env):
    warnings = []
    config.load(write(isolated_env, BASE, mode=0o600), warn=warnings.append)
    assert warnings == []


def test_cli_warns_on_stderr_about_a_readable_config_and_still_exports(isolated_env, sts_env):
    write_config(isolated_env, sts_env, mode=0o640)
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "chmod 600" in line]
    assert len(warning) == 1 and str(isolated_env / ".imsa") in warning[0]
    assert "chmod" not in done.stdout and "export AWS_ACCESS_KEY_ID=" in done.stdout


def test_secret_is_not_in_the_repr_of_a_profile(isolated_env):
    profile = config.load(write(isolated_env, BASE + f"a:\n  extends: base\n  role_arn: {ROLE}\n")).get("a")
    assert profile.aws_secret_access_key == SECRET
    assert SECRET not in repr(profile) and SECRET not in str(profile)
    assert SECRET not in repr(profile.role_spec()) and SECRET not in profile.fingerprint


# --- properties ---

profile_names = st.one_of(st.text(max_size=10), st.integers(-5, 5), st.booleans(), st.none())
values = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([900, 3600, 43200, KEY_ID, SECRET, ROLE, MFA_SERIAL, "eu-west-1", "base", "a"]),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(), st.just(SECRET)), max_size=2),
)
keys = st.one_of(st.sampled_from(config.KNOWN_KEYS), st.text(max_size=8), st.integers(-3, 3))
files = st.dictionaries(
    profile_names, st.one_of(st.dictionaries(keys, values, max_size=6), values), max_size=4
)


def assert_one_line(error, path):
    """A ConfigError's message: starts with the file, is one line (no line break of any kind), shows no secret."""
    message = str(error)
    assert message.startswith(path) and len(message.splitlines()) == 1, message
    assert SECRET not in message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=files, ask=st.one_of(profile_names.filter(lambda name: isinstance(name, str)), st.just("a")))
@example(raw={"x\nimsa: error: forged": {}}, ask="a")  # the hint listed profile names raw: a second error line
def test_any_mapping_of_profiles_gives_a_profile_or_a_config_error(isolated_env, raw, ask):
    path = write(isolated_env, yaml.safe_dump(raw))
    try:
        loaded = config.load(path)
        for name in list(loaded.names) + [ask]:
            try:
                profile = loaded.get(name)
            except ConfigError as error:
                assert_one_line(error, path)
            else:
                assert SECRET not in repr(profile)
    except ConfigError as error:
        assert_one_line(error, path)


# Pieces of YAML syntax, so that most texts are almost-valid YAML.
yaml_pieces = st.sampled_from(list("ab: -\n'\"[]{}&*!?#|>%@`,\t1") + ["extends", "role_arn"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(yaml_pieces, max_size=40).map("".join))
def test_any_text_gives_a_config_or_a_config_error(isolated_env, text):
    path = write(isolated_env, "")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    try:
        config.load(path)
    except ConfigError as error:
        assert_one_line(error, path)
