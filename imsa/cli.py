# PYTHON_ARGCOMPLETE_OK
"""The command line: argparse + argcomplete, the only place that prints errors for people and picks exit codes.

Nothing heavy is imported here at module level (no boto3, Flask or waitress), so completion and status stay fast.
"""

import argparse
import logging
import os
import sys

from imsa import __version__, sudo
from imsa.errors import EXIT_ERROR, EXIT_INTERRUPTED, ImsaError
from imsa.logs import mute_wire_loggers


MFA_HELP = "the 6-digit MFA code, or - to read it from stdin (else mfa_process or a prompt)"


def _complete_profiles(prefix, **_kwargs):
    from imsa import config

    return [name for name in config.profile_names() if name.startswith(prefix)]


def build_parser():
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="imsa",
        description="Temporary AWS credentials for every SDK on this machine, from one MFA session.",
    )
    parser.add_argument("--version", action="version", version=f"imsa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show what imsa does")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = commands.add_parser("start", help="start the service")
    start.add_argument("--listen", metavar="ADDR:PORT", help="where IMDS listens (default 169.254.169.254:80)")
    start.add_argument("--foreground", action="store_true", help="serve in this process (for systemd)")
    start.add_argument("--allow-imdsv1", action="store_true", help="also answer requests without an IMDSv2 token")
    start.add_argument("--user", metavar="NAME", help="when run as root: the user to serve (default: SUDO_USER)")
    start.add_argument("--report-ready", action="store_true", help=argparse.SUPPRESS)

    commands.add_parser("stop", help="stop the service")

    status = commands.add_parser("status", help="show what the service serves")
    status.add_argument("--json", action="store_true", help="print JSON")

    assume = commands.add_parser("assume", help="make PROFILE the role every SDK on the machine gets")
    assume.add_argument("profile", metavar="PROFILE").completer = _complete_profiles
    assume.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    export = commands.add_parser("export", help="print shell exports of PROFILE's credentials")
    export.add_argument("profile", metavar="PROFILE").completer = _complete_profiles
    export.add_argument("--format", choices=("sh", "fish", "json"), default="sh", help="output format (default sh)")
    export.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    run_as = commands.add_parser(
        "exec", help="run a command with PROFILE's role (refreshed through a container-credentials endpoint)",
        usage="imsa exec PROFILE [--mode ecs|static] [--mfa-token CODE] -- COMMAND [ARGS...]",
    )
    run_as.add_argument("profile", metavar="PROFILE").completer = _complete_profiles
    _add_exec_options(run_as)
    run_as.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command to run")

    process = commands.add_parser(
        "credential-process", help="print PROFILE's credentials for credential_process in ~/.aws/config"
    )
    process.add_argument("profile", metavar="PROFILE").completer = _complete_profiles

    console = commands.add_parser("console", help="open the AWS console signed in with PROFILE's role")
    console.add_argument("profile", metavar="PROFILE").completer = _complete_profiles
    console.add_argument("--print", action="store_true", dest="print_url", help="print the sign-in URL instead of opening it")
    console.add_argument("--duration", type=int, metavar="S", help="console session length in seconds, 900-43200")
    console.add_argument("--destination", metavar="URL", help="the console page to land on")
    console.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    install = commands.add_parser("install-service", help="install and enable the systemd units for USER (as root)")
    install.add_argument("user", nargs="?", metavar="USER", help="the user the service serves (default: SUDO_USER)")
    install.add_argument("--unit-dir", metavar="DIR", help="write the units to DIR instead, and enable nothing")
    install.add_argument("--no-enable", action="store_true", help="write the units only: no daemon-reload, no enable")
    return parser


def _add_exec_options(parser):
    parser.add_argument("--mode", choices=("ecs", "static"), default="ecs",
                        help="ecs: refreshed through the service's endpoint (default); static: plain AWS_* variables")
    parser.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)


def _exec_command(args):
    """Split ``imsa exec``'s remainder into options given after PROFILE and the command after ``--``."""
    words = list(args.argv)
    if words and words[0] == "--":
        return words[1:]
    if words and words[0].startswith("-"):
        if "--" not in words:
            from imsa.errors import UsageError

            raise UsageError("put the command after --: imsa exec PROFILE [--mode ecs|static] -- COMMAND [ARGS...]")
        split = words.index("--")
        options = argparse.ArgumentParser(prog="imsa exec", add_help=False)
        _add_exec_options(options)
        options.parse_args(words[:split], namespace=args)
        return words[split + 1:]
    return words


def run(args):
    """Dispatch parsed *args* to commands.py."""
    from imsa import commands

    if args.command == "start":
        return commands.start(args.listen, args.allow_imdsv1, args.foreground, args.user, debug=args.debug,
                              report_ready=args.report_ready)
    if args.command == "stop":
        return commands.stop()
    if args.command == "status":
        return commands.status(args.json)
    if args.command == "assume":
        return commands.assume(args.profile, args.mfa_token)
    if args.command == "export":
        return commands.export(args.profile, args.format, args.mfa_token)
    if args.command == "exec":
        from imsa import commands_exec

        command = _exec_command(args)
        return commands_exec.exec_command(args.profile, command, args.mode, args.mfa_token)
    if args.command == "credential-process":
        from imsa import commands_exec

        return commands_exec.credential_process(args.profile)
    if args.command == "console":
        from imsa import commands_console

        return commands_console.console(args.profile, args.print_url, args.duration, args.destination, args.mfa_token)
    if args.command == "install-service":
        from imsa import commands_install

        return commands_install.install_service(args.user, args.unit_dir, enable=not args.no_enable)
    raise AssertionError(args.command)


def main(argv=None):
    """Entry point of the ``imsa`` command; returns the exit code."""
    parser = build_parser()
    # argcomplete acts only when the shell asks for completions (it sets _ARGCOMPLETE); importing it on every
    # other run cost about 10 ms of each `imsa status` and `imsa export` (scripts/bench.py).
    if "_ARGCOMPLETE" in os.environ:
        try:
            import argcomplete

            argcomplete.autocomplete(parser)
        except ImportError:  # completion is a convenience
            pass
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="imsa: %(message)s", stream=sys.stderr)
    # Even with --debug: botocore's DEBUG lines print STS's raw answers, i.e. the MFA session's secret and token.
    mute_wire_loggers()
    try:
        if args.command not in sudo.ROOT_COMMANDS:
            sudo.become_invoking_user()  # `sudo imsa stop`: the invoking user's service, with that user's rights
        return run(args)
    except ImsaError as error:
        if args.debug:
            logging.exception("failed")
        sys.stderr.write(f"imsa: error: {error}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("imsa: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as error:  # the one funnel: a bug still gets one line, and a traceback with --debug
        if args.debug:
            raise
        sys.stderr.write(f"imsa: error: unexpected {type(error).__name__}: {error} (run with --debug for details)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
