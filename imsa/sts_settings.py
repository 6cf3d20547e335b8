"""How imsa reaches STS: one validated value, resolved by the CLI and handed to the service with the session.

The CLI resolves StsSettings from its own environment and the ``[default]`` section of the AWS config file, makes
its GetSessionToken call with exactly them and pushes them to the service with the session; every AssumeRole the
service makes from that session uses them. STS clients are built from this value alone (imsa/sts.py): what
``sudo`` or systemd left in the service's environment, ``AWS_PROFILE`` and the user's files play no part there.

The CA bundle travels as its certificates (PEM text), not as a path: the service runs as another process, often
started by root or systemd, and may not be able to read the user's file; after the privilege drop it may not read
the interpreter's own bundle either. Each distinct bundle becomes an in-memory file (memfd) that OpenSSL opens
through /proc/self/fd; nothing is written to disk.
"""

import dataclasses
import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from imsa.errors import ConfigError, StsError

DEFAULT_REGION = "us-east-1"
# A corporate bundle is usually the system's (~200 kB) plus a few certificates; a control request may be 1 MiB.
MAX_CA_BUNDLE = 512 * 1024
MAX_URL = 2048
MAX_NO_PROXY = 4096
MAX_PATH = 4096
# In-memory CA files are never closed (a closed descriptor's number could be reused under a client still using
# it); only the owner can push bundles, and this bounds what a runaway script of theirs could pin.
MAX_CA_FILES = 16
REGIONAL_MODES = ("legacy", "regional")
# botocore's validate_region_name: the region becomes part of the endpoint's host name.
REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")
MASK = "***"

# Where each setting comes from, first match wins: the environment variables botocore reads, then this key of the
# [default] section of the AWS config file. AWS_REGION comes first, as in the AWS CLI v2 and imsa before.
REGION_SOURCES = (("AWS_REGION", "AWS_DEFAULT_REGION"), "region")
ENDPOINT_SOURCES = (("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"), "endpoint_url")
IGNORE_ENDPOINTS_SOURCES = (("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",), "ignore_configured_endpoint_urls")
REGIONAL_SOURCES = (("AWS_STS_REGIONAL_ENDPOINTS",), "sts_regional_endpoints")
FIPS_SOURCES = (("AWS_USE_FIPS_ENDPOINT",), "use_fips_endpoint")
DUALSTACK_SOURCES = (("AWS_USE_DUALSTACK_ENDPOINT",), "use_dualstack_endpoint")
CA_BUNDLE_SOURCES = (("AWS_CA_BUNDLE",), "ca_bundle")


class SettingsError(ValueError):
    """STS settings sent to the control plane are malformed."""


@dataclass(frozen=True)
class StsSettings:
    """How to reach STS. *region* serves profiles without one of their own; *endpoint_url* is the configured
    override (None: botocore's endpoint for the region); the proxies are HTTP(S)_PROXY and NO_PROXY as set;
    *ca_bundle* is the certificates (PEM) of the CA bundle read from *ca_bundle_path* (None: botocore's own).
    Neither repr nor describe() shows a proxy's password or the bundle itself."""

    region: str = DEFAULT_REGION
    endpoint_url: str = None
    sts_regional_endpoints: str = None
    use_fips_endpoint: bool = False
    use_dualstack_endpoint: bool = False
    http_proxy: str = field(default=None, repr=False)
    https_proxy: str = field(default=None, repr=False)
    no_proxy: str = None
    ca_bundle: str = field(default=None, repr=False)
    ca_bundle_path: str = None

    def for_region(self, region):
        """These settings for a profile with its own *region* (None keeps the session's)."""
        return dataclasses.replace(self, region=region) if region and region != self.region else self

    def proxy_for(self, url):
        """The proxy a request to *url* goes through, decided as botocore does from the proxies and NO_PROXY."""
        import urllib.request

        parts = urlsplit(url)
        proxy = self.https_proxy if parts.scheme == "https" else self.http_proxy
        if not proxy:
            return None
        if self.no_proxy and urllib.request.proxy_bypass_environment(parts.netloc, {"no": self.no_proxy}):
            return None
        return proxy

    def to_json(self):
        """The JSON object the CLI sends with the session."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data):
        """Validate what a client sent; SettingsError names the first bad field."""
        if not isinstance(data, dict):
            raise SettingsError("'sts' must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SettingsError(f"'sts' has an unknown field {sorted(unknown)[0]!r}")
        region = data.get("region", DEFAULT_REGION)
        if not isinstance(region, str) or not REGION.match(region):
            raise SettingsError("'sts.region' must be a region name")
        values = {"region": region}
        for name in ("endpoint_url", "http_proxy", "https_proxy"):
            value = data.get(name)
            if value is not None:
                problem = url_problem(value)
                if problem:
                    raise SettingsError(f"'sts.{name}' {problem}")
                values[name] = value
        mode = data.get("sts_regional_endpoints")
        if mode is not None and mode not in REGIONAL_MODES:
            raise SettingsError(f"'sts.sts_regional_endpoints' must be one of {', '.join(REGIONAL_MODES)}")
        values["sts_regional_endpoints"] = mode
        for name in ("use_fips_endpoint", "use_dualstack_endpoint"):
            value = data.get(name, False)
            if not isinstance(value, bool):
                raise SettingsError(f"'sts.{name}' must be true or false")
            values[name] = value
        for name, limit in (("no_proxy", MAX_NO_PROXY), ("ca_bundle_path", MAX_PATH)):
            value = data.get(name)
            if value is not None:
                if not isinstance(value, str) or len(value) > limit or not value.isprintable():
                    raise SettingsError(f"'sts.{name}' must be printable text of at most {limit} characters")
                values[name] = value
        bundle = data.get("ca_bundle")
        if bundle is not None:
            if not isinstance(bundle, str):
                raise SettingsError("'sts.ca_bundle' must be PEM text")
            problem = bundle_problem(bundle)
            if problem:
                raise SettingsError(f"'sts.ca_bundle' {problem}")
            values["ca_bundle"] = bundle
        return cls(**values)

    def describe(self, endpoint=None):
        """For ``imsa status --json``: every setting, the *endpoint* botocore resolves from them and the proxy
        it goes through; proxy passwords masked, the CA bundle as its path, SHA-256 and certificate count."""
        bundle = None
        if self.ca_bundle is not None:
            bundle = {
                "path": self.ca_bundle_path,
                "sha256": hashlib.sha256(self.ca_bundle.encode()).hexdigest(),
                "certificates": len(CERTIFICATE.findall(self.ca_bundle)),
            }
        return {
            "region": self.region,
            "endpoint": endpoint,
            "endpoint_url": self.endpoint_url,
            "sts_regional_endpoints": self.sts_regional_endpoints,
            "use_fips_endpoint": self.use_fips_endpoint,
            "use_dualstack_endpoint": self.use_dualstack_endpoint,
            "http_proxy": mask_url(self.http_proxy),
            "https_proxy": mask_url(self.https_proxy),
            "no_proxy": self.no_proxy,
            "proxy": mask_url(self.proxy_for(endpoint)) if endpoint else None,
            "ca_bundle": bundle,
        }


def url_problem(value):
    """Why *value* is not an http(s) URL imsa sends STS traffic to or through, or None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_URL:
        return f"must be a URL of at most {MAX_URL} characters"
    if not value.isprintable() or any(c.isspace() for c in value):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number from 0 to 65535)
    except ValueError as error:
        return f"is not a URL ({error})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def bundle_problem(pem):
    """Why *pem* is not a usable CA bundle (certificates only, as resolve() sends them), or None."""
    if len(pem) > MAX_CA_BUNDLE:
        return f"is larger than {MAX_CA_BUNDLE // 1024} KiB"
    if not pem.isascii() or not CERTIFICATE.search(pem):
        return "must be PEM certificates (-----BEGIN CERTIFICATE-----)"
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as error:
        return f"cannot be loaded ({error})"
    return None


def mask_url(url):
    """*url* with its user name and password replaced by ``***`` (as botocore masks proxy URLs)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{MASK}:{MASK}@{host}" if parts.password is not None else f"{MASK}@{host}").geturl()


# --- the CLI: settings from its environment and the [default] section of the AWS config file ---


def config_file_path(environ):
    """The AWS config file botocore would read: AWS_CONFIG_FILE or ~/.aws/config."""
    return os.path.expandvars(os.path.expanduser(environ.get("AWS_CONFIG_FILE") or "~/.aws/config"))


def default_section(path):
    """The loaded AWS config file at *path* as (its [default] section, its [services] sections); ({}, {}) when
    there is none. A file that cannot be parsed is a ConfigError naming it (imsa uses settings from it)."""
    import botocore.configloader
    import botocore.exceptions

    try:
        loaded = botocore.configloader.load_config(path)
    except botocore.exceptions.ConfigNotFound:
        return {}, {}
    except botocore.exceptions.ConfigParseError as error:
        raise ConfigError(
            f"{path}{_parse_problem(error.kwargs.get('error'))}; imsa reads its [default] section for how to reach "
            f"STS (README, \"How imsa reaches STS\")"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
    return loaded.get("profiles", {}).get("default", {}), loaded.get("services", {})


def _parse_problem(error):
    """``:LINE: cannot be parsed (what)`` for configparser's *error*, without the path it repeats."""
    import configparser

    if isinstance(error, configparser.MissingSectionHeaderError):
        return f":{error.lineno}: cannot be parsed ({error.line.strip()!r} comes before any [section] header)"
    if isinstance(error, configparser.ParsingError) and error.errors:
        lineno, line = error.errors[0]
        text = (line[1:-1] if line[:1] in "'\"" else line).replace("\\n", "").strip()  # configparser keeps repr()
        return f":{lineno}: cannot be parsed ({text!r} is neither 'key = value' nor a [section] header)"
    if isinstance(error, (configparser.DuplicateSectionError, configparser.DuplicateOptionError)):
        what = f"option {error.option!r} in " if isinstance(error, configparser.DuplicateOptionError) else ""
        return f":{error.lineno}: cannot be parsed ({what}section {error.section!r} appears twice)"
    return ": cannot be parsed"


def _pick(sources, environ, section, path):
    """(value, where it came from) of the first source that sets it, or (None, None)."""
    names, key = sources
    for name in names:
        if environ.get(name):
            return environ[name], name
    value = section.get(key)
    if isinstance(value, str) and value:
        return value, f"{path} [default] {key}"
    return None, None


def _boolean(sources, environ, section, path):
    value, _ = _pick(sources, environ, section, path)
    return isinstance(value, str) and value.lower() == "true"  # botocore's ensure_boolean


def _environment_proxies(environ):
    """HTTP(S)_PROXY and NO_PROXY as urllib.request.getproxies_environment() reads them (lower case wins)."""
    proxies = {}
    for name, value in environ.items():
        name = name.lower()
        if value and name.endswith("_proxy"):
            proxies[name[:-6]] = value
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            name = name.lower()
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def _endpoint(environ, section, services, path):
    if _boolean(IGNORE_ENDPOINTS_SOURCES, environ, section, path):
        return None, None
    names, key = ENDPOINT_SOURCES
    for name in names:
        if environ.get(name):
            return environ[name], name
    service = services.get(section.get("services"), {}).get("sts", {})
    if isinstance(service, dict) and service.get("endpoint_url"):
        return service["endpoint_url"], f"{path} [services {section.get('services')}] sts endpoint_url"
    value = section.get(key)
    if isinstance(value, str) and value:
        return value, f"{path} [default] {key}"
    return None, None


def read_bundle(path, source):
    """The certificates of the CA bundle at *path* as PEM text; ConfigError naming *path* and *source*."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CA_BUNDLE * 4 + 1)
    except IsADirectoryError:
        raise ConfigError(f"CA bundle {path} (from {source}) is a directory; imsa needs one PEM file") from None
    except OSError as error:
        raise ConfigError(f"CA bundle {path} (from {source}) cannot be read: {error.strerror}") from None
    text = data.decode("utf-8", "replace")
    # Only the certificates travel: comments (certifi's name issuers in UTF-8) are not ASCII, which ssl needs.
    pem = "\n".join(block.replace("\r", "") for block in CERTIFICATE.findall(text)) + "\n"
    problem = "has no PEM certificates (-----BEGIN CERTIFICATE-----)" if len(pem) < 2 else bundle_problem(pem)
    if problem:
        raise ConfigError(f"CA bundle {path} (from {source}) {problem}")
    return pem


def resolve(environ=None):
    """The StsSettings this process uses, from its environment and the [default] section of its AWS config file.

    AWS_PROFILE and AWS_DEFAULT_PROFILE play no part: imsa's STS clients carry their own credentials, so a profile
    selected for other tools never changes how imsa reaches STS. A bad value is a ConfigError naming its source.
    """
    environ = os.environ if environ is None else environ
    path = config_file_path(environ)
    section, services = default_section(path)
    region, source = _pick(REGION_SOURCES, environ, section, path)
    if region is not None and not REGION.match(region):
        raise ConfigError(f"{source}: {region!r} is not a region name")
    values = {"region": region or DEFAULT_REGION}
    endpoint, source = _endpoint(environ, section, services, path)
    if endpoint is not None:
        problem = url_problem(endpoint)
        if problem:
            raise ConfigError(f"{source} {problem}")
        values["endpoint_url"] = endpoint
    mode, source = _pick(REGIONAL_SOURCES, environ, section, path)
    if mode is not None:
        if mode.lower() not in REGIONAL_MODES:
            raise ConfigError(f"{source} must be one of {', '.join(REGIONAL_MODES)}, not {mode!r}")
        values["sts_regional_endpoints"] = mode.lower()
    values["use_fips_endpoint"] = _boolean(FIPS_SOURCES, environ, section, path)
    values["use_dualstack_endpoint"] = _boolean(DUALSTACK_SOURCES, environ, section, path)
    proxies = _environment_proxies(environ)
    for scheme in ("http", "https"):
        proxy = proxies.get(scheme)
        if proxy:
            if "://" not in proxy:  # botocore reads "host:port" as an http:// proxy
                proxy = "http://" + proxy
            problem = url_problem(proxy)
            if problem:
                raise ConfigError(f"{scheme.upper()}_PROXY {problem}")
            values[f"{scheme}_proxy"] = proxy
    if proxies.get("no"):
        values["no_proxy"] = proxies["no"]
    bundle, source = _pick(CA_BUNDLE_SOURCES, environ, section, path)
    if bundle is None and environ.get("REQUESTS_CA_BUNDLE"):  # botocore's last resort, as in boto3
        bundle, source = environ["REQUESTS_CA_BUNDLE"], "REQUESTS_CA_BUNDLE"
    if bundle is not None:
        values["ca_bundle"] = read_bundle(bundle, source)
        values["ca_bundle_path"] = os.path.abspath(bundle)
    return StsSettings(**values)


# --- CA bundles as in-memory files ---

_files = {}
_files_lock = threading.Lock()
_default = {}


def keep_default_bundle(pem):
    """Use *pem* wherever the settings name no CA bundle (the service keeps botocore's own bundle in memory before
    the privilege drop: the interpreter's directory may not be readable after it)."""
    _default["pem"] = pem


def verify_for(settings):
    """botocore's ``verify`` for *settings*: an in-memory file with their CA bundle, or True for botocore's own."""
    pem = settings.ca_bundle or _default.get("pem")
    return ca_file(pem) if pem else True


def ca_file(pem):
    """A path OpenSSL can open for *pem* as long as this process lives: one in-memory file per distinct bundle."""
    digest = hashlib.sha256(pem.encode()).hexdigest()
    with _files_lock:
        fd = _files.get(digest)
        if fd is None:
            if len(_files) >= MAX_CA_FILES:
                raise StsError(f"more than {MAX_CA_FILES} different CA bundles were used since the service started; "
                               f"restart it (imsa stop, then imsa start)")
            fd = os.memfd_create("imsa-ca-bundle", os.MFD_CLOEXEC)
            data = memoryview(pem.encode("ascii"))
            while data:
                data = data[os.write(fd, data):]
            _files[digest] = fd
    return f"/proc/self/fd/{fd}"
