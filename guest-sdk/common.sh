# Shared by guest-sdk/{python,js,c}/build: argument checks, the up-to-date check, running a
# step with a clear error, and the atomic write of the output. Source it; do not run it.

# The repository's root (guest-sdk/..).
SLUICE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# die MESSAGE...: print "<tool>: MESSAGE" to stderr and exit 1.
die() {
  echo "$SLUICE_TOOL: $*" >&2
  exit 1
}

# parse_args "$@": sets SRC (absolute), SRC_DIR (the directory holding the task's sources) and OUT
# (absolute); usage errors exit 2.
parse_args() {
  if [ $# -ne 2 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    echo "usage: $SLUICE_TOOL <$SLUICE_SRC_HINT> <out.wasm>" >&2
    exit 2
  fi
  [ -e "$1" ] || die "the task source \`$1\` does not exist"
  SRC=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
  if [ -d "$SRC" ]; then SRC_DIR=$SRC; else SRC_DIR=$(dirname "$SRC"); fi
  local out_dir
  out_dir=$(dirname "$2")
  mkdir -p "$out_dir" || die "cannot create the output directory \`$out_dir\`"
  OUT=$(cd "$out_dir" && pwd)/$(basename "$2")
}

# up_to_date OUT INPUT...: true when OUT exists and is newer than every file under the INPUTs.
up_to_date() {
  local out=$1
  shift
  [ -f "$out" ] || return 1
  [ -z "$(find "$@" -type f -newer "$out" \
    -not -path '*/__pycache__/*' -not -path '*/node_modules/*' -print -quit 2>/dev/null)" ]
}

# need TOOL_PATH WHAT: fail with a pointer to the installer when a tool is missing.
need() {
  [ -x "$1" ] || die "$2 is not installed (no \`$1\`); run scripts/setup-polyglot first"
}

# step DESCRIPTION COMMAND...: run COMMAND; on failure name the task source, the command and its
# exit code (its own output has already gone to stderr).
step() {
  local what=$1
  shift
  local rc=0
  "$@" >&2 || rc=$?
  if [ "$rc" -ne 0 ]; then
    die "building \`$SRC\` failed while $what: \`$*\` exited with status $rc"
  fi
}

# quiet_step DESCRIPTION COMMAND...: like step, but the command's output is shown only when it
# fails (for tools that report progress on every run).
quiet_step() {
  local what=$1
  shift
  local rc=0 log
  log=$(mktemp "${TMPDIR:-/tmp}/sluice-build-log.XXXXXX")
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$log" >&2
    rm -f "$log"
    die "building \`$SRC\` failed while $what: \`$*\` exited with status $rc"
  fi
  rm -f "$log"
}

# Make a scratch directory removed on exit; sets WORK.
make_work_dir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-build.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
}

# place FILE: move a finished component to OUT atomically.
place() {
  local tmp
  tmp="$(dirname "$OUT")/.$(basename "$OUT").$$.tmp"
  cp "$1" "$tmp" && mv -f "$tmp" "$OUT" || die "cannot write \`$OUT\`"
  echo "$SLUICE_TOOL: built $OUT ($(du -k "$OUT" | cut -f1) KiB)" >&2
}
