#!/usr/bin/env bash
# The exported surface of target/lib/libnbd.so.0 is libnbd 1.22.2's: the
# same `NODE function` set (tests/abi/libnbd-1.22.2.symbols, read off the
# library built from Debian trixie's source), which contains libnbd
# 1.14.2's (tests/abi/libnbd-1.14.2.symbols, read off Debian bookworm's)
# at the same nodes; the same SONAME; and version nodes chained as in the
# reference build of 1.22.2 (`make reference`). Beside them, and nothing
# else: this library's extensions, the table's `nbd_rs_*` rows, each at
# its NBD_RS_* node, a node outside libnbd's chain.
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
libnbd_nodes() { grep -v '^NBD_RS_' || true; }
extension_nodes() { grep '^NBD_RS_' || true; }

if ! diff -u <(listed tests/abi/libnbd-1.22.2.symbols) <(defined "$ours" | libnbd_nodes); then
  echo "exported symbols differ from libnbd 1.22.2"; fail=1
fi
# 1.14.2's programs keep running: each of its functions, at its node.
missing=$(comm -23 <(listed tests/abi/libnbd-1.14.2.symbols) <(defined "$ours"))
if [ -n "$missing" ]; then
  echo "libnbd 1.14.2 functions missing or at another node:"; echo "$missing"; fail=1
fi
# The extensions: exactly the table's nbd_rs_* rows, at their nodes.
table_extensions=$(grep -o 'row("nbd_rs_[a-z0-9_]*", "NBD_RS_[0-9.]*"' nbd-capi/src/table.rs \
  | sed 's/row("\([^"]*\)", "\([^"]*\)"/\2 \1/' | sort)
if ! diff -u <(echo "$table_extensions") <(defined "$ours" | extension_nodes); then
  echo "extension functions differ from the table's nbd_rs_* rows"; fail=1
fi
if [ -z "$table_extensions" ] || grep -q 'Parent 1: NBD_RS_' <(chain "$ours") \
    || chain "$ours" | grep -A1 'Name: NBD_RS_' | grep -q 'Parent'; then
  echo "extension nodes missing or chained to another node"; fail=1
fi
n=$(defined "$ours" | libnbd_nodes | wc -l)
x=$(defined "$ours" | extension_nodes | wc -l)
readelf -d "$ours" | grep -q 'Library soname: \[libnbd.so.0\]' || { echo "SONAME is not libnbd.so.0"; fail=1; }
if [ -f "$reference" ]; then
  diff -u <(chain "$reference") <(chain "$ours" | grep -v 'Name: NBD_RS_') || { echo "version nodes chain differently from $reference"; fail=1; }
else
  echo "FAIL: $reference is missing: run make reference (or link target/libnbd-1.22.2 to a built one)"; fail=1
fi
[ $fail = 0 ] && echo "abi: $n functions, each at libnbd 1.22.2's version node (1.14.2's all included); SONAME and node chain match $reference; $x extension function(s) at NBD_RS_* nodes of their own"
exit $fail
