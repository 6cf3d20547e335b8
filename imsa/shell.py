"""Shell set-up: completion code (``imsa completion``) and the lines that undo ``imsa export``."""

SHELLS = ("bash", "zsh", "fish")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
# What ``imsa export`` may set, in the order it prints them: ``imsa export --unset`` removes all of them.
EXPORTED_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
    "IMSA_PROFILE", "IMSA_PROFILE_EXPIRATION",
) + REGION_VARIABLES


# --- completion and unset lines ---


def completion(shell):
    """argcomplete's completion code for ``imsa`` in *shell*: no ``register-python-argcomplete`` needed on PATH."""
    import argcomplete

    return argcomplete.shellcode(["imsa"], shell=shell)


def unset_lines(fmt):
    """The lines that undo ``imsa export`` in *fmt* (sh or fish)."""
    if fmt == "fish":
        return "".join(f"set -e {name};\n" for name in EXPORTED_VARIABLES)
    return "unset " + " ".join(EXPORTED_VARIABLES) + "\n"
