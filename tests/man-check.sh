#!/bin/sh
# The manual pages in man/ (make check-man):
#  - every page lints clean: groff -ww, mandoc -T lint at its style level,
#    and man(1) renders it without a warning; its title, NAME line and
#    version match the file name and the Cargo package version;
#  - every extension function (a row named nbd_rs_* in the export table)
#    has its page man/NAME.3 naming its version node, and the overview
#    man/nbd-rs.3 lists it under EXTENSION FUNCTIONS; no page is left for
#    a function that is gone;
#  - the overview's ENVIRONMENT VARIABLES section has an entry for every
#    variable the library reads or sets for its children, found in the
#    sources below, and none for a variable they no longer touch.
# Prints what is wrong and exits 1 if anything is.
set -eu
export LC_ALL=C
cd "$(dirname "$0")/.."

TABLE=nbd-capi/src/table.rs
OVERVIEW=man/nbd-rs.3
failed=0
fail() { echo "man-check: $*" >&2; failed=1; }

for tool in groff mandoc man; do
  command -v $tool >/dev/null || { echo "man-check: $tool is missing (make deps)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "man-check: no version in Cargo.toml" >&2; exit 1; }

# The text of section $2 (a .SH heading) of page $1, headings excluded.
section() {
  awk -v want="$2" '
    /^\.SH / { h = substr($0, 5); gsub(/"/, "", h); inside = (h == want); next }
    inside' "$1"
}

# The tags of the .TP entries in section $2 of page $1, as plain words.
tags() {
  section "$1" "$2" | awk 'tag { print; tag = 0 } /^\.TP/ { tag = 1 }' |
    sed 's/^\.[A-Z]* //; s/\\-/-/g; s/\\f[BIRP]//g; s/[",()]/ /g'
}

# --- every page: lint, render, title, name, version -----------------------
pages=$(ls man/*.[1-9] 2>/dev/null || true)
[ -n "$pages" ] || fail "no pages in man/"
[ -f "$OVERVIEW" ] || fail "$OVERVIEW is missing"
for page in $pages; do
  out=$(groff -man -ww -z "$page" 2>&1) || fail "$page: groff failed"
  [ -z "$out" ] || fail "$page: groff -man -ww warns:
$out"
  # Style level: also the messages about questionable but valid markup.
  out=$(mandoc -T lint -W style "$page" 2>&1) || true
  [ -z "$out" ] || fail "$page: mandoc -T lint -W style:
$out"
  out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings=w -l "$page" 2>&1 >/dev/null) || fail "$page: man -l failed"
  [ -z "$out" ] || fail "$page: man -l warns:
$out"

  file=${page##*/}
  name=${file%.*}
  sect=${file##*.}
  title=$(echo "$name" | tr a-z A-Z)
  th=$(grep -m 1 '^\.TH ' "$page" || true)
  case $th in
    ".TH $title $sect "*) ;;
    *) fail "$page: .TH must start with '.TH $title $sect': $th" ;;
  esac
  case $th in
    *"\"nbd-rs $version\""*) ;;
    *) fail "$page: .TH must carry \"nbd-rs $version\" (Cargo.toml's version): $th" ;;
  esac
  first=$(section "$page" NAME | grep -v '^\.' | head -n 1 | sed 's/\\-/-/g')
  case $first in
    "$name - "*) ;;
    *) fail "$page: the NAME line must start with '$name \\-': $first" ;;
  esac
done

# --- extension functions ---------------------------------------------------
rows=$(sed -n 's/^ *row("\(nbd_rs_[a-z0-9_]*\)", *"\([^"]*\)".*/\1 \2/p' "$TABLE")
extensions=$(echo "$rows" | awk 'NF { print $1 }')
# Each entry of the overview's list is tagged ".BR nbd_rs_... (3)".
listed=$(section "$OVERVIEW" "EXTENSION FUNCTIONS" | sed -n 's/^\.BR \(nbd_rs_[a-z0-9_]*\) (3)$/\1/p')
ext_text=$(section "$OVERVIEW" "EXTENSION FUNCTIONS")
while read -r fn node; do
  [ -n "$fn" ] || continue
  page=man/$fn.3
  if [ ! -f "$page" ]; then
    fail "$fn (in $TABLE) has no page $page"
  elif ! grep -qF "$node" "$page"; then
    fail "$page does not name $fn's version node $node"
  fi
  echo "$listed" | grep -qx "$fn" ||
    fail "$OVERVIEW does not list $fn under EXTENSION FUNCTIONS (as '.BR $fn (3)')"
  echo "$ext_text" | grep -qF "$node" ||
    fail "$OVERVIEW does not name $fn's version node $node under EXTENSION FUNCTIONS"
done <<EOF
$rows
EOF
for page in man/nbd_rs_*.3; do
  [ -f "$page" ] || continue
  fn=${page##*/}
  fn=${fn%.3}
  echo "$extensions" | grep -qx "$fn" || fail "$page: $fn is not in $TABLE"
done
for fn in $listed; do
  echo "$extensions" | grep -qx "$fn" ||
    fail "$OVERVIEW lists $fn under EXTENSION FUNCTIONS, but $TABLE has no such row"
done

# --- environment variables -------------------------------------------------
# The library's sources (the crates libnbd.so.0 is built from) without
# comment lines and test modules.
sources() {
  find nbd-capi/src nbd-proto/src nbd-io/src nbd-tls/src -name '*.rs' -not -path '*/bin/*' | sort | while read -r f; do
    awk '/^#\[cfg\(test\)\]/ { exit } !/^[[:space:]]*\/\//' "$f"
  done
}
code=$(sources)
# Read directly, or set in a child's environment ("NAME=...").
vars=$(echo "$code" |
  grep -aoE '(env::var(_os)?|getenv)\(c?"[A-Za-z_][A-Za-z0-9_]*"\)|"[A-Z][A-Z0-9_]*=' |
  sed -E 's/.*\(c?"//; s/"\)$//; s/^"//; s/=$//')
# Read on the library's behalf by what it calls.
indirect() { echo "$code" | grep -aqE "$1" && vars="$vars $2"; return 0; }
indirect 'env::temp_dir\(\)' TMPDIR
indirect '\bexecvpe?\b' PATH
indirect 'set_default_verify_paths' 'SSL_CERT_FILE SSL_CERT_DIR'
indirect '\buse openssl::' OPENSSL_CONF
vars=$(echo $vars | tr ' ' '\n' | sort -u)
[ -n "$vars" ] || fail "found no environment variables in the sources: is the search broken?"
documented=$(tags "$OVERVIEW" "ENVIRONMENT VARIABLES" | tr ' ' '\n' | grep -E '^[A-Z][A-Z0-9_]+$' | sort -u)
for v in $vars; do
  echo "$documented" | grep -qx "$v" ||
    fail "$OVERVIEW: the library uses \$$v, which ENVIRONMENT VARIABLES does not describe"
done
for v in $documented; do
  echo "$vars" | grep -qx "$v" ||
    fail "$OVERVIEW: ENVIRONMENT VARIABLES describes \$$v, which the sources no longer use"
done

if [ "$failed" != 0 ]; then
  echo "man-check: FAILED" >&2
  exit 1
fi
echo "man-check: $(echo "$pages" | wc -w) pages lint clean; extension functions: $(echo $extensions | tr ' ' ',' | sed 's/^$/none/'); environment variables: $(echo $vars | tr ' ' ',')"
