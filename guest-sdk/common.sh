# Shared by guest-sdk/{python,js,c}/build: argument checks, the toolchain record and the
# up-to-date check, running a step with a clear error, and the atomic write of the output. Source it; do not run it.

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

# The toolchain record of the build: "key: value" lines naming everything besides the task's own
# sources that determines the output (the builder, the SDK and WIT files' hashes, each tool's
# version or install record, compiler flags). Each build script adds its lines with `record`
# before calling up_to_date; place stores them beside the output as <out.wasm>.toolchain.
# Computing it needs the toolchain, so a missing tool fails the build even when an output is
# cached.
FINGERPRINT=""

# record KEY VALUE...: add the line "KEY: VALUE..." to the toolchain record.
record() {
  local key=$1
  shift
  FINGERPRINT+="$key: $*"$'\n'
}

# record_sources PATH...: record the SHA-256 of every file under the PATHs (relative to the root;
# without __pycache__ and node_modules), each on a line named by its path.
record_sources() {
  local p listing hash path
  for p in "$@"; do
    [ -e "$SLUICE_ROOT/$p" ] || die "\`$SLUICE_ROOT/$p\` is missing (an incomplete checkout?)"
  done
  listing=$(cd "$SLUICE_ROOT" &&
    find "$@" \( -name __pycache__ -o -name node_modules \) -prune -o -type f -print0 |
    LC_ALL=C sort -z | xargs -0 -r sha256sum) || die "cannot read the files under $*"
  while read -r hash path; do
    record "$path" "$hash"
  done <<<"$listing"
}

# record_file KEY FILE [NOTE]: record the SHA-256 of FILE's contents (after NOTE).
record_file() {
  local h
  h=$(sha256sum <"$2") || die "cannot read \`$2\`"
  record "$1" ${3:+"$3"} "${h%% *}"
}

# record_version KEY WHAT COMMAND...: record the first line of `COMMAND --version` and where
# COMMAND is; a tool that cannot report its version is missing or broken, and fails the build.
record_version() {
  local key=$1 what=$2 v
  shift 2
  v=$("$@" --version 2>&1) ||
    die "$what does not run (\`$* --version\` failed: ${v%%$'\n'*}); run scripts/setup-polyglot first"
  record "$key" "${v%%$'\n'*} ($(command -v "$1"))"
}

# up_to_date OUT INPUT...: true when OUT exists, is newer than every file under the INPUTs (the
# task's sources), and its toolchain record (OUT.toolchain) equals $FINGERPRINT. When only the
# record differs, says which of its keys changed.
up_to_date() {
  local out=$1
  shift
  [ -f "$out" ] || return 1
  [ -z "$(find "$@" \( -name __pycache__ -o -name node_modules \) -prune -o \
    -type f -newer "$out" -print -quit 2>/dev/null)" ] || return 1
  local old line key changed=()
  if ! old=$(cat "$out.toolchain" 2>/dev/null); then
    echo "$SLUICE_TOOL: \`$out\` has no toolchain record (\`$out.toolchain\`); rebuilding" >&2
    return 1
  fi
  old+=$'\n'
  [ "$old" = "$FINGERPRINT" ] && return 0
  # The keys whose line was added, changed or removed, each named once.
  while IFS= read -r line; do
    key=${line%%:*}
    [[ $'\n'$FINGERPRINT == *$'\n'"$line"$'\n'* ]] ||
      [[ " ${changed[*]} " == *" $key "* ]] || changed+=("$key")
  done <<<"${old%$'\n'}"
  while IFS= read -r line; do
    key=${line%%:*}
    [[ $'\n'$old == *$'\n'"$line"$'\n'* ]] ||
      [[ " ${changed[*]} " == *" $key "* ]] || changed+=("$key")
  done <<<"${FINGERPRINT%$'\n'}"
  echo "$SLUICE_TOOL: \`$out\` was built with another toolchain (changed: ${changed[*]});" \
    "rebuilding" >&2
  return 1
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

# place FILE: move a finished component to OUT atomically, then its toolchain record to
# OUT.toolchain (removed first, so an output never carries an older build's record).
place() {
  local tmp
  tmp="$(dirname "$OUT")/.$(basename "$OUT").$$.tmp"
  rm -f "$OUT.toolchain" || die "cannot remove \`$OUT.toolchain\`"
  cp "$1" "$tmp" && mv -f "$tmp" "$OUT" || die "cannot write \`$OUT\`"
  printf '%s' "$FINGERPRINT" >"$tmp" && mv -f "$tmp" "$OUT.toolchain" ||
    die "cannot write \`$OUT.toolchain\`"
  echo "$SLUICE_TOOL: built $OUT ($(du -k "$OUT" | cut -f1) KiB)" >&2
}
