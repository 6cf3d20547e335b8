"""IAM Roles Anywhere: an X.509 certificate and its private key make role credentials, with no person present.

``rolesanywhere:CreateSession`` is one HTTPS POST signed like SigV4, except that the signature is made with the
certificate's private key: ``AWS4-X509-RSA-SHA256`` for RSA keys, ``AWS4-X509-ECDSA-SHA256`` for EC keys (P-256 and
P-384). The label comes from the key type alone and the digest is always SHA-256, whatever hash the issuing CA
signed the certificate with (one PyPI signer takes the label from the CA's hash and breaks SHA-384-signed
certificates). The credential scope names the leaf by its serial number in decimal; the leaf goes in
``X-Amz-X509`` (base64 DER) and the intermediates, comma-joined, in ``X-Amz-X509-Chain``.

There is no session to hold: the *material* the service keeps is where the files are and which trust anchor and
profile to use (paths and ARNs, no secret). The certificate and the key are read again at every CreateSession, so
a certificate renewed on disk is used at the next refresh without a restart. Whoever mints reads the key: the CLI
for ``imsa credential-process --certificate …``, the service (running as the user, never as root) for profiles
and bindings it serves. Encrypted PKCS#8 keys are read where a person can type the passphrase: the CLI.

A ``credential_process`` line of ``aws_signing_helper credential-process`` (or imsa's own drop-in form) in
``~/.aws/config`` is read as this source (``from_process_line``), so such profiles get sessions the service mints.
"""

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from imsa.credentials import Credentials, format_time, parse_time, utcnow
from imsa.errors import ConfigError, StsError
from imsa.helper_options import add_helper_options
from imsa.sources import Hop, fingerprint

KIND = "roles_anywhere"
SERVICE = "rolesanywhere"
RSA_ALGORITHM = "AWS4-X509-RSA-SHA256"
ECDSA_ALGORITHM = "AWS4-X509-ECDSA-SHA256"
# The curves Roles Anywhere accepts for EC keys.
CURVES = ("secp256r1", "secp384r1")
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# CreateSession's own bounds of durationSeconds (the profile may set a lower maximum).
MIN_DURATION = 900
MAX_DURATION = 43200
DEFAULT_DURATION = 3600
# A certificate or key file is a few kB; a PEM chain a few more. Anything larger is not what it claims to be.
MAX_FILE = 256 * 1024
MAX_ANSWER = 1 << 20
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 10
# The "session" is the files, which never end by themselves; the service holds it until it stops.
NO_END = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)
# The environment variable botocore reads for this service's endpoint (service id "RolesAnywhere"), then the global one.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_ROLESANYWHERE", "AWS_ENDPOINT_URL")
TRUST_ANCHOR = re.compile(r"^arn:aws[a-z-]*:rolesanywhere:([a-z]{2}(?:-[a-z]+)+-\d{1,2}):\d{12}:trust-anchor/[\w-]{1,64}$")
PROFILE = re.compile(r"^arn:aws[a-z-]*:rolesanywhere:[a-z]{2}(?:-[a-z]+)+-\d{1,2}:\d{12}:profile/[\w-]{1,64}$")
# Programs whose ``credential-process`` command line this module reads as a Roles Anywhere source.
HELPERS = ("aws_signing_helper", "imsa")
PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")


class SessionRefused(StsError):
    """Roles Anywhere refused CreateSession, or could not be reached (exit 4, like STS)."""


def region_of(trust_anchor_arn):
    """The region a trust anchor ARN names (where CreateSession goes unless --region says otherwise)."""
    match = TRUST_ANCHOR.match(trust_anchor_arn or "")
    return match.group(1) if match else None


def endpoint_for(region, environ=None):
    """The CreateSession endpoint: AWS_ENDPOINT_URL_ROLESANYWHERE / AWS_ENDPOINT_URL, else the region's."""
    environ = os.environ if environ is None else environ
    for name in ENDPOINT_VARIABLES:
        if environ.get(name):
            return environ[name].rstrip("/")
    return f"https://{SERVICE}.{region}.amazonaws.com"


def _read(path, what):
    """The bytes of the file at *path*; ConfigError naming it (and *what* it is) when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{what} {path} is larger than {MAX_FILE // 1024} KiB")
    return data


def _certificates(data, path, what):
    """The certificates of a PEM (one or more blocks) or DER file; ConfigError when there is none."""
    from cryptography import x509

    blocks = PEM_CERTIFICATE.findall(data)
    try:
        if blocks:
            return [x509.load_pem_x509_certificate(block) for block in blocks]
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError(f"{what} {path} holds no readable X.509 certificate (PEM or DER)") from None


def _self_signed(certificate):
    return certificate.subject == certificate.issuer


@dataclass(frozen=True)
class Identity:
    """The certificate, its intermediates and the private key, as read from the files at one moment."""

    leaf: object
    chain: tuple
    key: object = field(repr=False)

    @property
    def algorithm(self):
        """The AWS4-X509 label of the key type: the digest is SHA-256 for every key."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        return RSA_ALGORITHM if isinstance(self.key, rsa.RSAPrivateKey) else ECDSA_ALGORITHM

    def sign(self, data):
        """The signature of *data* with the key: RSA PKCS#1 v1.5 or ECDSA (DER), both over SHA-256."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def load_identity(certificate, private_key, intermediates=None, passphrase=None):
    """Read the certificate file (the leaf first; a fullchain PEM's other certificates are intermediates, a root
    among them is dropped), the optional intermediates file and the key; ConfigError naming the file at fault."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    found = _certificates(_read(certificate, "certificate"), certificate, "certificate")
    leaf, chain = found[0], [cert for cert in found[1:] if not _self_signed(cert)]
    if intermediates:
        chain += [cert for cert in _certificates(_read(intermediates, "intermediates"), intermediates,
                                                 "intermediates") if not _self_signed(cert)]
    data = _read(private_key, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase) if b"-----BEGIN" in data else \
            serialization.load_der_private_key(data, password=passphrase)
    except TypeError as error:
        if passphrase is None and "encrypted" in str(error):
            raise ConfigError(f"private key {private_key} is encrypted and no passphrase was given") from None
        raise ConfigError(f"private key {private_key}: {error}") from None
    except ValueError:
        reason = "the passphrase is wrong, or it is" if passphrase is not None else "it is"
        raise ConfigError(f"private key {private_key} cannot be read: {reason} not a PEM or DER private key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in CURVES:
            raise ConfigError(f"private key {private_key} is on curve {key.curve.name}; Roles Anywhere takes RSA, "
                              "P-256 or P-384 keys")
    elif not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"private key {private_key} is neither RSA nor EC; Roles Anywhere takes RSA, P-256 or P-384")
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():
        raise ConfigError(f"private key {private_key} does not belong to the certificate in {certificate}")
    return Identity(leaf, tuple(chain), key)


def signed_request(identity, url, body, region, now=None):
    """The headers of CreateSession's POST of *body* (bytes) to *url*, signed with *identity*'s key at *now*."""
    from cryptography.hazmat.primitives import serialization

    parts = urlsplit(url)
    path = parts.path or "/"
    moment = (now or utcnow()).astimezone(datetime.timezone.utc)
    stamp = moment.strftime(DATE_FORMAT)
    scope = f"{stamp[:8]}/{region}/{SERVICE}/aws4_request"

    def der64(certificate):
        return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode("ascii")

    headers = {
        "content-type": "application/json",
        "host": parts.netloc,
        "x-amz-date": stamp,
        "x-amz-x509": der64(identity.leaf),
    }
    if identity.chain:
        headers["x-amz-x509-chain"] = ",".join(der64(certificate) for certificate in identity.chain)
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join([
        "POST", path, "", "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names), signed,
        hashlib.sha256(body).hexdigest(),
    ])
    to_sign = "\n".join([identity.algorithm, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    signature = identity.sign(to_sign.encode()).hex()
    headers["authorization"] = (f"{identity.algorithm} Credential={identity.leaf.serial_number}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


def session_body(trust_anchor_arn, profile_arn, role_arn, duration_seconds, role_session_name=None):
    """CreateSession's JSON body."""
    body = {"durationSeconds": duration_seconds, "profileArn": profile_arn, "roleArn": role_arn,
            "trustAnchorArn": trust_anchor_arn}
    if role_session_name:
        body["roleSessionName"] = role_session_name
    return json.dumps(body).encode()


def _opener(url, settings):
    """A urllib opener for *url*: the CA bundle and proxy of *settings* (StsSettings), never this process's own."""
    import ssl
    import urllib.request

    from imsa import sts_settings

    # The CA bundle the CLI read (AWS_CA_BUNDLE) travels with the session; else botocore's, as STS calls use.
    verify = sts_settings.verify_for(settings) if settings is not None else True
    context = ssl.create_default_context(cafile=None if verify is True else verify)
    proxy = settings.proxy_for(url) if settings is not None else None
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                       urllib.request.ProxyHandler({"https": proxy} if proxy else {}))


def create_session(identity, url, region, trust_anchor_arn, profile_arn, role_arn, duration_seconds=DEFAULT_DURATION,
                   role_session_name=None, settings=None, now=None):
    """CreateSession at *url*: the role's Credentials, or SessionRefused with what Roles Anywhere said."""
    import urllib.error
    import urllib.request

    body = session_body(trust_anchor_arn, profile_arn, role_arn, duration_seconds, role_session_name)
    headers = signed_request(identity, f"{url}/sessions", body, region, now)
    request = urllib.request.Request(f"{url}/sessions", data=body, headers=headers, method="POST")
    try:
        with _opener(url, settings).open(request, timeout=CONNECT_TIMEOUT + READ_TIMEOUT) as answer:
            data = answer.read(MAX_ANSWER)
    except urllib.error.HTTPError as error:
        raise SessionRefused(f"Roles Anywhere refused CreateSession for {role_arn} ({error.code}): "
                             f"{_reason(error.read(MAX_ANSWER))}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SessionRefused(f"cannot reach Roles Anywhere at {url}: {reason}") from None
    return _credentials(data, url, now)


def _reason(data):
    """The message of an error answer, one line."""
    try:
        answer = json.loads(data.decode("utf-8"))
        text = answer.get("message") or answer.get("Message") or json.dumps(answer)
    except (ValueError, UnicodeDecodeError, AttributeError):
        text = data.decode("utf-8", "replace")
    return " ".join(str(text).split())[:300] or "no reason given"


def _credentials(data, url, now=None):
    """Credentials from CreateSession's answer (its first credentialSet)."""
    try:
        answer = json.loads(data.decode("utf-8"))
        values = answer["credentialSet"][0]["credentials"]
        return Credentials(values["accessKeyId"], values["secretAccessKey"], values["sessionToken"],
                           parse_time(values["expiration"]), issued=(now or utcnow()).replace(microsecond=0))
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise SessionRefused(f"Roles Anywhere at {url} answered CreateSession with no credentials") from None


@dataclass(frozen=True)
class Anchor:
    """Where the certificate and key are and what to present them to: the material of a ``roles_anywhere``
    session (paths and ARNs only: no key, no secret), and the source the CLI resolves from a profile."""

    certificate: str
    private_key: str
    trust_anchor_arn: str
    profile_arn: str
    region: str
    intermediates: str = None
    endpoint_url: str = None
    where: str = field(default=None, compare=False)
    # The role CreateSession is made for, when the CLI resolved this from a profile: the first hop of its chain.
    first_hop: object = field(default=None, compare=False)

    kind = KIND
    needs_person = False
    expiration = NO_END

    @property
    def fingerprint(self):
        """The files, trust anchor and profile, hashed: every role reached through them shares one session."""
        return fingerprint(KIND, os.path.abspath(self.certificate), os.path.abspath(self.private_key),
                           self.intermediates and os.path.abspath(self.intermediates), self.trust_anchor_arn,
                           self.profile_arn, self.endpoint_url)

    @property
    def label(self):
        """``Roles Anywhere certificate PATH``."""
        return f"Roles Anywhere certificate {self.certificate}"

    def expired(self, now=None):
        """Never: the files are read again at each refresh."""
        return False

    def new_session(self, mfa=None, settings=None, sts_factory=None):
        """The session is this very value (checked once here so that a wrong path is said before the service
        holds it): the service reads the files at each refresh."""
        load_identity(self.certificate, self.private_key, self.intermediates)
        return self

    def identity(self, passphrase=None):
        """The certificate, chain and key as the files hold them now."""
        return load_identity(self.certificate, self.private_key, self.intermediates, passphrase)

    def url(self):
        """Where CreateSession goes."""
        return self.endpoint_url or f"https://{SERVICE}.{self.region}.amazonaws.com"

    def create_session(self, role_arn, duration_seconds=DEFAULT_DURATION, role_session_name=None, settings=None,
                       passphrase=None, now=None):
        """Role credentials for *role_arn*, reading the files now."""
        return create_session(self.identity(passphrase), self.url(), self.region, self.trust_anchor_arn,
                              self.profile_arn, role_arn, duration_seconds, role_session_name, settings, now)

    def to_json(self):
        """The control plane's form (paths and ARNs)."""
        return {"certificate": self.certificate, "private_key": self.private_key,
                "intermediates": self.intermediates, "trust_anchor_arn": self.trust_anchor_arn,
                "profile_arn": self.profile_arn, "region": self.region, "endpoint_url": self.endpoint_url,
                "expiration": format_time(NO_END)}

    @classmethod
    def from_json(cls, data):
        """Validate what the control plane received; ValueError names the first bad field."""
        from imsa.sts_settings import REGION, url_problem

        if not isinstance(data, dict):
            raise ValueError("'material' must be a JSON object")
        unknown = set(data) - {"certificate", "private_key", "intermediates", "trust_anchor_arn", "profile_arn",
                               "region", "endpoint_url", "expiration"}
        if unknown:
            raise ValueError(f"'material' has an unknown field {sorted(unknown)[0]!r}")
        for name in ("certificate", "private_key", "intermediates"):
            value = data.get(name)
            if value is None and name == "intermediates":
                continue
            if not isinstance(value, str) or not value.startswith("/") or len(value) > 4096 or not value.isprintable():
                raise ValueError(f"'material.{name}' must be an absolute path")
        if not isinstance(data.get("trust_anchor_arn"), str) or not TRUST_ANCHOR.match(data["trust_anchor_arn"]):
            raise ValueError("'material.trust_anchor_arn' must be a Roles Anywhere trust anchor ARN")
        if not isinstance(data.get("profile_arn"), str) or not PROFILE.match(data["profile_arn"]):
            raise ValueError("'material.profile_arn' must be a Roles Anywhere profile ARN")
        if not isinstance(data.get("region"), str) or not REGION.match(data["region"]):
            raise ValueError("'material.region' must be a region name")
        endpoint = data.get("endpoint_url")
        if endpoint is not None:
            problem = url_problem(endpoint)
            if problem or not endpoint.startswith("https://"):
                raise ValueError(f"'material.endpoint_url' {problem or 'must be an https:// URL'}")
        return cls(data["certificate"], data["private_key"], data["trust_anchor_arn"], data["profile_arn"],
                   data["region"], data.get("intermediates"), endpoint)


def mint(anchor, spec):
    """The minter of ``roles_anywhere`` sessions (sources.KINDS): CreateSession for the first role of *spec* (its
    ``via`` hops, then the final role), reading the files now, then AssumeRole through the rest."""
    from imsa import sts

    hops = [dict(spec, **hop) for hop in spec.get("via") or ()] + [spec]
    first = hops[0]
    credentials = anchor.create_session(first["role_arn"], first["duration_seconds"], None, spec.get("sts"))
    for hop in hops[1:]:
        credentials = sts.assume_role(credentials, hop)
    return credentials


# --- the aws_signing_helper command line ---


def helper_parser(prog="imsa credential-process"):
    """A parser of ``aws_signing_helper credential-process``'s options (the ones imsa reads)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    add_helper_options(parser)
    return parser


def anchor_from(values, where, environ=None):
    """(Anchor, role_arn, session duration, session name) from parsed helper options; ConfigError with *where*."""
    from imsa.limits import PATTERNS

    missing = [f"--{name.replace('_', '-')}" for name in ("certificate", "private_key", "trust_anchor_arn",
                                                           "profile_arn", "role_arn") if not values.get(name)]
    if missing:
        raise ConfigError(f"{where}: Roles Anywhere needs {', '.join(missing)}")
    region = region_of(values["trust_anchor_arn"])
    if region is None:
        raise ConfigError(f"{where}: --trust-anchor-arn {values['trust_anchor_arn'][:100]!r} is not a Roles Anywhere "
                          "trust anchor ARN (arn:aws:rolesanywhere:REGION:ACCOUNT:trust-anchor/ID)")
    if not PROFILE.match(values["profile_arn"]):
        raise ConfigError(f"{where}: --profile-arn {values['profile_arn'][:100]!r} is not a Roles Anywhere profile ARN "
                          "(arn:aws:rolesanywhere:REGION:ACCOUNT:profile/ID)")
    pattern, description = PATTERNS["role_arn"]
    if not pattern.match(values["role_arn"]):
        raise ConfigError(f"{where}: --role-arn {values['role_arn'][:100]!r} is not {description}")
    region = values.get("region") or region
    pattern, description = PATTERNS["region"]
    if not pattern.match(region):
        raise ConfigError(f"{where}: --region {region[:40]!r} is not {description}")
    duration = values.get("session_duration") or DEFAULT_DURATION
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise ConfigError(f"{where}: --session-duration must be from {MIN_DURATION} to {MAX_DURATION}, not {duration}")
    name = values.get("role_session_name")
    if name is not None and not PATTERNS["role_session_name"][0].match(name):
        raise ConfigError(f"{where}: --role-session-name is not {PATTERNS['role_session_name'][1]}")
    endpoint = values.get("endpoint")
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint  # aws_signing_helper takes a host name as well
    endpoint = endpoint or endpoint_for(region, environ)
    if not endpoint.startswith("https://"):
        raise ConfigError(f"{where}: the Roles Anywhere endpoint {endpoint[:100]!r} must be an https:// URL")
    paths = {name: os.path.abspath(os.path.expanduser(values[name])) if values.get(name) else None
             for name in ("certificate", "private_key", "intermediates")}
    anchor = Anchor(paths["certificate"], paths["private_key"], values["trust_anchor_arn"], values["profile_arn"],
                    region, paths["intermediates"], endpoint.rstrip("/"), where)
    return anchor, values["role_arn"], duration, name


def from_process_line(command, where, environ=None):
    """The Anchor (its role as ``first_hop``) when *command* is ``aws_signing_helper credential-process …`` (or imsa's drop-in
    form of it); None for any other credential_process."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if len(argv) < 2 or os.path.basename(argv[0]) not in HELPERS or argv[1] != "credential-process":
        return None
    if "--certificate" not in argv and not any(word.startswith("--certificate=") for word in argv):
        return None  # ``imsa credential-process PROFILE``: a profile of imsa's, not a certificate
    words = argv[2:]
    values, rest = helper_parser().parse_known_args(words)
    if rest:
        raise ConfigError(f"{where}: imsa does not read these options of the signing helper: "
                          f"{' '.join(rest)[:200]} (PKCS#11 and TPM keys are not supported)")
    anchor, role_arn, duration, name = anchor_from(vars(values), where, environ)
    from imsa import config
    from imsa.limits import MAX_ROLE_DURATION

    # The service renews the role before it ends, so an hour (what a role spec carries at most) is enough.
    hop = Hop(role_arn, name or config.default_session_name(), min(duration, MAX_ROLE_DURATION))
    return dataclasses.replace(anchor, first_hop=hop)
