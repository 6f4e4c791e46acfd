#!/usr/bin/env bash
# Builds the C examples once (with the flags of tests/example-flags.sh:
# glib-loop and libev-loop need their event loop) and runs each against a
# fresh nbdkit on Debian's libnbd 1.14.2, on libnbd 1.22.2 built from source (the
# reference, `make reference`) and on ours (LD_LIBRARY_PATH). Outputs
# must match. Then the C tests in tests/c, which start their own servers,
# must pass on all three, told which by NBD_TEST_LIBRARY; tests of
# functions 1.14 lacks (TESTS_1_22) run on the reference and ours only,
# tests of nbd-rs's own extensions (TESTS_OURS) on ours only.
# Everything is built once, against include/libnbd.h.
set -euo pipefail
cd "$(dirname "$0")/.."
reference=$PWD/target/libnbd-1.22.2/lib/.libs
[ -e "$reference/libnbd.so.0" ] || { echo "FAIL: the reference libnbd 1.22.2 is not built: make reference"; exit 1; }
out=target/c-tests
mkdir -p "$out"
fail=0
# Tests that use libnbd 1.16-1.22 functions: they cannot load on 1.14.
TESTS_1_22="api122-test"
is_1_22_test() { [[ " $TESTS_1_22 " == *" $1 "* ]]; }
# Tests of nbd-rs's extensions (nbd_rs_*): they cannot load on libnbd.
TESTS_OURS="multiconn-test reconnect-test writer-test server-test"
is_ours_test() { [[ " $TESTS_OURS " == *" $1 "* ]]; }
# Examples of the extensions: they run on ours alone.
EXAMPLES_OURS="concurrent-writer concurrent-writer-shared"
is_ours_example() { [[ " $EXAMPLES_OURS " == *" $1 "* ]]; }
libpath_of() {
  case $1 in
    debian) echo "" ;;
    reference) echo "$reference" ;;
    ours) echo "$PWD/target/lib" ;;
  esac
}
run_test() {  # NAME LIBRARY: the test's last line, or its failure
  if NBD_TEST_LIBRARY=$2 LD_LIBRARY_PATH=$(libpath_of "$2") "$out/$1" > "$out/$1.$2.log" 2>&1; then
    echo "$1 on $2: $(tail -n1 "$out/$1.$2.log")"
  else
    echo "$1 on $2 failed:"; grep -v '^nbdkit: ' "$out/$1.$2.log" | tail -n 30; fail=1
  fi
}
for src in examples-c/*.c; do
  name=$(basename "$src" .c)
  flags=$(tests/example-flags.sh "$name")
  if is_ours_example "$name"; then
    ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -L"$PWD/target/lib" -l:libnbd.so.0
  else
    ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0 $flags
  fi
  ours=$(nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$PWD/target/lib $out/$name \$unixsocket" 2>&1) || { echo "$name on ours failed:"; echo "$ours"; fail=1; continue; }
  if is_ours_example "$name"; then
    echo "$name on ours (an extension of ours): $(echo "$ours" | tail -n1)"
    continue
  fi
  for lib in debian reference; do
    theirs=$(nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$(libpath_of $lib) $out/$name \$unixsocket" 2>&1) || { echo "$name on $lib failed:"; echo "$theirs"; fail=1; continue; }
    if [ "$theirs" != "$ours" ]; then
      echo "$name: outputs differ between $lib and ours"; diff <(echo "$theirs") <(echo "$ours") || true; fail=1
    else
      echo "$name: same output on $lib and ours ($(echo "$ours" | wc -l) lines)"
    fi
  done
done
for src in tests/c/*.c; do
  name=$(basename "$src" .c)
  if is_ours_test "$name"; then
    ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -L"$PWD/target/lib" -l:libnbd.so.0
    libs="ours"
  elif is_1_22_test "$name"; then
    ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -L"$reference" -l:libnbd.so.0
    libs="reference ours"
  else
    ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0
    libs="debian reference ours"
  fi
  for lib in $libs; do
    run_test "$name" "$lib"
  done
done
# Each library really was the one loaded. (ldd's output to a file first:
# grep -q closing the pipe early would fail the pipeline.)
for lib in reference ours; do
  LD_LIBRARY_PATH=$(libpath_of $lib) ldd "$out/sync-rw" > "$out/ldd.txt"
  grep -q "$(libpath_of $lib)/libnbd.so.0" "$out/ldd.txt" || { echo "FAIL: $lib's libnbd.so.0 was not the one loaded"; fail=1; }
done
exit $fail
