#!/usr/bin/env bash
# Install and enable imsa's systemd units for USER: sudo scripts/install-service.sh USER [PATH_TO_IMSA]
# A wrapper around `imsa install-service USER` that also finds an imsa sudo's PATH does not reach: a pipx install in
# $PIPX_BIN_DIR, or in ~/.local/bin of the user who ran sudo or of USER. UNIT_DIR=DIR writes the units to DIR and
# enables nothing. See README, "Running at boot".
set -euo pipefail
user=${1:?usage: install-service.sh USER [PATH_TO_IMSA]}
imsa=${2:-$(command -v imsa || true)}
if [ -z "$imsa" ]; then
    # sudo's secure_path lacks ~/.local/bin, where pipx puts its commands.
    candidates=("${PIPX_BIN_DIR:-}")
    for who in "${SUDO_USER:-}" "$user"; do
        home=$(getent passwd "$who" | cut -d: -f6 || true)
        if [ -n "$who" ] && [ -n "$home" ]; then
            candidates+=("$home/.local/bin")
        fi
    done
    for dir in "${candidates[@]}"; do
        if [ -n "$dir" ] && [ -x "$dir/imsa" ]; then
            imsa=$dir/imsa
            break
        fi
    done
fi
if [ -z "$imsa" ] || [ ! -x "$imsa" ]; then
    echo "install-service.sh: cannot find the imsa command (on PATH, in \$PIPX_BIN_DIR or ~/.local/bin); pass its" \
         "path as the second argument" >&2
    exit 1
fi
args=(install-service "$user")
if [ -n "${UNIT_DIR:-}" ]; then
    args+=(--unit-dir "$UNIT_DIR")
fi
exec "$imsa" "${args[@]}"
