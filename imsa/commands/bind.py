"""``imsa bind`` and ``imsa unbind``: credential bindings for system services (imsa/server/bound.py).

The CLI resolves the profile, makes sure the service holds its session (asking for MFA if the source needs a
person), draws a random token, hands the service only the token's SHA-256, and writes the token in clear into the
environment file the bound unit reads (``EnvironmentFile=``). The file is created 0600; when it exists it is
rewritten in place, keeping its owner and mode (someone may have given it to the unit's user on purpose).
"""

import os
import secrets

from imsa.client import Client
from imsa.commands.common import Io, ensure_session, load_profile, mfa_codes
from imsa.errors import EXIT_OK, ImsaError, ServiceError, UsageError

TOKEN_BYTES = 32
ECS_LISTEN = "169.254.170.2:80"
CONTAINER_FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
CONTAINER_RELATIVE_URI = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
CONTAINER_TOKEN = "AWS_CONTAINER_AUTHORIZATION_TOKEN"


def environment(mode, binding, token, listeners):
    """The environment file's variables for *mode*, given the service's bindings *listeners* (ADDR:PORT)."""
    from imsa.server.bound import uses_query

    path = f"/bindings/{binding}" + (f"?token={token}" if uses_query(mode) else "")
    if mode.startswith("ecs-relative"):
        if ECS_LISTEN not in listeners:
            raise ServiceError(f"mode {mode} needs the service to serve bindings on {ECS_LISTEN} (SDKs send relative "
                               f"URIs there); start it with --bindings-listen {ECS_LISTEN}, or use --mode ecs-full")
        values = {CONTAINER_RELATIVE_URI: path}
    else:
        loopback = [address for address in listeners if address.startswith("127.") or address.startswith("[::1]")]
        if not loopback:
            raise ServiceError(f"mode {mode} needs the service to serve bindings on a loopback address; start it "
                               "with --bindings-listen 127.0.0.1:PORT")
        values = {CONTAINER_FULL_URI: f"http://{loopback[0]}{path}"}
    if not uses_query(mode):
        values[CONTAINER_TOKEN] = token
    return values


def write_env_file(path, values):
    """Write *values* as NAME=value lines to *path*: created 0600, or rewritten in place (owner and mode kept)."""
    text = "".join(f"{name}={value}\n" for name, value in values.items()).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(text)


def bind(binding, name, mode="ecs-full", env_file=None, mfa_token=None, io=None, client=None, prompt=None,
         system=False, config_dir=None, listen=None):
    """Bind profile *name* to a system service as *binding*: the service serves its role, the env file says where.
    With *system*, the binding goes into the system configuration instead (imsa/commands/system.py)."""
    from imsa.server.bound import token_digest

    if system:
        if env_file or mfa_token:
            raise UsageError("bind --system writes the environment file into the system configuration and asks no "
                             "MFA code: leave out --env-file and --mfa-token")
        from imsa.commands.system import bind_system

        return bind_system(binding, name, mode, config_dir, listen, io)
    if config_dir or listen:
        raise UsageError("--config-dir and --address go with --system")
    io = io or Io()
    profile = load_profile(name, io)
    client = client or Client()
    status = client.status()
    listeners = status.get("bindings_listen") or []
    token = secrets.token_urlsafe(TOKEN_BYTES)
    values = environment(mode, binding, token, listeners)  # the listener a mode needs is checked first
    path = os.path.abspath(env_file or os.path.join(status["state_dir"], "env", binding))
    ensure_session(profile, client, mfa_codes(profile, mfa_token, prompt), io)
    answer = client.bind_service({"name": binding, "mode": mode, "token_sha256": token_digest(token),
                                  "spec": profile.role_spec(), "env_file": path})
    try:
        write_env_file(path, values)
    except OSError as error:
        client.unbind_service(binding)
        raise ImsaError(f"cannot write the environment file {path}: {error.strerror}; binding {binding} "
                        "removed") from None
    kept = "" if answer.get("persisted_session") else (
        "; after a restart of imsa it answers once the profile has a session again (imsa assume)")
    io.say(f"imsa: binding {binding}: profile {profile.name} ({mode}), environment file {path}{kept}")
    return EXIT_OK


def unbind(binding, io=None, client=None, system=False, config_dir=None):
    """Remove *binding*: its token stops working at once; its environment file is deleted. With *system*, from the
    system configuration."""
    if system:
        from imsa.commands.system import unbind_system

        return unbind_system(binding, config_dir, io)
    io = io or Io()
    client = client or Client()
    answer = client.unbind_service(binding)
    if answer is None:
        raise ServiceError(f"the service has no binding {binding!r}")
    env_file = answer.get("env_file")
    if env_file:
        try:
            os.unlink(env_file)
        except FileNotFoundError:
            pass
        except OSError as error:
            io.say(f"imsa: warning: {env_file} not removed: {error.strerror} (its token no longer works)")
    io.say(f"imsa: binding {binding} removed")
    return EXIT_OK
