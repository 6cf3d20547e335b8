"""``imsa shell-init`` and ``imsa completion``: the shell code of imsa.shell, written to stdout.

Every new shell runs them: this module imports imsa.shell and imsa.rundir, nothing else of imsa.
"""

import sys

from imsa import rundir
from imsa import shell as shells
from imsa.errors import EXIT_OK


def shell_init(shell, auto=False):
    """Print the hook that keeps AWS_REGION in step with the profile imsa serves, for *shell* (bash, zsh, fish);
    with *auto*, the per-directory profile follows the working directory too."""
    sys.stdout.write(shells.shell_init(shell, rundir.expected_service_uid(), auto))
    return EXIT_OK


def completion(shell):
    """Print the code that completes imsa's commands and profile names in *shell* (bash, zsh, fish)."""
    sys.stdout.write(shells.completion(shell))
    return EXIT_OK
