#!/usr/bin/env bash
# The exported surface of target/lib/libnbd.so.0 equals libnbd 1.14.2's:
# the same `NODE function` set (tests/abi/libnbd-1.14.2.symbols, read off
# Debian's library), nothing else defined, the same SONAME, and version
# nodes chained as in Debian's installed libnbd.so.0.
set -euo pipefail
cd "$(dirname "$0")/.."
ours=target/lib/libnbd.so.0
theirs=$(ldconfig -p | awk '/libnbd.so.0 .*x86-64|libnbd.so.0 \(libc6/ {print $NF; exit}')
fail=0

defined() {  # "NODE name" for every defined dynamic symbol but version nodes
  readelf --dyn-syms -W "$1" | awk 'NR > 3 && $7 != "UND" && $8 ~ /@/ {print $8}' \
    | sed 's/@@*/ /' | awk '$1 != $2 {print $2, $1}' | sort
}
chain() {  # version definitions with their parents
  readelf -V -W "$1" | sed -n '/Version definition/,/Version needs/p' | grep -o 'Name: .*\|Parent 1: .*'
}

if ! diff -u <(grep -v '^#' tests/abi/libnbd-1.14.2.symbols | sort) <(defined "$ours"); then
  echo "exported symbols differ from libnbd 1.14.2"; fail=1
fi
n=$(defined "$ours" | wc -l)
readelf -d "$ours" | grep -q 'Library soname: \[libnbd.so.0\]' || { echo "SONAME is not libnbd.so.0"; fail=1; }
if [ -n "$theirs" ]; then
  diff -u <(chain "$theirs") <(chain "$ours") || { echo "version nodes chain differently from $theirs"; fail=1; }
else
  echo "Debian's libnbd.so.0 is not installed (package libnbd0)"; fail=1
fi
[ $fail = 0 ] && echo "abi: $n functions, each at libnbd 1.14.2's version node; SONAME and node chain match $theirs"
exit $fail
