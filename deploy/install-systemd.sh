#!/usr/bin/env bash
# Install the VFMOS systemd units (vfmos.target, vfmd, vfm-* services) for a virtualenv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATES="$REPO/deploy/systemd"
PREFIX="$REPO/.venv"
DEST=/etc/systemd/system
ENABLE=1
RENDER_ONLY=""
ACCOUNT=vfmos
PROG="$(basename "$0")"
ARGS=("$@")

usage() {
    cat <<EOF
Usage: $PROG [--prefix VENV] [--dest DIR] [--no-enable]
       $PROG --render-only DIR [--prefix VENV]

Render the VFMOS unit templates (deploy/systemd/*.in, @PREFIX@ -> the virtualenv),
create the '$ACCOUNT' system user and group, copy the units to DIR and, when systemd
is PID 1, run 'systemctl daemon-reload' and enable vfmos.target with its services.
Safe to run again: unchanged units are left alone.

Options:
  --prefix VENV       virtualenv holding bin/vfmd and bin/vfm-modeld (default: $REPO/.venv)
  --dest DIR          where unit files go (default: /etc/systemd/system)
  --no-enable         install and daemon-reload, but do not enable anything
  --render-only DIR   only write the rendered units into DIR: no user, no systemctl, no root
  -h, --help          this text
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) need_value "$@"; PREFIX="$2"; shift 2 ;;
        --dest) need_value "$@"; DEST="$2"; shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        --render-only) need_value "$@"; RENDER_ONLY="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# ExecStart= splits on whitespace and sed below uses '|': refuse what would need quoting.
[[ "$PREFIX" =~ ^[A-Za-z0-9._/+-]+$ ]] ||
    die "--prefix '$PREFIX' has characters a unit file would need quoted; use a plain path"
if [[ -d "$PREFIX" ]]; then
    PREFIX="$(cd "$PREFIX" && pwd)"
elif [[ -z "$RENDER_ONLY" ]]; then
    die "no virtualenv at $PREFIX (run 'make setup' or pass --prefix)"
fi
[[ "$PREFIX" == /* ]] || die "--prefix must be an absolute path when it does not exist here: $PREFIX"

shopt -s nullglob
TEMPLATE_FILES=("$TEMPLATES"/*.in)
shopt -u nullglob
[[ ${#TEMPLATE_FILES[@]} -gt 0 ]] || die "no unit templates in $TEMPLATES"

UNITS=()
for template in "${TEMPLATE_FILES[@]}"; do
    UNITS+=("$(basename "${template%.in}")")
done

for unit in "${UNITS[@]}"; do
    [[ "$unit" == *.service ]] || continue
    binary="$(sed -n 's|^ExecStart=@PREFIX@/bin/\([^ ]*\).*|\1|p' "$TEMPLATES/$unit.in")"
    if [[ ! -x "$PREFIX/bin/$binary" ]]; then
        msg="$PREFIX/bin/$binary is missing (install VFMOS into the venv: pip install -e .)"
        [[ -n "$RENDER_ONLY" ]] || die "$msg"
        say "warning: $msg"
    fi
done

# render DIR: write every rendered unit into DIR, mode 0644.
render() {
    local dir="$1" template out
    mkdir -p "$dir"
    for template in "${TEMPLATE_FILES[@]}"; do
        out="$dir/$(basename "${template%.in}")"
        sed "s|@PREFIX@|$PREFIX|g" "$template" > "$out.tmp"
        if grep -n '@[A-Z_]\+@' "$out.tmp" >&2; then
            rm -f "$out.tmp"
            die "unrendered placeholder left in $(basename "$template")"
        fi
        chmod 0644 "$out.tmp"
        mv -f "$out.tmp" "$out"
    done
}

if [[ -n "$RENDER_ONLY" ]]; then
    render "$RENDER_ONLY"
    say "rendered ${UNITS[*]} into $RENDER_ONLY (prefix $PREFIX)"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "installing needs root (try: sudo $0 ${ARGS[*]}), or use --render-only DIR"

if getent group "$ACCOUNT" >/dev/null; then
    say "group $ACCOUNT exists"
else
    groupadd --system "$ACCOUNT"
    say "created system group $ACCOUNT"
fi
if getent passwd "$ACCOUNT" >/dev/null; then
    say "user $ACCOUNT exists"
else
    # HOME points at the StateDirectory so libraries that write under ~ land somewhere writable.
    useradd --system --gid "$ACCOUNT" --no-create-home --home-dir "/var/lib/$ACCOUNT" \
        --shell /usr/sbin/nologin --comment "VFMOS daemons" "$ACCOUNT"
    say "created system user $ACCOUNT"
fi

# The daemons run as $ACCOUNT: a virtualenv (or editable source tree) under a private
# home such as /root would install fine and then fail at start.
CAN_IMPORT='import importlib.util as u, sys
sys.exit(not (u.find_spec("kernel") and u.find_spec("services.model")))'
if command -v runuser >/dev/null &&
   ! runuser -u "$ACCOUNT" -- "$PREFIX/bin/python" -c "$CAN_IMPORT" 2>/dev/null; then
    say "warning: user $ACCOUNT cannot run $PREFIX/bin/python or import the VFMOS packages;"
    say "warning: the services will not start until $ACCOUNT can read the venv, its base"
    say "warning: interpreter and the source tree (e.g. a venv under /opt from /usr/bin/python3)"
fi

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
render "$STAGE"
mkdir -p "$DEST"
for unit in "${UNITS[@]}"; do
    if cmp -s "$STAGE/$unit" "$DEST/$unit"; then
        say "$DEST/$unit unchanged"
    else
        install -m 0644 "$STAGE/$unit" "$DEST/$unit"
        say "installed $DEST/$unit"
    fi
done

if [[ ! -d /run/systemd/system ]]; then
    # The same test as sd_booted(): systemd creates this directory only when it is PID 1.
    say "systemd is not running as PID 1 here: installed the unit files only."
    say "on a host booted with systemd, run:"
    say "  systemctl daemon-reload && systemctl enable --now ${UNITS[*]}"
    exit 0
fi

systemctl daemon-reload
say "systemctl daemon-reload done"
if [[ $ENABLE -eq 1 ]]; then
    # Every unit, not just the target: services join vfmos.target through their own WantedBy=.
    systemctl enable --quiet "${UNITS[@]}"
    say "enabled ${UNITS[*]}"
    say "start now with: systemctl start vfmos.target   (status: systemctl status 'vfm*')"
else
    say "not enabled (--no-enable); to start once: systemctl start ${UNITS[*]}"
fi
