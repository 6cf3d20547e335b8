"""``imsa add``, ``imsa remove`` and ``imsa migrate``: long-term keys into the secret store, out of plain text.

The secret store (imsa/secrets.py) holds a profile's access key id and secret key; ``~/.imsa`` keeps the key id
(so that status, list and a held session need no passphrase) and ``secret_store: true``. Edits of ``~/.imsa`` keep
its comments and layout: the lines of the keys changed are rewritten and the result is parsed again and compared
with what was meant; only when that differs is the file written out whole (after a backup).
"""

import configparser
import datetime
import os
import re
import shutil

from imsa import config, secrets
from imsa.commands.common import Io, load_profile, shown_path
from imsa.credentials import mask
from imsa.errors import EXIT_OK, ConfigError, UsageError
from imsa.limits import PATTERNS

# What the profile of a key in the store has in ~/.imsa besides its other settings.
STORE_REFERENCE = {"secret_store": True}


def _terminal():
    from imsa.sts import open_terminal

    tty = open_terminal()
    if tty is None:
        raise UsageError("imsa add asks for the keys on the terminal (never on the command line), and there is none")
    return tty


def ask_keys(prompt=None, secret_prompt=None):
    """(access key id, secret key) typed on the terminal; the secret is not echoed."""
    import getpass

    from imsa.sts import ask_terminal

    prompt = prompt or (lambda text: ask_terminal(_terminal(), text))
    secret_prompt = secret_prompt or (lambda text: (_terminal().close(), getpass.getpass(text))[1])
    key_id = prompt("Access key ID: ").strip()
    pattern, description = PATTERNS["aws_access_key_id"]
    if not pattern.match(key_id):
        raise UsageError(f"an access key id is {description}")
    secret = secret_prompt("Secret access key: ").strip()
    if not secret or not secret.isprintable() or " " in secret:
        raise UsageError("the secret access key must be one word of printable characters")
    return key_id, secret


# --- ~/.imsa, edited in place ---


def _read(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def _raw(text):
    import yaml

    return yaml.safe_load(text) or {} if text.strip() else {}


def _render_value(value):
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def edited_text(text, name, changes):
    """*text* (a ~/.imsa) with profile *name*'s keys changed: *changes* maps a key to its new value, or to None to
    remove it. Lines of other keys and profiles, and comments, stay as they are."""
    raw = _raw(text)
    expected = {key: value for key, value in (raw.get(name) or {}).items()}
    for key, value in changes.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    wanted = dict(raw)
    wanted[name] = expected
    lines = text.splitlines()
    numbers = config._line_numbers(text) if text.strip() else {}
    if (name, None) not in numbers:
        block = [f"{_render_value(name)}:"] + [f"  {key}: {_render_value(value)}" for key, value in expected.items()]
        if lines and lines[-1].strip():
            lines.append("")
        lines.extend(block)
    else:
        header = numbers[(name, None)] - 1
        indent = "  "
        for (profile, key), number in numbers.items():
            if profile == name and key is not None:
                indent = re.match(r"[ \t]*", lines[number - 1]).group(0) or indent
                break
        removals, inserts = [], []
        for key, value in changes.items():
            number = numbers.get((name, key))
            if value is None:
                if number:
                    removals.append(number - 1)
            elif number:
                lines[number - 1] = f"{indent}{key}: {_render_value(value)}"
            else:
                inserts.append(f"{indent}{key}: {_render_value(value)}")
        for index in sorted(removals, reverse=True):
            del lines[index]
        lines[header + 1:header + 1] = inserts
    new = "\n".join(lines) + "\n"
    try:
        if _raw(new) == wanted:
            return new
    except Exception:  # a layout the line edit cannot follow (flow mappings, multi-line values): written whole
        pass
    import yaml

    return yaml.safe_dump(wanted, default_flow_style=False, sort_keys=False)


def write_private(path, text):
    """Replace *path* with *text* atomically, mode 0600 (it names keys, and may hold plain ones)."""
    from imsa.files import replace_atomically

    replace_atomically(path, text)


def backup(path, now=None):
    """A 0600 copy of *path* beside it, named with the time; its path."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    target = f"{path}.bak-{stamp}"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
        shutil.copyfileobj(source, out)
    return target


def _check_result(path, text):
    """Validate the edited file before it replaces the old one (a ConfigError names the problem)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as check:
        check.write(text)
        check.flush()
        try:
            config.load(check.name)
        except ConfigError as error:
            raise ConfigError(f"{path}: not changed, the result would be invalid: "
                              f"{str(error).replace(check.name, path)}") from None


# --- the commands ---


def add(name, mfa_serial=None, io=None, prompt=None, secret_prompt=None):
    """Store profile *name*'s keys, typed on the terminal, and point ~/.imsa's profile at the store."""
    io = io or Io()
    path = config.config_path()
    text = _read(path)
    if text.strip():
        config.load(path)  # a broken file is said first, before any key is typed
    profile = _raw(text).get(name) or {}
    if profile.get("aws_secret_access_key"):
        raise UsageError(f"profile {name!r} in {path} has plain-text keys; move them into the store with: imsa migrate")
    store = secrets.open_store()
    key_id, secret = ask_keys(prompt, secret_prompt)
    secrets.put_keys(name, key_id, secret, store)
    changes = {"aws_access_key_id": key_id, **STORE_REFERENCE}
    if mfa_serial:
        changes["mfa_serial_number"] = mfa_serial
    new = edited_text(text, name, changes)
    _check_result(path, new)
    write_private(path, new)
    io.say(f"imsa: stored key {mask(key_id)} for {name} in {store.name}; {shown_path(path)} names it")
    return EXIT_OK


def remove(name, io=None):
    """Delete profile *name*'s keys from the store, and the reference to them from ~/.imsa."""
    io = io or Io()
    path = config.config_path()
    text = _read(path)
    profile = _raw(text).get(name) if text.strip() else None
    store = secrets.open_store()
    deleted = store.delete(secrets.keys_item(name))
    if isinstance(profile, dict) and profile.get("secret_store"):
        new = edited_text(text, name, {"aws_access_key_id": None, "secret_store": None})
        write_private(path, new)
    elif not deleted:
        raise UsageError(f"the secret store ({store.name}) holds no keys for profile {name!r}")
    io.say(f"imsa: removed the keys of {name} from {store.name}")
    return EXIT_OK


def _credentials_sections(path):
    """Sections of the AWS credentials file at *path* with long-term keys: {name: (key id, secret)}."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    found = {}
    for section in parser.sections():
        values = dict(parser.items(section))
        if values.get("aws_access_key_id") and values.get("aws_secret_access_key") and not values.get("aws_session_token"):
            found[section] = (values["aws_access_key_id"].strip(), values["aws_secret_access_key"].strip())
    return found


def _credentials_without_keys(text, names):
    """The AWS credentials file *text* with the keys of sections *names* replaced by a credential_process line
    that gets them through imsa (SDKs reading the file keep working)."""
    out, section = [], None
    header = re.compile(r"^\s*\[([^\]]+)\]\s*$")
    key = re.compile(r"^\s*(aws_access_key_id|aws_secret_access_key)\s*[=:]", re.IGNORECASE)
    for line in text.splitlines():
        match = header.match(line)
        if match:
            section = match.group(1).strip()
            out.append(line)
            if section in names:
                out.append(f"credential_process = imsa credential-process {section}")
            continue
        if section in names and key.match(line):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def migrate(dry_run=False, from_aws_credentials=False, io=None):
    """Move plain-text keys of ~/.imsa (and with *from_aws_credentials*, of ~/.aws/credentials) into the store."""
    io = io or Io()
    path = config.config_path()
    text = _read(path)
    if text.strip():
        config.load(path)
    raw = _raw(text)
    moves = [(name, settings["aws_access_key_id"], settings["aws_secret_access_key"])
             for name, settings in raw.items()
             if isinstance(settings, dict) and settings.get("aws_secret_access_key") and settings.get("aws_access_key_id")]
    orphans = [name for name, settings in raw.items() if isinstance(settings, dict)
               and settings.get("aws_secret_access_key") and not settings.get("aws_access_key_id")]
    if orphans:
        raise ConfigError(f"{path}: profile {orphans[0]!r} has aws_secret_access_key without aws_access_key_id; "
                          "fix it first")
    credentials_path = aws_moves = None
    if from_aws_credentials:
        credentials_path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
            os.path.expanduser("~"), ".aws", "credentials")
        aws_moves = _credentials_sections(credentials_path)
        for name in list(aws_moves):
            if name in raw:  # ~/.imsa's profile of that name wins; its own keys are what imsa uses
                io.say(f"imsa: {name}: {shown_path(path)} has a profile of that name; "
                       f"{shown_path(credentials_path)} is left as it is for it")
                del aws_moves[name]
    if not moves and not aws_moves:
        io.say("imsa: no plain-text keys to move")
        return EXIT_OK
    for name, key_id, _ in moves:
        io.say(f"imsa: {'would move' if dry_run else 'moving'} {name} (key {mask(key_id)}) from {shown_path(path)}")
    for name, (key_id, _) in (aws_moves or {}).items():
        io.say(f"imsa: {'would move' if dry_run else 'moving'} {name} (key {mask(key_id)}) from "
               f"{shown_path(credentials_path)}")
    if dry_run:
        io.say("imsa: dry run: nothing was changed")
        return EXIT_OK
    store = secrets.open_store()
    new = text
    for name, key_id, secret in moves:
        new = edited_text(new, name, {"aws_secret_access_key": None, **STORE_REFERENCE})
    for name, (key_id, _) in (aws_moves or {}).items():
        new = edited_text(new, name, {"aws_access_key_id": key_id, **STORE_REFERENCE})
    _check_result(path, new)
    # Into the store first: a failure there leaves every file as it was.
    for name, key_id, secret in moves:
        secrets.put_keys(name, key_id, secret, store)
    for name, (key_id, secret) in (aws_moves or {}).items():
        secrets.put_keys(name, key_id, secret, store)
    backups = []
    if text:
        backups.append(backup(path))
    write_private(path, new)
    if aws_moves:
        backups.append(backup(credentials_path))
        write_private(credentials_path, _credentials_without_keys(_read(credentials_path), set(aws_moves)))
    io.say(f"imsa: moved {len(moves) + len(aws_moves or {})} profile(s) into {store.name}")
    for copy in backups:
        io.say(f"imsa: the backup {shown_path(copy)} still holds the plain-text keys: delete it once imsa assume "
               f"works (rm {shown_path(copy)})")
    return EXIT_OK


def logout(name=None, every=False, io=None, client=None):
    """Forget profile *name*'s session (or, with *every*, all of them) in the service and in its saved files."""
    from imsa.client import Client
    from imsa.errors import ServiceNotRunning
    from imsa.server import saved

    io = io or Io()
    if bool(name) == bool(every):
        raise UsageError("name one PROFILE, or --all: imsa logout PROFILE | imsa logout --all")
    fingerprint = None if every else load_profile(name, io, pick=False).fingerprint
    client = client or Client()
    try:
        forgotten = client.forget_sessions(fingerprint)["forgotten"]
    except ServiceNotRunning:
        # No service holds them in memory; what the last one saved goes (deleting needs no key).
        forgotten = saved.forget_files(fingerprint)
        io.say(f"imsa: the service is not running; {forgotten} saved session(s) deleted")
        return EXIT_OK
    what = "every session" if every else f"the session of {name}"
    io.say(f"imsa: forgot {what} ({forgotten} held); the next imsa assume asks for MFA")
    return EXIT_OK


def _iam_client(credentials):
    """An IAM client with *credentials* (key id, secret, token); AWS_ENDPOINT_URL_IAM, proxies and the CA bundle
    work as boto3 reads them."""
    import boto3

    key_id, secret, token = credentials
    return boto3.session.Session().client("iam", region_name="us-east-1", aws_access_key_id=key_id,
                                          aws_secret_access_key=secret, aws_session_token=token)


def _aws_call(what, call):
    """*call*(), with AWS's refusal as one StsError line that says which step failed."""
    import botocore.exceptions

    from imsa.errors import StsError

    try:
        return call()
    except botocore.exceptions.ClientError as error:
        detail = error.response.get("Error", {})
        raise StsError(f"{what} failed: {detail.get('Code')}: {detail.get('Message')}") from None
    except botocore.exceptions.BotoCoreError as error:
        raise StsError(f"{what} failed: {error}") from None


def rotate(name, mfa_token=None, io=None, prompt=None):
    """Replace profile *name*'s access key: create a new one with the current one (through an MFA session when
    the profile has a device), store it, check it works, then delete the old one."""
    from imsa import sts, sts_settings
    from imsa.commands.common import mfa_codes

    io = io or Io()
    profile = load_profile(name, io)
    item = getattr(profile, "secret_item", None)
    if not item:
        raise UsageError(f"profile {name!r} does not keep its keys in the secret store; move them there first: "
                         "imsa migrate (or imsa add)")
    store = secrets.open_store()
    old_id, old_secret = secrets.get_keys(item, store)
    settings = sts_settings.resolve()
    identity = _aws_call("GetCallerIdentity", lambda: sts.sts_client(old_id, old_secret, None, settings)
                         .get_caller_identity())
    arn = identity["Arn"]
    if ":user/" not in arn:
        raise UsageError(f"the keys of {item!r} belong to {arn}, not an IAM user: only a user's keys rotate")
    user = arn.rsplit("/", 1)[-1]
    acting = (old_id, old_secret, None)
    if profile.mfa_serial_number:  # IAM refuses key changes without MFA where the policy asks for it
        keys = dataclasses_replace(profile.source, aws_secret_access_key=old_secret)
        session = sts.new_session(keys, mfa_codes(profile, mfa_token, prompt), sts.sts_client, settings=settings)
        acting = (session.access_key_id, session.secret_access_key, session.session_token)
    iam = _iam_client(acting)
    created = _aws_call("CreateAccessKey", lambda: iam.create_access_key(UserName=user))["AccessKey"]
    new_id, new_secret = created["AccessKeyId"], created["SecretAccessKey"]
    try:
        secrets.put_keys(item, new_id, new_secret, store)
    except BaseException:
        _aws_call("DeleteAccessKey (of the new key, not stored)",
                  lambda: iam.delete_access_key(UserName=user, AccessKeyId=new_id))
        raise
    path = config.config_path()
    write_private(path, edited_text(_read(path), item, {"aws_access_key_id": new_id}))
    io.say(f"imsa: created {mask(new_id)} for {user} and stored it in {store.name}")
    _wait_until_valid(new_id, new_secret, settings)
    _aws_call(f"DeleteAccessKey of the old key {mask(old_id)} (delete it yourself: aws iam delete-access-key)",
              lambda: iam.delete_access_key(UserName=user, AccessKeyId=old_id))
    io.say(f"imsa: deleted the old key {mask(old_id)}; the next imsa assume of {name} makes a new session")
    return EXIT_OK


# IAM makes a new key usable everywhere within seconds; imsa waits this long for it before deleting the old one.
NEW_KEY_TRIES = 10
NEW_KEY_PAUSE = 1.0


def _wait_until_valid(key_id, secret, settings):
    """Return once the new key is accepted by STS (bounded), so the old one is never deleted before it works."""
    import time

    import botocore.exceptions

    from imsa import sts
    from imsa.errors import StsError

    for attempt in range(NEW_KEY_TRIES):
        try:
            sts.sts_client(key_id, secret, None, settings).get_caller_identity()
            return
        except botocore.exceptions.ClientError:
            if attempt + 1 < NEW_KEY_TRIES:
                time.sleep(NEW_KEY_PAUSE)
    raise StsError(f"the new key {mask(key_id)} is stored but STS did not accept it yet; the old key was kept: "
                   "run imsa rotate again later")


def dataclasses_replace(value, **changes):
    """dataclasses.replace, imported when used."""
    import dataclasses

    return dataclasses.replace(value, **changes)


def edit(io=None):
    """Open ~/.imsa in $VISUAL or $EDITOR (a private copy), and put it in place only once it is valid."""
    import shlex
    import subprocess
    import tempfile

    from imsa.sts import TerminalPrompt

    io = io or Io()
    path = config.config_path()
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        command = shlex.split(editor)
    except ValueError as error:
        raise UsageError(f"$EDITOR cannot be parsed: {error}") from None
    handle, copy = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".imsa-edit-", suffix=".yaml")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(_read(path))
        while True:
            try:
                done = subprocess.run(command + [copy], check=False)
            except OSError as error:
                raise UsageError(f"cannot run the editor {command[0]!r}: {error.strerror}; set $EDITOR") from None
            if done.returncode != 0:
                raise UsageError(f"the editor exited with status {done.returncode}; {shown_path(path)} is unchanged")
            text = _read(copy)
            try:
                _check_result(path, text)
                break
            except ConfigError as error:
                problem = str(error)
            io.say(f"imsa: {problem}")
            try:
                again = TerminalPrompt()("Edit again? [Y/n]: ").strip().lower()
            except Exception:  # no terminal to ask on: the edit is dropped
                again = "n"
            if again not in ("", "y", "yes"):
                raise ConfigError(problem)
        if text == _read(path):
            io.say(f"imsa: {shown_path(path)} is unchanged")
            return EXIT_OK
        os.chmod(copy, 0o600)
        os.replace(copy, path)
    finally:
        if os.path.exists(copy):
            os.unlink(copy)
    plain = [name for name, settings in (_raw(text) or {}).items()
             if isinstance(settings, dict) and settings.get("aws_secret_access_key")]
    io.say(f"imsa: saved {shown_path(path)}")
    if plain:
        io.say(f"imsa: warning: {', '.join(plain)} keep a secret key in plain text; imsa migrate moves it into "
               "the secret store")
    return EXIT_OK
