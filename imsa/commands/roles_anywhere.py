"""``imsa credential-process`` with ``aws_signing_helper``'s options: IAM Roles Anywhere credentials for one SDK.

``credential_process = aws_signing_helper credential-process --certificate … --private-key … --trust-anchor-arn …
--profile-arn … --role-arn …`` keeps working with ``imsa`` in the place of ``aws_signing_helper``. This process reads
the certificate and key and makes CreateSession itself: a credential_process needs no service, and the SDK that
runs it caches what it prints until it nears its expiry. An encrypted key's passphrase is asked on the terminal.
"""

import json
import logging

from imsa.commands.common import Io
from imsa.errors import EXIT_OK, ConfigError, UsageError

log = logging.getLogger(__name__)

HELPER_OPTIONS = ("certificate", "private_key", "intermediates", "trust_anchor_arn", "profile_arn", "role_arn",
                  "session_duration", "region", "endpoint", "role_session_name")


def credential_process(name=None, io=None, **options):
    """Print credential_process JSON: PROFILE's (imsa's own form), or a certificate's (aws_signing_helper's form)."""
    helper = {key: options.get(key) for key in HELPER_OPTIONS}
    given = [key for key, value in helper.items() if value is not None]
    if name is not None:
        if given:
            raise UsageError("give either PROFILE or the certificate options (--certificate …), not both")
        from imsa.commands.exec import credential_process as profile_process

        return profile_process(name, io=io, confirm_trust=options.get("confirm_trust"))
    if not given:
        raise UsageError("give a PROFILE, or --certificate, --private-key, --trust-anchor-arn, --profile-arn and "
                         "--role-arn (aws_signing_helper's options)")
    io = io or Io()
    creds, role_arn = helper_credentials(helper)
    body = creds.to_process()
    body["AccountId"] = role_arn.split(":")[4]
    io.data(json.dumps(body) + "\n")
    return EXIT_OK


def helper_credentials(values, environ=None, prompt=None):
    """(Credentials, role ARN) of aws_signing_helper-style *values*, by a CreateSession made here."""
    from imsa import sts_settings
    from imsa.sources import roles_anywhere

    anchor, role_arn, duration, session_name = roles_anywhere.anchor_from(values, "credential-process", environ)
    settings = sts_settings.resolve(environ)
    try:
        identity = anchor.identity()
    except ConfigError as error:
        if "is encrypted" not in str(error):
            raise
        identity = anchor.identity(passphrase_for(anchor.private_key, prompt))
    creds = roles_anywhere.create_session(identity, anchor.url(), anchor.region, anchor.trust_anchor_arn,
                                          anchor.profile_arn, role_arn, duration, session_name, settings)
    return creds, role_arn


def passphrase_for(path, prompt=None):
    """The passphrase of the key at *path*, asked on the terminal (never stdin: it may be the SDK's pipe)."""
    import getpass

    from imsa import sts

    if prompt is not None:
        return prompt(f"Passphrase for {path}: ").encode()
    tty = sts.open_terminal()
    if tty is None:
        raise ConfigError(f"private key {path} is encrypted and there is no terminal to ask its passphrase on")
    tty.close()
    return getpass.getpass(f"Passphrase for {path}: ").encode()
