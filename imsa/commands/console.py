"""``imsa console``: the AWS console in a browser, signed in with a profile's role (federation sign-in, PROTOCOL §4.4).

The login URL carries a sign-in token that is as good as the role for its lifetime: it goes to stdout (``--print``)
or to the browser, never to a log or an error message.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from imsa import __version__
from imsa.commands.common import Io, load_profile, profile_credentials
from imsa.errors import EXIT_OK, ImsaError, StsError, UsageError

SIGNIN_ENV = "IMSA_SIGNIN_URL"
# Sign-in and console hosts per partition, named by the role ARN (arn:PARTITION:iam::...).
PARTITIONS = {
    "aws": ("https://signin.aws.amazon.com/federation", "https://console.aws.amazon.com/"),
    "aws-us-gov": ("https://signin.amazonaws-us-gov.com/federation", "https://console.amazonaws-us-gov.com/"),
    "aws-cn": ("https://signin.amazonaws.cn/federation", "https://console.amazonaws.cn/"),
}
MIN_CONSOLE_DURATION = 900
MAX_CONSOLE_DURATION = 43200
TIMEOUT = 10
ISSUER = "imsa"


class SigninError(StsError):
    """The federation endpoint could not be reached or refused the credentials (exit 4, like STS)."""


def _endpoints(profile):
    partition = profile.role_arn.split(":")[1]
    signin, console_url = PARTITIONS.get(partition, PARTITIONS["aws"])
    signin = os.environ.get(SIGNIN_ENV) or signin
    if profile.region:
        console_url += "console/home?region=" + urllib.parse.quote(profile.region)
    return signin, console_url


def signin_token(signin_url, creds, duration=None, opener=urllib.request.urlopen):
    """Exchange role credentials for a sign-in token (``Action=getSigninToken``)."""
    session = {
        "sessionId": creds.access_key_id,
        "sessionKey": creds.secret_access_key,
        "sessionToken": creds.session_token,
    }
    query = {"Action": "getSigninToken", "Session": json.dumps(session)}
    if duration is not None:
        query["SessionDuration"] = str(duration)
    request = urllib.request.Request(
        signin_url + "?" + urllib.parse.urlencode(query),
        headers={"Accept": "application/json", "User-Agent": f"imsa/{__version__}"},
    )
    # No message below quotes the URL or the exception's text beyond its kind: the URL holds the role's secret.
    try:
        with opener(request, timeout=TIMEOUT) as response:
            raw = response.read(65536)
    except urllib.error.HTTPError as error:
        hint = "; try a shorter --duration, or none" if duration is not None else ""
        raise SigninError(f"the sign-in endpoint refused the credentials (HTTP {error.code}){hint}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or type(error).__name__
        raise SigninError(f"cannot reach the sign-in endpoint {_host(signin_url)}: {reason}") from None
    try:
        token = json.loads(raw)["SigninToken"]
    except (ValueError, KeyError, TypeError):
        raise SigninError("the sign-in endpoint answered without a SigninToken") from None
    if not isinstance(token, str) or not token:
        raise SigninError("the sign-in endpoint answered without a SigninToken")
    return token


def _host(url):
    return urllib.parse.urlsplit(url).netloc or url


def login_url(signin_url, token, destination):
    """The URL that signs the browser in (``Action=login``) and lands on *destination*."""
    query = {"Action": "login", "Issuer": ISSUER, "Destination": destination, "SigninToken": token}
    return signin_url + "?" + urllib.parse.urlencode(query)


def _open_in_browser(url):
    import webbrowser

    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def console(name, print_url=False, duration=None, destination=None, mfa_token=None, io=None, client=None,
            prompt=None, sts_factory=None, opener=urllib.request.urlopen, browser=_open_in_browser):
    """Sign in to the AWS console with profile *name*'s role: open the browser, or print the URL with *print_url*."""
    io = io or Io()
    if duration is not None and not MIN_CONSOLE_DURATION <= duration <= MAX_CONSOLE_DURATION:
        raise UsageError(f"--duration must be from {MIN_CONSOLE_DURATION} to {MAX_CONSOLE_DURATION} seconds")
    if destination is not None and urllib.parse.urlsplit(destination).scheme not in ("https", "http"):
        raise UsageError("--destination must be an https:// URL of the console")
    if not name:
        from imsa.commands.picker import choose_profile

        name = choose_profile("console", client)
    profile = load_profile(name, io)
    if not profile.role_arn:
        raise UsageError(
            f"profile {name} has no role_arn: AWS's console sign-in takes role credentials, not the MFA session "
            f"credentials such a profile gets; use a profile with role_arn"
        )
    signin_url, default_destination = _endpoints(profile)
    _, creds = profile_credentials(name, mfa_token, io, client, prompt, sts_factory, way="console",
                                   command=f"imsa console {name}")
    token = signin_token(signin_url, creds, duration, opener)
    url = login_url(signin_url, token, destination or default_destination)
    if print_url:
        io.data(url + "\n")
        return EXIT_OK
    if not browser(url):
        raise ImsaError("no web browser could be started; run again with --print and open the URL yourself")
    io.say(f"imsa: opened the AWS console for {name} ({profile.role_arn}) in your browser")
    return EXIT_OK
