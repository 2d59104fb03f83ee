#!/usr/bin/env bash
# Install failoverd on a systemd host: the steps of the README's "Install on a host".
#
#   sudo examples/install.sh                    # install on this host (as root)
#   DESTDIR=/tmp/root examples/install.sh       # write the files under /tmp/root and print,
#                                               # as "+ command", what root would run
#
# Environment: PREFIX (the venv, default /opt/failoverd), PYTHON (default python3),
# AGENTS ("alice bob": users put in the failoverd group, so they may use the socket),
# SYSTEMD_VERSION (default: what `systemctl --version` says; 253 and later also get
# the Type=notify-reload drop-in). Run it again to upgrade: an existing
# /etc/failoverd/failoverd.toml and existing keys are never touched.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/failoverd}
PYTHON=${PYTHON:-python3}
AGENTS=${AGENTS:-}
UNITS=/etc/systemd/system
CONFIG=/etc/failoverd/failoverd.toml
KEYS=/etc/failoverd/keys

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root, or set DESTDIR to write the files under a directory" >&2
    exit 1
fi

# A command only root runs on the real host: run it, or with DESTDIR print it.
as_root() {
    if [ -n "$DESTDIR" ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# A file of the install, written under DESTDIR: put SOURCE at PATH with MODE.
put() {
    install -D -m "$3" "$1" "$DESTDIR$2"
    echo "installed $2 (mode $3)"
}

systemd_version() {
    if [ -n "${SYSTEMD_VERSION:-}" ]; then
        echo "$SYSTEMD_VERSION"
    else
        systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 + 0 }' || echo 0
    fi
}

# 1. The service's user and group. Agents join the group to reach the socket (0660).
if [ -n "$DESTDIR" ] || ! getent passwd failoverd >/dev/null; then
    as_root useradd --system --user-group --home-dir /var/lib/failoverd --no-create-home \
        --shell /usr/sbin/nologin failoverd
fi

# 2. A venv of its own, and the command at /usr/local/bin/failoverd, where the unit runs it.
as_root "$PYTHON" -m venv "$PREFIX"
as_root "$PREFIX/bin/pip" install --quiet --upgrade "$SRC"
mkdir -p "$DESTDIR/usr/local/bin"
ln -sfn "$PREFIX/bin/failoverd" "$DESTDIR/usr/local/bin/failoverd"
echo "linked /usr/local/bin/failoverd -> $PREFIX/bin/failoverd"

# 3. The units: the hardened service, its socket, and Type=notify-reload where known.
put "$SRC/systemd/failoverd.service" "$UNITS/failoverd.service" 0644
put "$SRC/systemd/failoverd.socket" "$UNITS/failoverd.socket" 0644
if [ "$(systemd_version)" -ge 253 ]; then
    put "$SRC/systemd/notify-reload.conf" "$UNITS/failoverd.service.d/notify-reload.conf" 0644
fi

# 4. The config (no secrets in it: readable by all), kept if it exists.
if [ -e "$DESTDIR$CONFIG" ]; then
    echo "kept $CONFIG"
else
    put "$SRC/examples/failoverd.toml" "$CONFIG" 0644
fi

# 5. Keys: root's files, 0600, in a directory only root enters. systemd's LoadCredential=
#    reads them as root and hands the service a copy that only the service can read.
install -d -m 0700 "$DESTDIR$KEYS"
echo "made $KEYS (mode 0700)"
for name in $(sed -n 's/^credential *= *"\([^"]*\)".*/\1/p' "$DESTDIR$CONFIG"); do
    if ! grep -q "^LoadCredential=$name:$KEYS/$name\$" "$DESTDIR$UNITS/failoverd.service"; then
        echo "warning: $CONFIG uses credential \"$name\": add LoadCredential=$name:$KEYS/$name" \
             "to a drop-in (systemctl edit failoverd)" >&2
    fi
    if [ ! -e "$DESTDIR$KEYS/$name" ]; then
        echo "key needed: $KEYS/$name (root:root, 0600), e.g." \
             "(umask 077; read -rs KEY && printf %s \"\$KEY\" > $KEYS/$name)"
    fi
done

# 6. The ledger is rotated by logrotate; the daemon's own log goes to journald.
put "$SRC/examples/failoverd.logrotate" /etc/logrotate.d/failoverd 0644

# 7. The agents that may call it.
for agent in $AGENTS; do
    as_root usermod --append --groups failoverd "$agent"
done

# 8. Check, then start listening: the socket starts the daemon on the first connection.
as_root systemctl daemon-reload
if ! as_root env CREDENTIALS_DIRECTORY="$KEYS" /usr/local/bin/failoverd check --config "$CONFIG"
then
    echo "install.sh: failoverd check failed: fix the above (the keys in $KEYS, $CONFIG)," \
         "then run: systemctl enable --now failoverd.socket" >&2
    exit 1
fi
as_root systemctl enable --now failoverd.socket
