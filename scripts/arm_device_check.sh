#!/usr/bin/env bash
# Prove that `covspec device run` works on ARM (aarch64), exactly, under emulation.
#
#   sudo scripts/arm_device_check.sh [--questions N] [--cache DIR] [--out FILE]
#
# On an x86_64 Debian/Ubuntu host, as root:
#   1. installs qemu-user-static, debootstrap and binfmt-support (apt) if missing,
#      mounts binfmt_misc and enables qemu-aarch64;
#   2. builds an arm64 Debian bookworm root with debootstrap (Python 3.11), once,
#      under the cache folder (default ~/.cache/covspec-arm);
#   3. downloads the aarch64 cp311 wheels of `covspec[device]` on the host, builds a
#      covspec wheel from this checkout and installs both inside the root with
#      `pip --no-index` (pip inside the root has no CA bundle for the registry);
#   4. runs `python -m covspec.bench.device.arm` on the host: exports the toy draft int8 and
#      int4, starts an edge on the host (loopback), answers N toy questions with
#      `covspec device run` inside the root (chroot + qemu) and natively on x86, both
#      device-led with the same fixed-length drafting (--lead device --draft-policy fixed),
#      each draft as exported and at MatMulNBits accuracy level 0 (float32 activations),
#      compares every answer token for token with the target's greedy answer and ARM's
#      drafted and accepted counts with x86's, question by question.
# Exits 0 when every answer is identical, every run drafted and, at accuracy level 0,
# ARM's counts equal x86's on every question (as exported, int8 activations, the ARM and
# x86 kernels round differently: differing questions are listed, not failed); 1 otherwise
# (each failure listed); 2 on a missing prerequisite.
# Environment: COVSPEC_ARM_CACHE (cache folder), DEBIAN_MIRROR (debootstrap mirror),
# COVSPEC_HOST_PYTHON (the host's Python with covspec[all]; default .venv/bin/python).
set -euo pipefail
{   # the whole script is read before it runs, so editing it meanwhile cannot break a run

QUESTIONS=16
CACHE=${COVSPEC_ARM_CACHE:-$HOME/.cache/covspec-arm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --questions) QUESTIONS=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "arm_device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$CACHE/bookworm-arm64          # the arm64 Debian root (reused between runs)
WHEELS=$CACHE/wheels                # aarch64 wheels of the device extra
DIST=$CACHE/dist                    # the covspec wheel built from this checkout
WORK=$CACHE/work                    # artifacts, images, edge log, results
VENV=/opt/covspec                   # the device's virtual environment, inside the root
HOST_PY=${COVSPEC_HOST_PYTHON:-$REPO/.venv/bin/python}
BEGAN=$(date +%s)

die() { echo "arm_device_check: $*" >&2; exit 2; }
step() { echo "== [$(( $(date +%s) - BEGAN ))s] $*"; }

# --- prerequisites -------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, binfmt_misc, debootstrap and chroot need it): sudo $0 $*"
[ "$(uname -m)" = x86_64 ] || die "this check emulates arm64 on an x86_64 host; this host is $(uname -m)"
case "$QUESTIONS" in ''|*[!0-9]*|0) die "--questions needs a positive integer, got '$QUESTIONS'" ;; esac
command -v apt-get >/dev/null || die "apt-get not found: this script expects a Debian or Ubuntu host"
if [ -n "${COVSPEC_HOST_PYTHON:-}" ] && [ ! -x "$HOST_PY" ]; then
    die "COVSPEC_HOST_PYTHON=$HOST_PY is not an executable Python"
elif [ ! -x "$HOST_PY" ]; then
    step "no .venv in $REPO: make setup"
    make -C "$REPO" setup || die "make setup failed: the host needs .venv with covspec[all,dev] (README)"
fi

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || die "could not install ${missing[*]} with apt-get (no network to the Debian mirror?)"
fi

BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e $BINFMT/register ]; then
    step "mount binfmt_misc"
    mount -t binfmt_misc binfmt_misc $BINFMT || die "cannot mount binfmt_misc on $BINFMT (a container without the privilege?)"
fi
if ! grep -qx enabled $BINFMT/qemu-aarch64 2>/dev/null; then
    step "update-binfmts --enable qemu-aarch64"
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
grep -qx enabled $BINFMT/qemu-aarch64 2>/dev/null || die "qemu-aarch64 is not enabled in $BINFMT"
# With the F (fix-binary) flag the interpreter is opened at registration: the root needs no copy of it.
grep -q '^flags:.*F' $BINFMT/qemu-aarch64 || die "qemu-aarch64 is registered without the F flag; install Debian's qemu-user-static"

# --- the arm64 root --------------------------------------------------------------------
mkdir -p "$CACHE" "$WHEELS" "$DIST" "$WORK"
exec 9>"$CACHE/.lock"
flock -n 9 || die "another run holds $CACHE/.lock"
trap 'exit 130' INT TERM     # so that the EXIT trap (unmounting) runs on Ctrl-C too

# Never delete a folder with something mounted under it (a killed run, or debootstrap's own /proc).
remove_tree() {
    if findmnt -rn -o TARGET | grep -q "^$1/"; then
        die "$1 has file systems mounted under it (a killed run?): unmount them (findmnt | grep $1) and rerun"
    fi
    rm -rf --one-file-system "$1"
}
if [ ! -e "$ROOT/.covspec-root-ready" ]; then
    step "debootstrap arm64 bookworm into $ROOT (about 4 minutes)"
    remove_tree "$ROOT.partial"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT.partial" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed (no network to $MIRROR? set DEBIAN_MIRROR); see $CACHE/debootstrap.log"
    touch "$ROOT.partial/.covspec-root-ready"
    remove_tree "$ROOT"
    mv "$ROOT.partial" "$ROOT"
else
    step "reusing the arm64 root $ROOT"
fi

MOUNTS=()
cleanup() {
    local i
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true; done
}
trap cleanup EXIT
# /proc and /dev only. With the host's /sys as well, onnxruntime's cpuinfo reads the host's CPU
# topology and crashes the arm64 Python (SIGSEGV under Debian's qemu-user 7.2); without /sys it
# prints "Error in cpuinfo: failed to parse both lists of possible and present processors" and
# onnxruntime detects the CPU's features from the auxiliary vector (HWCAP) instead.
for fs in proc dev; do
    if ! mountpoint -q "$ROOT/$fs"; then
        mount --bind "/$fs" "$ROOT/$fs" || die "cannot bind-mount /$fs into the root"
        MOUNTS+=("$ROOT/$fs")
    fi
done

arch=$(chroot "$ROOT" /usr/bin/python3 -c 'import platform, sys; print(platform.machine(), "%d.%d" % sys.version_info[:2])') \
    || die "cannot run the root's python3 under qemu (binfmt?)"
step "the root's Python: $arch"
[ "$arch" = "aarch64 3.11" ] || die "expected aarch64 Python 3.11 in the root, got: $arch"

# --- wheels: aarch64 dependencies and covspec itself --------------------------------
REQS=$("$HOST_PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(" ".join(sorted(set(tomllib.load(f)["project"]["optional-dependencies"]["device"]))))
EOF
)
if [ "$(cat "$WHEELS/.requirements" 2>/dev/null)" != "$REQS" ]; then
    step "pip download (aarch64, cp311): $REQS"
    rm -f "$WHEELS"/*.whl
    # shellcheck disable=SC2086  # REQS is a list of requirement specifiers without spaces
    "$HOST_PY" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        --dest "$WHEELS" $REQS 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) \
        || die "pip download of the aarch64 wheels failed: a dependency without an aarch64 cp311 wheel, or no registry"
    echo "$REQS" > "$WHEELS/.requirements"
else
    step "reusing the aarch64 wheels in $WHEELS"
fi

step "building the covspec wheel from $REPO"
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"; cleanup' EXIT
# Tracked and untracked-but-not-ignored files: the checkout as it is, without .venv or artifacts.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$SRC"
[ -f "$SRC/pyproject.toml" ] || die "could not copy the checkout to build it"
rm -f "$DIST"/*.whl
"$HOST_PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DIST" "$SRC" >/dev/null \
    || die "building the covspec wheel failed"

step "installing covspec[device] in the root ($VENV) with --no-index"
rm -rf "$ROOT/opt/wheels" && mkdir -p "$ROOT/opt/wheels"
cp "$WHEELS"/*.whl "$DIST"/*.whl "$ROOT/opt/wheels/"
[ -x "$ROOT$VENV/bin/python" ] || chroot "$ROOT" /usr/bin/python3 -m venv "$VENV"
chroot "$ROOT" "$VENV/bin/pip" install --quiet --no-index --find-links /opt/wheels --disable-pip-version-check \
    "covspec[device]" || die "pip install covspec[device] inside the root failed"
# The version does not change with the checkout: always replace covspec itself (not its dependencies).
chroot "$ROOT" "$VENV/bin/pip" install --quiet --no-index --no-deps --force-reinstall --disable-pip-version-check \
    /opt/wheels/"$(basename "$DIST"/covspec-*.whl)" || die "pip install of the covspec wheel inside the root failed"
chroot "$ROOT" "$VENV/bin/python" 2>/dev/null \
    -c 'import onnxruntime, platform; print("   onnxruntime", onnxruntime.__version__, "on", platform.machine())' \
    || die "onnxruntime does not import in the root"

# --- the check -------------------------------------------------------------------------
step "device runs: $QUESTIONS toy questions x int8/int4 (MatMulNBits accuracy level 4 and 0), arm64 (emulated) and x86_64"
status=0
# This checkout's code on the host too, whichever checkout the host's Python was installed from.
TQDM_DISABLE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$HOST_PY" -m covspec.bench.device.arm --root "$ROOT" --device-python "$VENV/bin/python" --work "$WORK" \
    --questions "$QUESTIONS" ${OUT:+--out "$OUT"} || status=$?
step "done (exit $status)"
exit $status
}
