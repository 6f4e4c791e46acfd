#!/usr/bin/env bash
# make demo: nbd-rs's own server, nbd-rs-server, serving a 64 MiB memory
# export on a private socket; against it the Rust demo (nbd-proto over
# nbd-io), the C examples on our libnbd.so.0, and Debian's nbdinfo.
# No nbdkit: the server is the project's embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/nbd-rs-demo.XXXXXX)
sock=$dir/demo.sock
target/release/nbd-rs-server -U "$sock" memory:64M &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "demo: nbd-rs-server did not start" >&2; exit 1; }
echo "== the Rust demo (nbd-proto driven by nbd-io), against nbd-rs-server"
target/release/examples/demo "$sock"
for ex in sparse-map sync-rw aio-loop threads concurrent-writer; do
  echo "== examples-c/$ex.c on nbd-rs's libnbd.so.0"
  ${CC:-cc} -std=gnu99 -O2 -Wall -pthread -Iinclude -o "$dir/$ex" "examples-c/$ex.c" -Ltarget/lib -l:libnbd.so.0
  LD_LIBRARY_PATH=$PWD/target/lib "$dir/$ex" "$sock"
done
echo "== Debian's nbdinfo on nbd-rs's libnbd.so.0"
LD_LIBRARY_PATH=$PWD/target/lib nbdinfo "nbd+unix:///?socket=$sock"
