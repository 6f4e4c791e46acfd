#!/usr/bin/env bash
# The exported surface of target/lib/libnbd.so.0 is libnbd 1.22.2's: the
# same `NODE function` set (tests/abi/libnbd-1.22.2.symbols, read off the
# library built from Debian trixie's source), which contains libnbd
# 1.14.2's (tests/abi/libnbd-1.14.2.symbols, read off Debian bookworm's)
# at the same nodes; nothing else defined; the same SONAME; and version
# nodes chained as in the reference build of 1.22.2 (`make reference`).
set -euo pipefail
cd "$(dirname "$0")/.."
ours=target/lib/libnbd.so.0
reference=target/libnbd-1.22.2/lib/.libs/libnbd.so.0
fail=0

defined() {  # "NODE name" for every defined dynamic symbol but version nodes
  readelf --dyn-syms -W "$1" | awk 'NR > 3 && $7 != "UND" && $8 ~ /@/ {print $8}' \
    | sed 's/@@*/ /' | awk '$1 != $2 {print $2, $1}' | sort
}
chain() {  # version definitions with their parents
  readelf -V -W "$1" | sed -n '/Version definition/,/Version needs/p' | grep -o 'Name: .*\|Parent 1: .*'
}
listed() { grep -v '^#' "$1" | sort; }

if ! diff -u <(listed tests/abi/libnbd-1.22.2.symbols) <(defined "$ours"); then
  echo "exported symbols differ from libnbd 1.22.2"; fail=1
fi
# 1.14.2's programs keep running: each of its functions, at its node.
missing=$(comm -23 <(listed tests/abi/libnbd-1.14.2.symbols) <(defined "$ours"))
if [ -n "$missing" ]; then
  echo "libnbd 1.14.2 functions missing or at another node:"; echo "$missing"; fail=1
fi
n=$(defined "$ours" | wc -l)
readelf -d "$ours" | grep -q 'Library soname: \[libnbd.so.0\]' || { echo "SONAME is not libnbd.so.0"; fail=1; }
if [ -f "$reference" ]; then
  diff -u <(chain "$reference") <(chain "$ours") || { echo "version nodes chain differently from $reference"; fail=1; }
else
  echo "FAIL: $reference is missing: run make reference (or link target/libnbd-1.22.2 to a built one)"; fail=1
fi
[ $fail = 0 ] && echo "abi: $n functions, each at libnbd 1.22.2's version node (1.14.2's all included); SONAME and node chain match $reference"
exit $fail
