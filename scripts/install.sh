#!/usr/bin/env bash
# Install sandboxd as a system service on a Debian machine, from this checkout. Idempotent: run it
# again after `git pull` to upgrade. Works with and without a running systemd (in a chroot, an image
# build or a container that is not booted, the units are installed but nothing is reloaded).
#
#   sudo scripts/install.sh            install / upgrade
#   sudo scripts/install.sh --now      ... and enable + (re)start sandboxd.socket and sandboxd.service
#
# What it does, in order:
#   1. a venv at /opt/sandboxd/venv from /usr/bin/python3 (created only if missing), and the package
#      from this checkout installed into it (copied first: the checkout may be read-only);
#   2. /usr/local/bin/sandboxctl and /usr/local/sbin/sandboxd links into the venv;
#   3. the units into /usr/local/lib/systemd/system, the sysusers.d and tmpfiles.d snippets into
#      /usr/local/lib/{sysusers,tmpfiles}.d, docs/service.md into /usr/local/share/doc/sandboxd;
#   4. the sandboxd user and group (systemd-sysusers, or groupadd/useradd without it);
#   5. subordinate uids and gids for sandboxd: sandboxd.hostsetup.ensure_subids, the one owner of
#      the range's size and place (`sandboxctl setup` calls it too, so the two give one range);
#   6. /run/sandboxd and /var/lib/sandboxd (systemd-tmpfiles, or install -d without it);
#   7. `systemctl daemon-reload` when systemd is the running init.
#
# Environment: SANDBOXD_VENV (default /opt/sandboxd/venv), SANDBOXD_PREFIX (default /usr/local),
# PYTHON (default /usr/bin/python3), PIP_* as usual (e.g. PIP_CACHE_DIR).
set -euo pipefail

now=no
for arg in "$@"; do
    case $arg in
        --now) now=yes ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SANDBOXD_VENV:-/opt/sandboxd/venv}
prefix=${SANDBOXD_PREFIX:-/usr/local}
python=${PYTHON:-/usr/bin/python3}
unitdir=$prefix/lib/systemd/system
sysusersdir=$prefix/lib/sysusers.d
tmpfilesdir=$prefix/lib/tmpfiles.d
docdir=$prefix/share/doc/sandboxd

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -x "$python" ] || die "$python not found (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is older than 3.11"
systemd_running=no
[ -d /run/systemd/system ] && systemd_running=yes

# --- 1. venv and package ----------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$python" -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
fi
# pip builds in the source tree; the checkout may be read-only (a bind mount, a CI clone), so
# build from a copy that holds only what the package needs.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
for f in pyproject.toml README.md LICENSE; do
    if [ -e "$src/$f" ]; then cp "$src/$f" "$build/"; fi
done
if [ ! -e "$build/README.md" ]; then echo "sandboxd" > "$build/README.md"; fi  # pyproject readme
cp -r "$src/sandboxd" "$build/sandboxd"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
say "installing sandboxd from $src into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools
# --force-reinstall --no-deps for the package itself: same version number, new code.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$build"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --force-reinstall "$build"
"$venv/bin/python" -c 'import sandboxd.daemon, sandboxd.cli' \
    || die "the installed package does not import"

# --- 2. commands on PATH ----------------------------------------------------------------------
install -d "$prefix/bin" "$prefix/sbin"
ln -sfn "$venv/bin/sandboxctl" "$prefix/bin/sandboxctl"
ln -sfn "$venv/bin/sandboxd" "$prefix/sbin/sandboxd"

# --- 3. units, snippets, docs -----------------------------------------------------------------
install -d "$unitdir" "$sysusersdir" "$tmpfilesdir" "$docdir"
install -m 0644 "$src/systemd/sandboxd.service" "$src/systemd/sandboxd.socket" "$unitdir/"
install -m 0644 "$src/systemd/sysusers.d/sandboxd.conf" "$sysusersdir/sandboxd.conf"
install -m 0644 "$src/systemd/tmpfiles.d/sandboxd.conf" "$tmpfilesdir/sandboxd.conf"
if [ -f "$src/docs/service.md" ]; then
    install -m 0644 "$src/docs/service.md" "$docdir/service.md"
fi
say "units in $unitdir, snippets in $sysusersdir and $tmpfilesdir"

# --- 4. user and group ------------------------------------------------------------------------
if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$sysusersdir/sandboxd.conf"
else
    getent group sandboxd >/dev/null || groupadd --system sandboxd
    getent passwd sandboxd >/dev/null || useradd --system --gid sandboxd \
        --home-dir /var/lib/sandboxd --no-create-home --shell /usr/sbin/nologin \
        --comment "sandboxd sandbox daemon" sandboxd
fi
getent passwd sandboxd >/dev/null || die "user sandboxd was not created"

# --- 5. subordinate ids -----------------------------------------------------------------------
# hostsetup.ensure_subids owns the size (hostsetup.SUBID_COUNT: enough for 1,024 rooms) and the
# first-fit place; `sandboxctl setup --user sandboxd` then finds the range and adds nothing.
# No count here: a second size would give the user two ranges (issue 22).
"$venv/bin/python" - <<'EOF'
import pwd
from sandboxd import hostsetup
for line in hostsetup.ensure_subids("sandboxd", pwd.getpwnam("sandboxd").pw_uid):
    print("install.sh:", line)
EOF

# --- 6. directories ---------------------------------------------------------------------------
if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$tmpfilesdir/sandboxd.conf"
else
    install -d -m 0755 -o sandboxd -g sandboxd /run/sandboxd /var/lib/sandboxd \
        /var/lib/sandboxd/state
fi

# --- 7. systemd -------------------------------------------------------------------------------
if [ "$systemd_running" = yes ]; then
    systemctl daemon-reload
    if [ "$now" = yes ]; then
        # The socket cannot be restarted under a running service; this stop ends all rooms.
        systemctl stop sandboxd.service sandboxd.socket
        systemctl enable --now sandboxd.socket sandboxd.service
    fi
    say "done. Start it with: systemctl enable --now sandboxd.socket sandboxd.service"
else
    if [ "$now" = yes ]; then say "systemd is not running: --now ignored"; fi
    say "done (systemd is not running: units installed, nothing reloaded)"
fi
say "clients must be in the sandboxd group: usermod -aG sandboxd USER (then log in again)"
