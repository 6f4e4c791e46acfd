#!/usr/bin/env bash
# libnbd 1.22.2's own test suite (tests/, info/, copy/, dump/) on libnbd
# itself and on our libnbd.so.0: every test that passes on the reference
# must pass on ours, unless tests/libnbd-suite.known lists it (a deliberate
# difference, with its reason).
#
# Two copies of the reference build tree (tests/reference-libnbd.sh) are
# made under target/libnbd-suite/: ref/ and ours/. The test programs are
# built once, in ref/, against libnbd's own library; ours/ is a copy of
# that tree whose lib/.libs/libnbd.so.0.0.0 is our target/lib/libnbd.so.0,
# so the very same binaries run on both libraries, as a drop-in must. The
# absolute paths the build tree carries (libtool wrappers, ./run, the
# Makefiles) are rewritten to point into each copy, with mtimes kept so
# make sees nothing to rebuild.
#
# Per-test results come from automake's .trs files; the list of both goes
# to target/libnbd-suite/results.txt.
#
# Environment: LIBNBD_SUITE_DIRS (default "tests info copy dump"),
# LIBNBD_SUITE_JOBS (make -j, default 2), LIBNBD_SUITE_TIMEOUT (seconds per
# test, default 300), LIBNBD_SUITE_REF=reuse (keep the reference's results
# of a previous run, with its tree, and run only ours), LIBNBD_SUITE_LIB (the
# library to test, default target/lib/libnbd.so.0).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dirs=${LIBNBD_SUITE_DIRS:-tests info copy dump}
jobs=${LIBNBD_SUITE_JOBS:-2}
per_test=${LIBNBD_SUITE_TIMEOUT:-300}
known_file=$root/tests/libnbd-suite.known
work=$root/target/libnbd-suite
so=$(readlink -f "${LIBNBD_SUITE_LIB:-$root/target/lib/libnbd.so.0}")

test -f "$so" || { echo "libnbd-suite: build first: make lib" >&2; exit 1; }
tests/reference-libnbd.sh || exit 1
orig=$(readlink -f target/libnbd-1.22.2)

# The absolute build directory a tree was configured or relocated in.
builddir_of() { sed -n 's/^abs_top_builddir = //p' "$1/Makefile"; }

# Rewrite every text file of tree $1 that names directory $2 to name $1
# instead, keeping each file's mtime.
relocate() {
  local tree=$1 from=$2 stamp f
  stamp=$(mktemp)
  grep -rlIZF -- "$from" "$tree" | while IFS= read -r -d '' f; do
    touch -r "$f" "$stamp"
    sed -i "s|$from|$tree|g" "$f"
    touch -r "$stamp" "$f"
  done
  rm -f "$stamp"
  [ "$(builddir_of "$tree")" = "$tree" ] || { echo "libnbd-suite: relocating $tree failed" >&2; exit 1; }
}

# Runs `make check` in each directory of tree $1, one directory at a time,
# timing each. Default signal dispositions for make and everything below it,
# whatever this script inherited.
run_suite() {
  local tree=$1 d t0 t1
  for d in $dirs; do
    find "$tree/$d" -maxdepth 1 \( -name '*.log' -o -name '*.trs' \) -delete
    t0=$(date +%s)
    env --default-signal make -C "$tree/$d" -k -j"$jobs" check \
      LOG_COMPILER="timeout -k 10 $per_test \$(top_builddir)/run" \
      >"$tree/$d-check.out" 2>&1
    t1=$(date +%s)
    echo "$d $((t1 - t0))" >>"$tree/times"
    echo "libnbd-suite: $(basename "$tree") $d: $((t1 - t0)) s"
  done
}

# One line per test of tree $1: "dir/test RESULT", from the .trs files.
results() {
  local tree=$1 d f
  for d in $dirs; do
    for f in "$tree/$d"/*.trs; do
      [ -e "$f" ] || continue
      local name=${f##*/}
      echo "$d/${name%.trs} $(sed -n 's/^:global-test-result: //p' "$f")"
    done
  done | sort
}

mkdir -p "$work"
ref=$work/ref ours=$work/ours
if [ "${LIBNBD_SUITE_REF:-}" = reuse ] && [ -e "$work/ref.results" ] && [ -d "$ref" ]; then
  echo "libnbd-suite: reusing the reference's results of a previous run"
else
  rm -rf "$ref" "$work/ref.results"
  cp -a "$orig/." "$ref"
  relocate "$ref" "$(builddir_of "$orig")"
  # The test programs, built once against libnbd's library.
  for d in $dirs; do
    make -C "$ref/$d" -j"$jobs" check TESTS= >"$ref/$d-build.out" 2>&1 ||
      { echo "libnbd-suite: building $d's test programs failed:" >&2; tail -n 30 "$ref/$d-build.out" >&2; exit 1; }
  done
  rm -f "$ref/times"
  run_suite "$ref"
  results "$ref" >"$work/ref.results"
fi

# ours/: the same tree and the same test binaries, our library.
rm -rf "$ours"
cp -a "$ref/." "$ours"
relocate "$ours" "$ref"
rm -f "$ours/times"
lib=$ours/lib/.libs
cp "$so" "$lib/libnbd.so.0.0.0"
for l in libnbd.so libnbd.so.0; do [ "$(readlink "$lib/$l")" = libnbd.so.0.0.0 ] || { echo "libnbd-suite: $lib/$l is not a link to libnbd.so.0.0.0" >&2; exit 1; }; done
# A test program (through its libtool wrapper and ./run, as make check runs
# it) must load the library of its own tree. (tests/close-null needs only
# libnbd 1.0's functions, so it loads on any version of ours.)
for t in ref ours; do
  "$work/$t/run" env LD_DEBUG=libs "$work/$t/tests/close-null" >"$work/$t.ld-debug" 2>&1
  grep -q "calling init: $work/$t/lib/.libs/libnbd.so.0\$" "$work/$t.ld-debug" ||
    { echo "libnbd-suite: tests/close-null in $t/ did not load $t/'s libnbd.so.0:" >&2; grep 'libnbd' "$work/$t.ld-debug" | tail -n 5 >&2; exit 1; }
done
cmp -s "$so" "$lib/libnbd.so.0.0.0" || { echo "libnbd-suite: ours/ does not hold our library" >&2; exit 1; }
run_suite "$ours"
results "$ours" >"$work/ours.results"

# Compare.
declare -A refr oursr known
while read -r t r; do refr[$t]=$r; done <"$work/ref.results"
while read -r t r; do oursr[$t]=$r; done <"$work/ours.results"
if [ -f "$known_file" ]; then
  while read -r t reason; do
    case $t in ''|'#'*) continue ;; esac
    known[$t]=$reason
  done <"$known_file"
fi

echo
printf '%-8s %-5s %5s %5s %5s %5s %5s %5s\n' dir lib PASS FAIL SKIP XFAIL ERROR other
for d in $dirs; do
  for t in ref ours; do
    awk -v d="$d/" -v lib=$t '
      index($1, d) == 1 { n[$2]++ }
      END { o = 0; for (k in n) if (k !~ /^(PASS|FAIL|SKIP|XFAIL|ERROR)$/) o += n[k];
            printf "%-8s %-5s %5d %5d %5d %5d %5d %5d\n", substr(d, 1, length(d) - 1), lib,
              n["PASS"], n["FAIL"], n["SKIP"], n["XFAIL"], n["ERROR"], o }' "$work/$t.results"
  done
done
echo "seconds per directory: ref: $(tr '\n' ' ' <"$ref/times")  ours: $(tr '\n' ' ' <"$ours/times")"
echo

passed=0 failed=0 accepted=0
{
  echo "# test ref ours"
  for t in $(printf '%s\n' "${!refr[@]}" "${!oursr[@]}" | sort -u); do
    echo "$t ${refr[$t]:-none} ${oursr[$t]:-none}"
  done
} >"$work/results.txt"
for t in $(printf '%s\n' "${!refr[@]}" | sort); do
  [ "${refr[$t]}" = PASS ] || continue
  r=${oursr[$t]:-not-run}
  if [ "$r" = PASS ]; then
    passed=$((passed + 1))
    [ -n "${known[$t]+x}" ] && echo "note: $t passes now; remove it from tests/libnbd-suite.known"
  elif [ -n "${known[$t]+x}" ]; then
    accepted=$((accepted + 1))
    echo "known  $t: $r (${known[$t]})"
  else
    failed=$((failed + 1))
    echo "FAIL   $t: $r on ours, PASS on libnbd (log: ${ours#"$root"/}/$t.log)"
  fi
done
# A program that cannot even load on ours: which of libnbd's functions it
# lacks (the dynamic loader stops at the first missing version node).
missing_bins=$(grep -ho "version \`LIBNBD_[0-9.]*' not found (required by [^)]*)" "$ours"/*/*.log 2>/dev/null |
  sed 's/.*required by \(.*\))/\1/' | sort -u)
if [ -n "$missing_bins" ]; then
  objdump -T "$so" | awk '$NF ~ /^nbd_/ {print $NF}' | sort -u >"$work/ours.symbols"
  for b in $missing_bins; do
    echo "missing in ours, needed by ${b#"$ours"/}: $(objdump -T "$b" | awk '/\*UND\*/ && $NF ~ /^nbd_/ {print $NF}' |
      sort -u | comm -23 - "$work/ours.symbols" | tr '\n' ' ')"
  done
fi
echo "libnbd-suite: $accepted known differences (tests/libnbd-suite.known); per-test results in ${work#"$root"/}/results.txt"
echo "libnbd-suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
