"""Shell set-up: the region hook (``imsa shell-init``) and completion code (``imsa completion``).

boto3, botocore and the AWS CLI v1 never read the region from IMDS: a shell without ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` fails with "You must specify a region" even though imsa serves the profile's region. The hook
keeps both variables in step with the profile the service serves, at every prompt, without running a process:
``imsa assume`` and ``imsa status`` write the active profile's region to REGION_FILE beside the control socket
(0600, as the service's user), and the hook reads that one line with the shell's own ``read`` while the socket
exists. It only ever changes variables it set itself (it remembers their value in HOOK_VARIABLE): a region the
person exported, or one ``imsa export``/``imsa exec`` set for another profile, is left as it is.

Light on purpose: ``eval "$(imsa shell-init bash)"`` runs in every new shell.
"""

import os
import shlex

from imsa import rundir

SHELLS = ("bash", "zsh", "fish")
REGION_FILE = "region"
# The region the hook last exported; a region variable holding another value was set by someone else.
HOOK_VARIABLE = "IMSA_SHELL_REGION"
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Set by the hook's ``imsa`` function for the command alone: the region follows the profile right after it.
HOOK_MARK = "IMSA_SHELL_HOOK"
# What ``imsa export`` may set, in the order it prints them: ``imsa export --unset`` removes all of them.
EXPORTED_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
    "IMSA_PROFILE", "IMSA_PROFILE_EXPIRATION",
) + REGION_VARIABLES


# --- the region file ---


def region_file(socket_path):
    """Where the active profile's region is kept for the hook: beside the control socket."""
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), REGION_FILE)


def record_region(socket_path, region, owner_uid):
    """Write *region* (None: remove the file) for the hook, when this process is the service's user *owner_uid*.

    Anyone else (root talking to a user's service) writes nothing there: root touches no path the user controls.
    The file is replaced atomically, so a prompt never reads half of it; nothing is followed through a symlink.
    """
    if os.geteuid() != owner_uid or os.geteuid() == 0:
        return
    path = region_file(socket_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            if region and os.read(fd, 64) == (region + "\n").encode("ascii"):
                return  # already so: `imsa status` rewrites nothing
        finally:
            os.close(fd)
    if not region:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    partial = f"{path}.{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(partial, flags, 0o600)
    except FileExistsError:
        os.unlink(partial)
        fd = os.open(partial, flags, 0o600)
    try:
        os.write(fd, (region + "\n").encode("ascii"))
    finally:
        os.close(fd)
    os.replace(partial, path)


# --- the hook ---


def _places(uid=None):
    """(control socket, region file) pairs in the order the CLI looks for its service (rundir.client_path)."""
    return [(os.path.abspath(path), region_file(path)) for path in rundir.candidates(uid)]


# bash and zsh share the function; only the way it is called at each prompt differs. It returns the status it
# was called with (in `last`: zsh reserves `status`), so that prompts showing the last command's status still
# show it. Patterns, not regular expressions, check the line read: no module to load, no process to start.
_POSIX_FUNCTION = r"""
_imsa_region() {
    local last=$? sock file region=
    [[ -z ${_imsa_auto_on-} ]] || _imsa_auto
    set -- "${_imsa_places[@]}"
    while [ $# -ge 2 ]; do
        sock=$1 file=$2
        shift 2
        if [[ -S $sock ]]; then
            if [[ -O ${sock%/*} && -O $file && -f $file ]]; then
                read -r region < "$file"
            fi
            break
        fi
    done
    [[ -n $region && $region != *[!a-z0-9-]* ]] || region=
    local mine=${IMSA_SHELL_REGION-}
    if [[ ${AWS_REGION-$mine} == "$mine" && ${AWS_DEFAULT_REGION-$mine} == "$mine" ]]; then
        if [[ -n $region ]]; then
            export AWS_REGION=$region AWS_DEFAULT_REGION=$region IMSA_SHELL_REGION=$region
        elif [[ -n $mine ]]; then
            unset AWS_REGION AWS_DEFAULT_REGION IMSA_SHELL_REGION
        fi
    fi
    return $last
}
imsa() {
    IMSA_SHELL_HOOK=1 command imsa "$@"
    local last=$?
    _imsa_region
    return $last
}
"""

# imsa shell-init --auto: on a change of directory, the profile a trusted .imsa.json here selects is exported into
# the shell (imsa export auto: the trust prompt and any MFA prompt are on the terminal), and removed on leaving it,
# unless someone else exported another profile meanwhile. The walk here only decides whether to ask imsa, which
# applies its own rules (ceilings, filesystem boundaries, trust); a file imsa refuses changes nothing.
_POSIX_AUTO = r"""
_imsa_auto_on=1
_imsa_auto() {
    [[ $PWD == "${_imsa_auto_pwd-}" ]] && return 0
    _imsa_auto_pwd=$PWD
    local dir=$PWD found= text
    while [[ -n $dir ]]; do
        if [[ -e $dir/.imsa.json || -L $dir/.imsa.json ]]; then
            found=$dir/.imsa.json
            break
        fi
        [[ $dir == "${HOME-}" || $dir == / ]] && break
        dir=${dir%/*}
        dir=${dir:-/}
    done
    if [[ -n $found ]]; then
        [[ $found == "${_imsa_auto_file-}" && ${IMSA_PROFILE-} == "${_imsa_auto_profile-}" ]] && return 0
        if text=$(IMSA_SHELL_HOOK=1 command imsa export auto); then
            eval "$text"
            _imsa_auto_file=$found _imsa_auto_profile=${IMSA_PROFILE-}
        fi
    elif [[ -n ${_imsa_auto_file-} ]]; then
        if [[ ${IMSA_PROFILE-} == "${_imsa_auto_profile-}" ]]; then
            eval "$(command imsa export --unset)"
        fi
        unset _imsa_auto_file _imsa_auto_profile
    fi
}
"""

_FISH_AUTO = r"""
set -g _imsa_auto_on 1
function _imsa_auto
    test "$PWD" = "$_imsa_auto_pwd"; and return 0
    set -g _imsa_auto_pwd $PWD
    set -l dir $PWD
    set -l found
    while test -n "$dir"
        if test -e $dir/.imsa.json; or test -L $dir/.imsa.json
            set found $dir/.imsa.json
            break
        end
        if test "$dir" = "$HOME"; or test "$dir" = /
            break
        end
        set dir (string replace -r '/[^/]*$' '' -- $dir)
        test -n "$dir"; or set dir /
    end
    if test -n "$found"
        if test "$found" = "$_imsa_auto_file"; and test "$IMSA_PROFILE" = "$_imsa_auto_profile"
            return 0
        end
        set -l text (IMSA_SHELL_HOOK=1 command imsa export auto --format fish)
        if test $status -eq 0
            printf '%s\n' $text | source
            set -g _imsa_auto_file $found
            set -g _imsa_auto_profile $IMSA_PROFILE
        end
    else if set -q _imsa_auto_file
        if test "$IMSA_PROFILE" = "$_imsa_auto_profile"
            command imsa export --unset --format fish | source
        end
        set -e _imsa_auto_file
        set -e _imsa_auto_profile
    end
end
"""

_BASH_REGISTER = r"""
if [[ ";${PROMPT_COMMAND-};" != *";_imsa_region;"* ]]; then
    PROMPT_COMMAND="_imsa_region${PROMPT_COMMAND:+;$PROMPT_COMMAND}"
fi
_imsa_region
"""

_ZSH_REGISTER = r"""
autoload -Uz add-zsh-hook
add-zsh-hook precmd _imsa_region
_imsa_region
"""

_FISH_FUNCTION = r"""
function _imsa_region --on-event fish_prompt
    set -l region
    set -q _imsa_auto_on; and _imsa_auto
    set -l places $_imsa_places
    while set -q places[2]
        set -l sock $places[1]
        set -l file $places[2]
        set -e places[1..2]
        if test -S $sock
            if test -O (string replace -r '/[^/]*$' '' -- $sock); and test -O $file; and test -f $file
                read -l line < $file; and set region $line
            end
            break
        end
    end
    string match -qr '^[a-z0-9-]+$' -- "$region"; or set region
    set -l mine
    set -q IMSA_SHELL_REGION; and set mine $IMSA_SHELL_REGION
    set -l owned yes
    for name in AWS_REGION AWS_DEFAULT_REGION
        if set -q $name; and test "$$name" != "$mine"
            set owned no
        end
    end
    if test $owned = yes
        if test -n "$region"
            set -gx AWS_REGION $region
            set -gx AWS_DEFAULT_REGION $region
            set -gx IMSA_SHELL_REGION $region
        else if test -n "$mine"
            set -e AWS_REGION
            set -e AWS_DEFAULT_REGION
            set -e IMSA_SHELL_REGION
        end
    end
end
function imsa
    IMSA_SHELL_HOOK=1 command imsa $argv
    set -l status_was $status
    _imsa_region
    return $status_was
end
_imsa_region
"""


def fish_quote(value):
    """Quote for fish, where only backslash and single quote are special inside single quotes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shell_init(shell, uid=None, auto=False):
    """The code that ``eval "$(imsa shell-init SHELL)"`` (fish: ``| source``) runs once in a new shell; with *auto*,
    the per-directory profile (.imsa.json) follows the working directory too."""
    places = [path for pair in _places(uid) for path in pair]
    head = f"# imsa shell-init {shell}: AWS_REGION and AWS_DEFAULT_REGION follow the profile imsa serves\n"
    if auto:
        head += "# --auto: on cd, the profile a trusted .imsa.json selects (imsa export auto), and back on leaving\n"
    if shell == "fish":
        return (head + "set -g _imsa_places " + " ".join(fish_quote(path) for path in places) + "\n"
                + (_FISH_AUTO.lstrip("\n") if auto else "") + _FISH_FUNCTION.lstrip("\n"))
    register = _BASH_REGISTER if shell == "bash" else _ZSH_REGISTER
    return (head + "_imsa_places=(" + " ".join(shlex.quote(path) for path in places) + ")"
            + (_POSIX_AUTO if auto else "") + _POSIX_FUNCTION + register.lstrip("\n"))


# --- completion ---


def completion(shell):
    """argcomplete's completion code for ``imsa`` in *shell*: no ``register-python-argcomplete`` needed on PATH."""
    import argcomplete

    return argcomplete.shellcode(["imsa"], shell=shell)

