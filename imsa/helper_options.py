"""``aws_signing_helper credential-process``'s options, with its names: on ``imsa credential-process``'s parser
(cli.py) and on a credential_process line's (imsa/sources/roles_anywhere.py, which reads the rest).

A module of its own so that building the parser, on every command's start, does not import the Roles Anywhere
source (dataclasses, hashlib, datetime: about 15 ms each time).
"""


def add_helper_options(parser):
    """``aws_signing_helper credential-process``'s options, with its names, on *parser*."""
    parser.add_argument("--certificate", metavar="PATH", help="the certificate (PEM: may hold the whole chain)")
    parser.add_argument("--private-key", metavar="PATH", help="the certificate's private key (RSA, P-256, P-384)")
    parser.add_argument("--intermediates", metavar="PATH", help="intermediate CA certificates (PEM)")
    parser.add_argument("--trust-anchor-arn", metavar="ARN", help="the Roles Anywhere trust anchor")
    parser.add_argument("--profile-arn", metavar="ARN", help="the Roles Anywhere profile")
    parser.add_argument("--role-arn", metavar="ARN", help="the role to get credentials for")
    parser.add_argument("--session-duration", type=int, metavar="SECONDS", help="900-43200 (default 3600)")
    parser.add_argument("--region", metavar="REGION", help="default: the trust anchor's region")
    parser.add_argument("--endpoint", metavar="URL", help="the Roles Anywhere endpoint (default: the region's)")
    parser.add_argument("--role-session-name", metavar="NAME", help="the session's name (if the profile accepts it)")
