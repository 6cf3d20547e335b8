"""The one exception root of imsa; each subclass carries its exit code (see the README, "Exit codes")."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_STS = 4
EXIT_SERVICE = 5
EXIT_INTERRUPTED = 130


class ImsaError(Exception):
    """Any failure imsa reports to the user as one line."""

    exit_code = EXIT_ERROR

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class UsageError(ImsaError):
    """The command line asks for something that cannot be done."""

    exit_code = EXIT_USAGE


class ConfigError(ImsaError):
    """~/.imsa is missing, unreadable or invalid."""

    exit_code = EXIT_CONFIG


class StsError(ImsaError):
    """STS refused or could not be reached (wrong MFA code, access denied, network)."""

    exit_code = EXIT_STS


class MfaError(StsError):
    """No usable MFA code could be obtained."""


class ServiceNotRunning(ImsaError):
    """The imsa service is not running or does not answer on its control socket."""

    exit_code = EXIT_SERVICE


class ServiceError(ImsaError):
    """The imsa service cannot start, or answered with an error."""

    exit_code = EXIT_ERROR
