"""The constraints STS itself applies, shared by the CLI's config loader and the service.

They live apart from config.py so that the service (imsa/server/) checks what it is sent without importing the
CLI's loader of ~/.imsa.
"""

import re

DEFAULT_ROLE_DURATION = 3600
# STS caps a role assumed with session credentials at one hour ("role chaining").
MAX_ROLE_DURATION = 3600
MIN_DURATION = 900
DEFAULT_SESSION_DURATION = 12 * 3600
MAX_SESSION_DURATION = 36 * 3600

# The constraints STS itself applies (botocore's STS model), checked here so the user hears of them first.
PATTERNS = {
    "aws_access_key_id": (re.compile(r"^[A-Z0-9]{16,128}$"), "16-128 capital letters and digits"),
    "role_arn": (
        re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$"),
        "an IAM role ARN like arn:aws:iam::123456789012:role/NAME",
    ),
    "role_session_name": (re.compile(r"^[\w+=,.@-]{2,64}$"), "2-64 characters from letters, digits and _+=,.@-"),
    "mfa_serial_number": (
        re.compile(r"^[\w+=/:,.@-]{9,256}$"),
        "an MFA device ARN or hardware serial (9-256 characters)",
    ),
    "external_id": (re.compile(r"^[\w+=,.@:/-]{2,1224}$"), "2-1224 characters from letters, digits and _+=,.@:/-"),
    "region": (re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$"), "a region name like us-east-1"),
}
