# PYTHON_ARGCOMPLETE_OK
"""The command line: argparse + argcomplete, the only place that prints errors for people and picks exit codes.

Nothing heavy is imported here at module level (no boto3, Flask or waitress), so completion and status stay fast.
Each command registers its handler by name (``run="roles.assume"``: imsa.commands.roles.assume), and only the
module of the command that runs is imported. argparse and logging are imported by the functions that use them:
``imsa status --short``, and ``imsa export P`` / ``imsa credential-process P`` with a held session
(imsa/commands/fast.py), answer before any parser is built, at the start of every prompt, shell and SDK process.
"""

import os
import sys

from imsa.errors import (
    EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_SERVICE, EXIT_STS, EXIT_USAGE, ImsaError, UsageError,
)


MFA_HELP = "the 6-digit MFA code, or - to read it from stdin (else mfa_process or a prompt)"
AUTO_HELP = "PROFILE auto: the profile a trusted .imsa.json here selects (README, \"Per-directory profiles\")"
TRUST_HELP = "trust the .imsa.json that PROFILE auto uses without a prompt, if its digest is DIGEST"
# What each exit code means, for the --help of every command (README, "Exit codes").
EXIT_MEANINGS = {
    EXIT_OK: "ok", EXIT_ERROR: "other error", EXIT_USAGE: "usage", EXIT_CONFIG: "configuration (~/.imsa, ~/.aws/config)",
    EXIT_STS: "MFA or STS", EXIT_SERVICE: "service not running", EXIT_INTERRUPTED: "interrupted",
}
SERVICE_CODES = (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STS, EXIT_SERVICE, EXIT_INTERRUPTED)
# The package of the handlers a command's ``run`` names.
HANDLERS = "imsa.commands"
# What every command's namespace holds besides the handler's arguments: the command's name, its registration and
# the global flags. A handler gets a global flag only when it registers for it (``flags=("debug",)``).
NOT_ARGUMENTS = ("command", "run", "flags", "prepare", "debug", "verbose")


def _complete_profiles(prefix, **_kwargs):
    from imsa import config

    return [name for name in config.profile_names() if name.startswith(prefix)]


def _epilog(example, codes=SERVICE_CODES, meanings=None, lead=""):
    """The end of a command's --help: a one-line example and the exit codes it may give (*meanings* override)."""
    meanings = {**EXIT_MEANINGS, **(meanings or {})}
    return f"example: {example}\nexit codes: {lead}" + ", ".join(f"{code} {meanings[code]}" for code in codes)


def _add_global_flags(parser, suppress):
    """-v and --debug, on the main parser and again on each command's (``imsa status -v`` = ``imsa -v status``).

    A command's copy defaults to SUPPRESS, so that leaving it out there keeps what was given before the command.
    """
    import argparse

    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("--debug", action="store_true", default=default, help="show debug logs and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="show what imsa does")


def build_parser():
    """The argument parser for every command."""
    import argparse

    from imsa import __version__
    from imsa.formats import FORMATS
    from imsa.shell import SHELLS

    parser = argparse.ArgumentParser(
        prog="imsa",
        description="Temporary AWS credentials for every SDK on this machine, from one MFA session.",
        epilog=_epilog("imsa assume my-profile   (imsa COMMAND --help: each command's options)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imsa {__version__}")
    _add_global_flags(parser, suppress=False)
    flags_parser = argparse.ArgumentParser(add_help=False)
    _add_global_flags(flags_parser, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help, example, codes=SERVICE_CODES, meanings=None, lead="", *, run, flags=(), prepare=None,
                **kwargs):
        """A command's parser; *run* names its handler (``module.function`` in imsa/commands/), *flags* the global
        flags it is given, *prepare* a step on the parsed arguments before it runs. The parser's dests are the
        handler's parameter names."""
        parser = commands.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", parents=[flags_parser],
            epilog=_epilog(example, codes, meanings, lead), formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        parser.set_defaults(run=run, flags=flags, prepare=prepare)
        return parser

    start = command("start", "start the service", "sudo imsa start   (development: imsa start --listen 127.0.0.1:8080)",
                    (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED), {EXIT_ERROR: "it did not start"},
                    run="service.start", flags=("debug",))  # the background service logs as the command asked
    start.add_argument("--listen", metavar="ADDR:PORT", help="where IMDS listens (default 169.254.169.254:80)")
    start.add_argument("--foreground", action="store_true", help="serve in this process (for systemd)")
    start.add_argument("--allow-imdsv1", action="store_true", help="also answer requests without an IMDSv2 token")
    start.add_argument("--user", metavar="NAME", help="when run as root: the user to serve (default: SUDO_USER)")
    start.add_argument("--report-ready", action="store_true", help=argparse.SUPPRESS)
    keep = start.add_mutually_exclusive_group()
    keep.add_argument("--keep-sessions", action="store_const", const=True, dest="keep_sessions",
                      help="save sessions (encrypted, in the secret store's care) so a restart asks for no MFA; "
                      "default: on when the secret store is the OS keyring")
    keep.add_argument("--no-keep-sessions", action="store_const", const=False, dest="keep_sessions",
                      help="keep sessions in memory only")
    start.add_argument("--bindings-listen", metavar="ADDR:PORT", action="append",
                       help="serve the bindings of imsa bind there: 127.0.0.1:PORT (full URIs) and/or "
                            "169.254.170.2:80 (relative URIs); may be given twice")
    start.add_argument("--state-dir", metavar="DIR", help="where bindings are kept (default ~/.local/state/imsa)")
    start.add_argument("--delivery-log", metavar="PATH",
                       help="also append each credential delivery to PATH (0600, rotated; default: memory only)")

    command("stop", "stop the service", "imsa stop", (EXIT_OK, EXIT_ERROR, EXIT_SERVICE), run="service.stop")

    status = command("status", "show what the service serves", "imsa status --json",
                     (EXIT_OK, EXIT_ERROR, EXIT_SERVICE),
                     {EXIT_OK: "valid credentials served", EXIT_ERROR: "nothing valid served"}, run="service.status")
    status.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    status.add_argument("--short", action="store_true",
                        help="one line for a shell prompt: the profile and the time left before its session ends")

    delivery_log = command("log", "show which process received which profile's credentials, and how",
                           "imsa log --follow --profile admin", (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SERVICE),
                           run="log.show_log")
    delivery_log.add_argument("--follow", action="store_true", help="keep showing new deliveries until Ctrl-C")
    delivery_log.add_argument("--profile", metavar="PROFILE", help="this profile's deliveries only"
                              ).completer = _complete_profiles
    delivery_log.add_argument("--json", action="store_true", dest="as_json", help="one JSON object a line")

    listing = command("list", "list every profile: its file, source, role, region and whether a session is held",
                      "imsa list --json", (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STS),
                      run="profiles.list_profiles")
    listing.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    listing.add_argument("--sso", metavar="PROFILE", help="instead: the accounts and roles PROFILE's IAM Identity "
                         "Center login may use").completer = _complete_profiles
    listing.add_argument("--server", metavar="SERVER", help="instead: the roles the credential server SERVER (its id "
                         "or url in servers.d) offers you")

    login = command("login", "sign in to PROFILE's IAM Identity Center (AWS SSO) or credential server: one login "
                    "serves every role on it", "imsa login dev   (no browser here: imsa login dev --no-browser)",
                    (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STS, EXIT_SERVICE, EXIT_INTERRUPTED),
                    {EXIT_STS: "sign-in refused or expired"}, run="cred_server.login")
    login.add_argument("name", metavar="PROFILE").completer = _complete_profiles
    login.add_argument("--no-browser", action="store_true",
                       help="sign in with a code on another device (the default where no browser can open)")

    assume = command("assume", "make PROFILE the role every SDK on the machine gets", "imsa assume admin",
                     run="roles.assume")
    assume.add_argument("name", metavar="PROFILE", nargs="?",
                        help="the profile (none, on a terminal: choose it from a list)").completer = _complete_profiles
    assume.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    export = command(
        "export", "print PROFILE's credentials for one shell or tool (--format), or write them as a profile of a "
        "credentials file (--to-credentials-file); --unset and --erase: the way back",
        'eval "$(imsa export admin)"   (and back: eval "$(imsa export --unset)")',
        (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STS, EXIT_INTERRUPTED),
        usage="imsa export PROFILE [--format FORMAT] [--mfa-token CODE] [--confirm-trust DIGEST]\n"
              "       imsa export PROFILE --to-credentials-file [NAME] [--file PATH] [--format sh|fish|powershell]\n"
              "       imsa export --erase NAME [--file PATH]\n"
              "       imsa export --unset [--format sh|fish|powershell]",
        run="roles.export",
    )
    export.add_argument("name", metavar="PROFILE", nargs="?", help=AUTO_HELP).completer = _complete_profiles
    export.add_argument("--format", choices=FORMATS, default="sh", dest="fmt", metavar="FORMAT",
                        help=f"{', '.join(FORMATS)} (default sh; README, \"Delivery formats\")")
    export.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)
    export.add_argument("--unset", action="store_true", help="print the lines that unset what imsa export sets")
    export.add_argument("--confirm-trust", metavar="DIGEST", help=TRUST_HELP)
    export.add_argument("--to-credentials-file", nargs="?", const="", metavar="NAME",
                        help="write the credentials as profile NAME (default: PROFILE) of ~/.aws/credentials")
    export.add_argument("--file", metavar="PATH", dest="credentials_path",
                        help="with --to-credentials-file or --erase: this credentials file instead (and print the "
                             "AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE exports that use it)")
    export.add_argument("--erase", metavar="NAME", help="remove the profile NAME imsa export wrote, and nothing else")

    run_as = command(
        "exec", "run a command with PROFILE's role (refreshed through a container-credentials endpoint); "
        "without a command, $SHELL", "imsa exec admin -- terraform plan",
        (EXIT_USAGE, EXIT_CONFIG, EXIT_STS, EXIT_SERVICE, 126, 127), {126: "cannot run", 127: "command not found"},
        lead="the command's own status once it runs; before that ",
        usage="imsa exec PROFILE [--mode ecs|static] [--mfa-token CODE] [--confirm-trust DIGEST]\n"
              "                 [-- COMMAND [ARGS...]]",
        run="exec.exec_command", prepare=_prepare_exec,
    )
    run_as.add_argument("name", metavar="PROFILE", help=AUTO_HELP).completer = _complete_profiles
    _add_exec_options(run_as)
    run_as.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                        help="the command to run (default: $SHELL)")

    process = command(
        "credential-process", "print PROFILE's credentials for credential_process in ~/.aws/config, or a "
        "certificate's (IAM Roles Anywhere, with aws_signing_helper's options)",
        "credential_process = imsa credential-process admin   (in ~/.aws/config)",
        usage="imsa credential-process PROFILE\n       imsa credential-process --certificate PATH --private-key PATH "
              "--trust-anchor-arn ARN --profile-arn ARN --role-arn ARN [--intermediates PATH] "
              "[--session-duration S] [--region REGION]",
        run="roles_anywhere.credential_process",
    )
    process.add_argument("name", metavar="PROFILE", nargs="?", help=AUTO_HELP).completer = _complete_profiles
    _add_signing_helper_options(process)
    process.add_argument("--confirm-trust", metavar="DIGEST", help=TRUST_HELP)

    console = command("console", "open the AWS console signed in with PROFILE's role", "imsa console admin --print",
                      run="console.console")
    console.add_argument("name", metavar="PROFILE", nargs="?",
                         help="the profile (none, on a terminal: choose it from a list)").completer = _complete_profiles
    console.add_argument("--print", action="store_true", dest="print_url", help="print the sign-in URL instead of opening it")
    console.add_argument("--duration", type=int, metavar="S", help="console session length in seconds, 900-43200")
    console.add_argument("--destination", metavar="URL", help="the console page to land on")
    console.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    bind = command(
        "bind", "give a system service PROFILE's role: a named binding and the environment file for its unit",
        "imsa bind web web-profile --env-file /etc/web/aws.env   (EnvironmentFile= in web.service)",
        (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_STS, EXIT_SERVICE), run="bind.bind",
    )
    bind.add_argument("binding", metavar="NAME", help="the binding's name (e.g. the service's)")
    bind.add_argument("name", metavar="PROFILE").completer = _complete_profiles
    bind.add_argument("--mode", choices=("ecs-full", "ecs-full-query", "ecs-relative", "ecs-relative-query"),
                      default="ecs-full", help="how the service's SDK reaches imsa (default ecs-full)")
    bind.add_argument("--env-file", metavar="PATH", help="default: STATE_DIR/env/NAME")
    bind.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)
    _add_system_options(bind)
    bind.add_argument("--address", metavar="ADDR:PORT", dest="listen",
                      help="with --system: imsa-system.socket's loopback listener (default 127.0.0.1:7223)")

    unbind = command("unbind", "remove binding NAME and its token (its environment file too)", "imsa unbind web",
                     (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SERVICE), run="bind.unbind")
    unbind.add_argument("binding", metavar="NAME")
    _add_system_options(unbind)

    serve = command(
        "serve-system", "serve the system configuration's bindings (what imsa-system.service runs, as its own user)",
        "imsa serve-system --config-dir /etc/imsa/system   (ExecStart= of imsa-system.service)",
        (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG), run="system.serve_system",
    )
    serve.add_argument("--config-dir", metavar="DIR", help="the root-owned configuration (default /etc/imsa/system)")

    install = command(
        "install-service", "install and enable the systemd units for USER (as root)",
        "sudo imsa install-service alice   (files only: --unit-dir DIR)", (EXIT_OK, EXIT_ERROR, EXIT_USAGE),
        run="install.install_service",
    )
    install.add_argument("user", nargs="?", metavar="USER", help="the user the service serves (default: SUDO_USER)")
    install.add_argument("--unit-dir", metavar="DIR", help="write the units to DIR instead, and enable nothing")
    install.add_argument("--no-enable", action="store_false", dest="enable",
                         help="write the units only: no daemon-reload, no enable")
    install.add_argument("--system", action="store_true",
                         help="the system-wide mode instead: imsa-system.socket and imsa-system.service")

    logout = command("logout", "forget PROFILE's session (--all: every session) in the service and where it is saved",
                     "imsa logout --all", (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_SERVICE), run="keys.logout")
    logout.add_argument("name", metavar="PROFILE", nargs="?").completer = _complete_profiles
    logout.add_argument("--all", action="store_true", dest="every", help="forget every session")

    add = command("add", "store PROFILE's long-term keys, typed on the terminal, in the secret store",
                  "imsa add work --mfa-serial arn:aws:iam::123456789012:mfa/alice",
                  (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_INTERRUPTED), run="keys.add")
    add.add_argument("name", metavar="PROFILE")
    add.add_argument("--mfa-serial", metavar="ARN", help="the MFA device's ARN, written to the profile")

    remove = command("remove", "delete PROFILE's keys from the secret store (and the reference to them)",
                     "imsa remove work", (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG), run="keys.remove")
    remove.add_argument("name", metavar="PROFILE").completer = _complete_profiles

    rotate = command("rotate", "replace PROFILE's access key: create a new one, store it, delete the old one",
                     "imsa rotate work", run="keys.rotate")
    rotate.add_argument("name", metavar="PROFILE").completer = _complete_profiles
    rotate.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)

    command("edit", "open ~/.imsa in $EDITOR, and save it only once it is valid", "EDITOR=nano imsa edit",
            (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG), {EXIT_CONFIG: "left invalid: nothing saved"},
            run="keys.edit")

    migrate = command("migrate", "move plain-text keys of ~/.imsa (and ~/.aws/credentials) into the secret store",
                      "imsa migrate --dry-run", (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG), run="keys.migrate")
    migrate.add_argument("--dry-run", action="store_true", help="say what would move, change nothing")
    migrate.add_argument("--from-aws-credentials", action="store_true",
                         help="also ~/.aws/credentials' keys (their sections then get them through imsa)")

    hook = command(
        "shell-init", "print the shell hook that keeps AWS_REGION in step with the profile imsa serves",
        'eval "$(imsa shell-init bash)"   (in ~/.bashrc; fish: imsa shell-init fish | source)', (EXIT_OK, EXIT_USAGE),
        run="shell.shell_init",
    )
    hook.add_argument("shell", choices=SHELLS, metavar="bash|zsh|fish")
    hook.add_argument("--auto", action="store_true",
                      help="also export the profile a trusted .imsa.json selects on each cd (imsa export auto)")

    completion = command(
        "completion", "print the shell code that completes imsa's commands and profile names",
        'eval "$(imsa completion bash)"   (in ~/.bashrc; fish: imsa completion fish | source)', (EXIT_OK, EXIT_USAGE),
        run="shell.completion",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="bash|zsh|fish")
    return parser


def _add_system_options(parser):
    parser.add_argument("--system", action="store_true",
                        help="as root: in the system configuration that imsa-system.service serves")
    parser.add_argument("--config-dir", metavar="DIR", help="with --system: default /etc/imsa/system")


def _add_signing_helper_options(parser):
    """``aws_signing_helper credential-process``'s options, under its names (imsa/sources/roles_anywhere.py)."""
    from imsa.helper_options import add_helper_options

    add_helper_options(parser.add_argument_group("IAM Roles Anywhere (aws_signing_helper's options)"))


def _add_exec_options(parser):
    parser.add_argument("--mode", choices=("ecs", "static"),
                        help="ecs: refreshed through the service's endpoint (default); static: plain AWS_* variables")
    parser.add_argument("--mfa-token", metavar="CODE", help=MFA_HELP)
    parser.add_argument("--confirm-trust", metavar="DIGEST", help=TRUST_HELP)


def _prepare_exec(args):
    """``imsa exec``'s remainder: options given after PROFILE into *args*, the command after ``--`` as *argv*."""
    args.argv = _exec_command(args)
    _set_log_level(args)  # -v given after PROFILE counts too


def _exec_command(args):
    """Split ``imsa exec``'s remainder into options given after PROFILE and the command after ``--``."""
    words = list(args.argv)
    if words and words[0] == "--":
        return words[1:]
    if words and words[0].startswith("-"):
        if "--" not in words and not _only_exec_options(words):
            raise UsageError("put the command after --: imsa exec PROFILE [--mode ecs|static] -- COMMAND [ARGS...]")
        split = words.index("--") if "--" in words else len(words)
        _exec_options_parser().parse_args(words[:split], namespace=args)
        return words[split + 1:]
    return words


def _exec_options_parser():
    """A parser of the options ``imsa exec`` takes after PROFILE (its own and the global ones)."""
    import argparse

    options = argparse.ArgumentParser(prog="imsa exec", add_help=False)
    _add_exec_options(options)
    _add_global_flags(options, suppress=True)
    return options


def _only_exec_options(words):
    """True when *words* are all options of ``imsa exec`` (``imsa exec p --mode static``: a shell, no command)."""
    _, rest = _exec_options_parser().parse_known_args(words)
    return not rest


def run(args):
    """Run the handler the command registered: imported only now, called with the parsed arguments as keywords."""
    if args.prepare:
        args.prepare(args)
    import importlib

    module, _, function = args.run.rpartition(".")
    handler = getattr(importlib.import_module(f"{HANDLERS}.{module}"), function)
    values = {name: value for name, value in vars(args).items() if name not in NOT_ARGUMENTS}
    values.update((flag, getattr(args, flag)) for flag in args.flags)
    return handler(**values)


def _set_log_level(args):
    import logging

    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING)


def one_line(message):
    """*message* as one line without an ``imsa: error:`` of its own: the funnel writes the one prefix."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = "; ".join(lines).replace("imsa: error: ", "")
    return text[len("imsa: "):] if text.startswith("imsa: ") else text


# Run at every prompt: answered without building the parser or importing a command module but its own.
SHORT_STATUS = ["status", "--short"]


def _short_status():
    """``imsa status --short``: one line for a prompt, as fast as the control socket answers."""
    from imsa import sudo

    try:
        sudo.become_invoking_user()
        from imsa.commands.prompt import short_status

        return short_status(sys.stdout)
    except ImsaError as error:
        sys.stderr.write(f"imsa: error: {one_line(error)}\n")
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv=None):
    """Entry point of the ``imsa`` command; returns the exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    if "_ARGCOMPLETE" not in os.environ:
        if words == SHORT_STATUS:
            return _short_status()
        from imsa.commands import fast

        answered = fast.run(words, sys.stdout)
        if answered is not None:
            return answered
    return _full(argv)


def _full(argv):
    """Every command: parse *argv* (or complete it), run the handler, turn errors into one line and an exit code."""
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
    # Only now: completion (above) ends the process without them, at every <TAB>.
    import logging

    from imsa import sudo
    from imsa.server.logs import mute_wire_loggers

    logging.basicConfig(format="imsa: %(message)s", stream=sys.stderr)
    _set_log_level(args)
    # Even with --debug: botocore's DEBUG lines print STS's raw answers, i.e. the MFA session's secret and token.
    mute_wire_loggers()
    try:
        if args.command not in sudo.ROOT_COMMANDS:
            sudo.become_invoking_user()  # `sudo imsa stop`: the invoking user's service, with that user's rights
        return run(args)
    except ImsaError as error:
        if args.debug:
            logging.exception("failed")
        sys.stderr.write(f"imsa: error: {one_line(error)}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("imsa: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as error:  # the one funnel: a bug still gets one line, and a traceback with --debug
        if args.debug:
            raise
        sys.stderr.write(f"imsa: error: unexpected {type(error).__name__}: {one_line(error)} (run with --debug for details)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
