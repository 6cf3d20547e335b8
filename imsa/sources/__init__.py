"""Sources: how a profile gets its session, and how the service turns a session into role credentials.

A *source* is where a person (or a file, or a process) authenticates. The CLI asks the profile's source for a
*session* — temporary material only, never a long-term key — and hands it to the service with
``Client.put_session``. The service keeps it under the source's *fingerprint* (a hash that names the source, never
a secret: every profile on the same source shares one session) and makes role credentials from it with the
*minter* of the session's kind, in its refresher thread.

The interface, CLI side (one module per source: ``iam_user``, ``process``, ``aws_config``…):

- ``source.kind``: the session kind it makes (a key of KINDS);
- ``source.fingerprint``: 32 hex characters that name the source;
- ``source.label``: what ``imsa status`` and ``imsa list`` show (no secret: key ids masked);
- ``source.needs_person``: True when making a session may ask a person (an MFA code on the terminal);
- ``source.new_session(mfa, settings, sts_factory)``: the session material (for ``credentials``: a Credentials).

A resolved profile (``~/.imsa`` or ``~/.aws/config``) is a Profile: its name, where it was defined, its source,
the role hops the service assumes from the session, and its region.

Service side, KINDS maps a session kind to the dotted names of its material class (``from_json``, ``to_json``,
``expiration``, ``expired(now)``: what the control plane receives) and of its minter; the service imports both
before it drops root (``load_kinds``). This module imports nothing heavy and nothing of the CLI's (no config
loader, no boto3).
"""

import hashlib
from dataclasses import dataclass

# Session kind -> ("module:Class" of its material, "module:function" of its minter). The minter is called as
# minter(material, spec) with spec a RoleSpec dict that carries ``via`` (the hops before the final role) and ``sts``
# (how the session's STS is reached), and returns Credentials.
KINDS = {
    "credentials": ("imsa.credentials:Credentials", "imsa.sts:assume_chain"),
    "roles_anywhere": ("imsa.sources.roles_anywhere:Anchor", "imsa.sources.roles_anywhere:mint"),
    "credential_process": ("imsa.sources.system_process:Command", "imsa.sources.system_process:mint"),
    "sso": ("imsa.sources.sso:SsoToken", "imsa.sources.sso:mint"),
    "web_identity": ("imsa.sources.oidc:IdToken", "imsa.sources.oidc:mint"),
    "cred_server": ("imsa.sources.cred_server:ServerToken", "imsa.sources.cred_server:mint"),
}

# Session kind -> "module:function" that lists the roles a session may ask for, called as lister(material, settings)
# (the service's control plane does, with the token only it holds); None from it: the source does not offer a list.
LISTERS = {
    "cred_server": "imsa.sources.cred_server:list_roles",
}


def load(dotted):
    """The object a ``module:name`` string names."""
    import importlib

    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def material_class(kind):
    """The class of *kind*'s session material; ValueError for a kind no source makes."""
    if kind not in KINDS:
        raise ValueError(f"unknown session kind {kind!r}")
    return load(KINDS[kind][0])


def minter(kind):
    """The function that makes role credentials from a session of *kind*."""
    return load(KINDS[kind][1])


def load_kinds():
    """Import every kind's material class and minter now (the service does, before it drops root), and run the
    ``load_models`` of a minter's module that has one (it loads what its calls need, e.g. a botocore service model)."""
    import importlib

    for kind in KINDS:
        material_class(kind)
        minter(kind)
        load_models = getattr(importlib.import_module(KINDS[kind][1].partition(":")[0]), "load_models", None)
        if load_models is not None:
            load_models()


def fingerprint(*parts):
    """32 hex characters naming a source from *parts* (key ids, serials, commands — never a secret)."""
    text = "\0".join(part or "" for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def merged_chain(name, chain, where):
    """(settings, at) of ~/.imsa profile *name* from its ``extends`` *chain* ([(profile, settings)], farthest
    first; the nearest value of a key wins): ``at(key)`` says where that key was set, for errors (*where*)."""
    merged, setter = {}, {}
    for ancestor, values in chain:
        for key, value in values.items():
            if key != "extends":
                merged[key], setter[key] = value, ancestor

    def at(key):
        return where(setter.get(key, name), key)

    return merged, at


class BearerSession:
    """What the token sessions (IAM Identity Center, OIDC, credential servers) share: their ``expiration`` and the
    checks of their control-plane JSON. The subclass is a frozen dataclass with an ``expiration`` field."""

    def __str__(self):
        return repr(self)  # each subclass's repr names what it is for and hides the token

    def remaining(self, now=None):
        """Time left before the token ends (negative once it has)."""
        from imsa.credentials import utcnow

        return self.expiration - (now or utcnow())

    def expired(self, now=None):
        """True once the token has ended."""
        import datetime

        return self.remaining(now) <= datetime.timedelta(0)

    @staticmethod
    def token_of(data, name, limit):
        """*data*[*name*], a bearer token of printable text, at most *limit* characters; ValueError otherwise."""
        token = data.get(name)
        if not isinstance(token, str) or not 0 < len(token) <= limit or not token.isprintable():
            raise ValueError(f"{name!r} must be printable text of 1-{limit} characters")
        return token

    @staticmethod
    def expiration_of(data):
        """*data*["expiration"] as a time; ValueError otherwise."""
        from imsa.credentials import parse_time

        expiration = data.get("expiration")
        if not isinstance(expiration, str):
            raise ValueError("'expiration' must be a time")
        return parse_time(expiration)


@dataclass(frozen=True)
class Hop:
    """One AssumeRole the service makes on the way from the session to the profile's role."""

    role_arn: str
    role_session_name: str
    duration_seconds: int
    external_id: str = None

    def to_json(self):
        """The control plane's form of the hop."""
        return {"role_arn": self.role_arn, "role_session_name": self.role_session_name,
                "duration_seconds": self.duration_seconds, "external_id": self.external_id}


@dataclass(frozen=True)
class Profile:
    """A resolved profile of any file: what the CLI needs to get its session and what the service needs to make
    its credentials. *hops* are the roles assumed in order from the session (the last is the profile's role; none:
    the session's own credentials are served). *notes* are said to the person when the profile is used."""

    name: str
    origin: str
    source: object
    hops: tuple = ()
    region: str = None
    notes: tuple = ()
    # config.Fence of a ~/.imsa profile (imds, confirm); None: no fencing (a profile of ~/.aws/config).
    fence: object = None

    @property
    def role_arn(self):
        """The profile's role, or None when it serves the session credentials."""
        return self.hops[-1].role_arn if self.hops else None

    @property
    def fingerprint(self):
        """The fingerprint of the profile's source: the key of its session in the service."""
        return self.source.fingerprint

    def role_spec(self):
        """What the service needs to make this profile's credentials: no long-term secret in it."""
        return role_spec(self)


def role_spec(profile):
    """The control plane's RoleSpec of any resolved *profile* (name, origin, fingerprint, hops, region)."""
    final = profile.hops[-1] if profile.hops else None
    spec = {
        "profile": profile.name,
        "fingerprint": profile.fingerprint,
        "role_arn": final.role_arn if final else None,
        "role_session_name": final.role_session_name if final else "imsa",
        "duration_seconds": final.duration_seconds if final else 3600,
        "external_id": final.external_id if final else None,
        "region": profile.region,
        "via": [hop.to_json() for hop in profile.hops[:-1]],
        "origin": profile.origin,
    }
    fence = getattr(profile, "fence", None)
    if fence is not None and not fence.imds:
        spec["imds"] = False  # only then: a service that predates fencing refuses the field rather than ignore it
    return spec
