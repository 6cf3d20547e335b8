"""Profile names for completion: the line-by-line fast path must agree with the YAML parser on every file."""

import string

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from imsa.config import profile_names

NAMES = st.one_of(
    st.text(string.ascii_letters + string.digits + "_.@+=-", min_size=1, max_size=12),
    st.sampled_from(["yes", "No", "on", "OFF", "null", "true", "123", "1e3", ".inf", "my profile", "a:b", "-x", "#x"]),
    st.integers(-3, 3),
    st.booleans(),
)
VALUES = st.one_of(
    st.none(), st.integers(), st.text(max_size=20),
    st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=8), st.text(max_size=20), max_size=3),
)


def parsed_names(text):
    raw = yaml.safe_load(text)
    return sorted(name for name in raw if isinstance(name, str) and name.isprintable()) if isinstance(raw, dict) else []


@settings(max_examples=200, deadline=None)
@given(profiles=st.dictionaries(NAMES, VALUES, max_size=6), flow=st.booleans())
def test_completion_offers_exactly_the_names_yaml_reads(tmp_path_factory, profiles, flow):
    text = yaml.safe_dump(profiles, default_flow_style=flow, sort_keys=False)
    path = tmp_path_factory.mktemp("names") / ".imsa"
    path.write_text(text)
    assert profile_names(str(path)) == parsed_names(text)


def test_hand_written_files_with_comments_anchors_and_quotes(tmp_path):
    path = tmp_path / ".imsa"
    path.write_text(
        "# my profiles\n"
        "work: &work\n"
        "  aws_access_key_id: AKIA0000000000000000  # comment\n"
        "\n"
        "admin:\n"
        "  <<: *work\n"
        "  role_arn: arn:aws:iam::123456789012:role/admin\n"
        "'read only':\n"
        "  extends: work\n"
    )
    assert profile_names(str(path)) == ["admin", "read only", "work"]


def test_a_missing_file_or_one_that_is_no_mapping_completes_nothing(tmp_path):
    assert profile_names(str(tmp_path / "missing")) == []
    broken = tmp_path / ".imsa"
    broken.write_text("[unclosed\n")
    assert profile_names(str(broken)) == []
    broken.write_text("- a\n- b\n")
    assert profile_names(str(broken)) == []


def test_a_value_broken_inside_a_profile_still_completes_the_names(tmp_path):
    # The command that follows reports the error with its line; completion only needs the names.
    path = tmp_path / ".imsa"
    path.write_text("a: [unclosed\nb:\n  region: x\n")
    assert profile_names(str(path)) == ["a", "b"]


def test_a_name_with_a_control_character_is_not_offered(tmp_path):
    # ~/.imsa refuses such a name; offering it would put a line break or escape sequence on the command line.
    path = tmp_path / ".imsa"
    path.write_text(yaml.safe_dump({"good": {}, "bad\nname": {}, "bell\a": {}}))
    assert profile_names(str(path)) == ["good"]


def test_completion_offers_the_aws_config_profiles_too(isolated_env):
    (isolated_env / ".imsa").write_text("mine:\n  aws_access_key_id: AKIAIOSFODNN7EXAMPLE\n")
    (isolated_env / ".aws").mkdir(exist_ok=True)
    (isolated_env / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n[profile theirs]\nregion = x\n")
    (isolated_env / ".aws" / "credentials").write_text("[keys-only]\naws_access_key_id = A\n")
    assert profile_names() == ["default", "keys-only", "mine", "theirs"]
    (isolated_env / ".aws" / "config").write_text("[profile broken\n")
    assert profile_names() == ["mine"]  # AWS files that cannot be parsed offer nothing, quietly
