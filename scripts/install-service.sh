#!/usr/bin/env bash
# Install and enable imsa's systemd units for USER: scripts/install-service.sh USER [IMSA_PATH]
# The units are copied to /etc/systemd/system with ExecStart pointing at the installed imsa, and
# imsa.service.d/user.conf sets User= and Group=. Run as root.
set -euo pipefail
user=${1:?usage: install-service.sh USER [PATH_TO_IMSA]}
imsa=${2:-$(command -v imsa || true)}
here=$(cd "$(dirname "$0")/.." && pwd)
unit_dir=${UNIT_DIR:-/etc/systemd/system}
if [ -z "$imsa" ] || [ ! -x "$imsa" ]; then
    echo "install-service.sh: cannot find the imsa command; pass its path as the second argument" >&2
    exit 1
fi
if ! id -u "$user" >/dev/null 2>&1; then
    echo "install-service.sh: no such user: $user" >&2
    exit 1
fi
if [ "$(id -u "$user")" = 0 ]; then
    echo "install-service.sh: refusing to serve credentials as root; name your own user" >&2
    exit 1
fi
group=$(id -gn "$user")
install -d -m 0755 "$unit_dir" "$unit_dir/imsa.service.d"
install -m 0644 "$here/imsa.socket" "$unit_dir/imsa.socket"
sed "s|^ExecStart=/usr/local/bin/imsa |ExecStart=$imsa |" "$here/imsa.service" > "$unit_dir/imsa.service"
chmod 0644 "$unit_dir/imsa.service"
printf '[Service]\nUser=%s\nGroup=%s\n' "$user" "$group" > "$unit_dir/imsa.service.d/user.conf"
chmod 0644 "$unit_dir/imsa.service.d/user.conf"
if [ -z "${UNIT_DIR:-}" ]; then
    systemctl daemon-reload
    systemctl enable --now imsa.socket imsa.service
    echo "imsa: enabled imsa.socket and imsa.service for $user; check with: imsa status"
fi
