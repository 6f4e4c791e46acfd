#!/usr/bin/env bash
# Builds the C examples once and runs each against a fresh nbdkit twice:
# on Debian's libnbd and on ours (LD_LIBRARY_PATH). Outputs must match.
# Then the C tests in tests/c, which start their own servers, must pass
# on both libraries. Tests of functions Debian's libnbd 1.14 lacks
# (TESTS_1_22) run instead on libnbd 1.22.2 built by `make reference` and
# on ours. Everything is built once, against include/libnbd.h.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/c-tests
mkdir -p "$out"
fail=0
# Tests that use libnbd 1.16-1.22 functions: they cannot load on 1.14.
TESTS_1_22="api122-test"
reference=$PWD/target/libnbd-1.22.2/lib/.libs
is_1_22_test() { [[ " $TESTS_1_22 " == *" $1 "* ]]; }
run_test() {  # NAME LIBRARY LD_LIBRARY_PATH: the test's last line, or its failure
  if NBD_TEST_LIBRARY=$2 LD_LIBRARY_PATH=$3 "$out/$1" > "$out/$1.$2.log" 2>&1; then
    echo "$1 on $2: $(tail -n1 "$out/$1.$2.log")"
  else
    echo "$1 on $2 failed:"; grep -v '^nbdkit: ' "$out/$1.$2.log" | tail -n 30; fail=1
  fi
}
for src in examples-c/*.c; do
  name=$(basename "$src" .c)
  ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0
  theirs=$(nbdkit -U - memory 16M --run "$out/$name \$unixsocket" 2>&1) || { echo "$name on Debian's libnbd failed:"; echo "$theirs"; fail=1; continue; }
  ours=$(nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$PWD/target/lib $out/$name \$unixsocket" 2>&1) || { echo "$name on ours failed:"; echo "$ours"; fail=1; continue; }
  # Both must really have loaded the library they were meant to.
  if [ "$theirs" != "$ours" ]; then
    echo "$name: outputs differ"; diff <(echo "$theirs") <(echo "$ours") || true; fail=1
  else
    echo "$name: same output on both libraries ($(echo "$ours" | wc -l) lines)"
  fi
done
for src in tests/c/*.c; do
  name=$(basename "$src" .c)
  is_1_22_test "$name" && continue
  ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0
  for lib in debian ours; do
    libpath=""; [ $lib = ours ] && libpath=$PWD/target/lib
    run_test "$name" $lib "$libpath"
  done
done
[ -f "$reference/libnbd.so.0" ] || { echo "FAIL: $reference/libnbd.so.0 is missing: run make reference"; fail=1; }
for name in $TESTS_1_22; do
  [ -f "$reference/libnbd.so.0" ] || break
  ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "tests/c/$name.c" -L"$reference" -l:libnbd.so.0
  for lib in reference ours; do
    libpath=$reference; [ $lib = ours ] && libpath=$PWD/target/lib
    run_test "$name" $lib "$libpath"
  done
done
# (ldd's output to a file first: grep -q closing the pipe early would fail the pipeline.)
LD_LIBRARY_PATH=$PWD/target/lib ldd "$out/sync-rw" > "$out/ldd.txt"
grep -q "$PWD/target/lib/libnbd.so.0" "$out/ldd.txt" || { echo "our libnbd.so.0 was not the one loaded"; fail=1; }
exit $fail
