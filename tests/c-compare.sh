#!/usr/bin/env bash
# Builds the C examples once and runs each against a fresh nbdkit on
# Debian's libnbd 1.14.2, on libnbd 1.22.2 built from source (the
# reference, `make reference`) and on ours (LD_LIBRARY_PATH). Outputs
# must match. Then the C tests in tests/c, which start their own servers,
# must pass on all three, told which by NBD_TEST_LIBRARY. Everything is
# built once, against include/libnbd.h.
set -euo pipefail
cd "$(dirname "$0")/.."
reference=$PWD/target/libnbd-1.22.2/lib/.libs
[ -e "$reference/libnbd.so.0" ] || { echo "the reference libnbd 1.22.2 is not built: make reference"; exit 1; }
libpath_of() {
  case $1 in
    debian) echo "" ;;
    reference) echo "$reference" ;;
    ours) echo "$PWD/target/lib" ;;
  esac
}
out=target/c-tests
mkdir -p "$out"
fail=0
for src in examples-c/*.c; do
  name=$(basename "$src" .c)
  ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0
  ours=$(nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$PWD/target/lib $out/$name \$unixsocket" 2>&1) || { echo "$name on ours failed:"; echo "$ours"; fail=1; continue; }
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
  ${CC:-cc} -std=gnu99 -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -l:libnbd.so.0
  for lib in debian reference ours; do
    if NBD_TEST_LIBRARY=$lib LD_LIBRARY_PATH=$(libpath_of $lib) "$out/$name" > "$out/$name.$lib.log" 2>&1; then
      echo "$name on $lib: $(tail -n1 "$out/$name.$lib.log")"
    else
      echo "$name on $lib failed:"; grep -v '^nbdkit: ' "$out/$name.$lib.log" | tail -n 30; fail=1
    fi
  done
done
# (ldd's output to a file first: grep -q closing the pipe early would fail the pipeline.)
LD_LIBRARY_PATH=$PWD/target/lib ldd "$out/sync-rw" > "$out/ldd.txt"
grep -q "$PWD/target/lib/libnbd.so.0" "$out/ldd.txt" || { echo "our libnbd.so.0 was not the one loaded"; fail=1; }
LD_LIBRARY_PATH=$reference ldd "$out/sync-rw" > "$out/ldd.txt"
grep -q "$reference/libnbd.so.0" "$out/ldd.txt" || { echo "the reference libnbd.so.0 was not the one loaded"; fail=1; }
exit $fail
