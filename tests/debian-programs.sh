#!/usr/bin/env bash
# Debian's own libnbd programs, unchanged, on our libnbd.so.0 (through
# LD_LIBRARY_PATH) and on Debian's libnbd, against servers started here.
# Outputs must be identical; copies must be byte-identical; fio must verify.
set -uo pipefail
cd "$(dirname "$0")/.."
# nbdsh runs whichever python3 comes first; Debian's has the nbd module.
export PATH=/usr/bin:$PATH
ours=$PWD/target/lib
test -f "$ours/libnbd.so.0" || { echo "build first: make lib" >&2; exit 1; }
for p in nbdinfo nbdcopy nbdsh nbdkit qemu-nbd nbd-server fio; do
  command -v $p >/dev/null || { echo "$p missing: make deps" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/nbd-debian.XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null
  [ -f "$dir/n.pid" ] && kill "$(cat "$dir/n.pid")" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
# A socket file appears at bind(2); wait until it accepts connections.
wait_for() {
  for _ in $(seq 100); do
    [ -S "$1" ] && /usr/bin/python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no server on $1" >&2; exit 1
}

fail=0 passed=0
# The library the programs are compared against: Debian's (the system's),
# until the section for trixie's programs sets the 1.22.2 reference.
theirs_lib=
same() { # name, then the command to run on both libraries
  local name=$1; shift
  local theirs mine
  theirs=$(LD_LIBRARY_PATH=$theirs_lib "$@" 2>&1; echo "rc=$?")
  mine=$(LD_LIBRARY_PATH=$ours "$@" 2>&1; echo "rc=$?")
  if [ "$theirs" == "$mine" ]; then
    passed=$((passed + 1)); echo "ok   $name ($(echo "$mine" | wc -l) lines)"
  else
    fail=1; echo "FAIL $name: outputs differ"; diff <(echo "$theirs") <(echo "$mine") | head -20
  fi
}
same_failure() { # name, then a command that must fail the same way on both: same
  # status and the same "program: function:" prefix (the TLS libraries word
  # the reason differently)
  local name=$1; shift
  local theirs mine
  theirs=$("$@" 2>&1 | cut -d: -f1-2; echo "rc=${PIPESTATUS[0]}")
  mine=$(LD_LIBRARY_PATH=$ours "$@" 2>&1 | cut -d: -f1-2; echo "rc=${PIPESTATUS[0]}")
  if [ "$theirs" == "$mine" ] && [ "${mine##*rc=}" != 0 ]; then
    passed=$((passed + 1)); echo "ok   $name (both: $(echo "$mine" | tr '\n' ' '))"
  else
    fail=1; echo "FAIL $name"; diff <(echo "$theirs") <(echo "$mine") | head -20
  fi
}
round_trip() { # how (for the names), a memory server's URI: file -> server -> file, identical
  check "nbdcopy file to memory$1" nbdcopy "$dir/ref.img" "$2"
  check "nbdcopy memory back$1" nbdcopy "$2" "$dir/back.img"
  check "nbdcopy round trip identical$1" cmp "$dir/ref.img" "$dir/back.img"
  rm -f "$dir/back.img"
}
wait_for_port() {
  for _ in $(seq 100); do
    /usr/bin/python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no server on port $1" >&2; exit 1
}
check() { # name, command (run on our library only)
  local name=$1; shift
  if LD_LIBRARY_PATH=$ours "$@" > "$dir/out" 2>&1; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    fail=1; echo "FAIL $name"; tail -20 "$dir/out"
  fi
}

# The servers.
nbdkit -f --exit-with-parent -U "$dir/k.sock" --filter=exportname memory 8M \
  exportname-list=explicit exportname=a exportname=b & pids+=($!)
nbdkit -f --exit-with-parent -U "$dir/p.sock" pattern 64M & pids+=($!)
nbdkit -f --exit-with-parent -U "$dir/s.sock" sparse-random 64M seed=7 & pids+=($!)
nbdkit -f --exit-with-parent -U "$dir/m.sock" memory 64M & pids+=($!)
truncate -s 64M "$dir/q.img"
printf 'xyz' | dd of="$dir/q.img" bs=1 seek=1048576 conv=notrunc status=none
qemu-nbd -k "$dir/q.sock" -f raw -t -e 0 -A -x qe -D "qemu export" "$dir/q.img" & pids+=($!)
printf '[generic]\nunixsock = %s\nallowlist = true\n[exp]\nexportname = %s\nflush = true\nfua = true\ntrim = true\n' \
  "$dir/n.sock" "$dir/q.img" > "$dir/n.conf"
nbd-server -C "$dir/n.conf" -p "$dir/n.pid" >/dev/null 2>&1
for s in k p s m q n; do wait_for "$dir/$s.sock"; done

# nbdinfo, every mode, on the three servers.
for uri in "nbd+unix:///a?socket=$dir/k.sock" "nbd+unix:///qe?socket=$dir/q.sock" \
           "nbd+unix:///exp?socket=$dir/n.sock" "nbd+unix:///?socket=$dir/s.sock"; do
  for mode in "" --list --map --json --size --totals "--map=qemu:allocation-depth" "--can flush" "--is read-only"; do
    same "nbdinfo $mode $uri" nbdinfo $mode "$uri"
  done
done
same "nbdinfo of a missing export" nbdinfo "nbd+unix:///nope?socket=$dir/q.sock"
# Ours says what is wrong and where; the status and the failing call are the same.
same_failure "nbdinfo of a bad URI" nbdinfo "nbd://bad uri"

# nbdcopy: server to file, and back into another server; checksums match.
nbdcopy "nbd+unix:///?socket=$dir/s.sock" "$dir/ref.img"
check "nbdcopy sparse-random to file" nbdcopy "nbd+unix:///?socket=$dir/s.sock" "$dir/copy.img"
check "nbdcopy file identical" cmp "$dir/ref.img" "$dir/copy.img"
round_trip "" "nbd+unix:///?socket=$dir/m.sock"
check "nbdcopy pattern to null" nbdcopy "nbd+unix:///?socket=$dir/p.sock" null:

# Python and nbdsh.
# The version and the strict bits are 1.22.2's on ours (1.14.2 and 0x1f
# on Debian's): what both share is compared.
same "python3 import nbd" /usr/bin/python3 -c 'import nbd; h = nbd.NBD(); print(h.get_version()[:2], h.supports_uri(), h.get_strict_mode() & 0x1f)'
# Python pins a buffer with a completion that has only .free: a buffer in
# flight cannot be resized (BufferError), and is released at retirement.
cat > "$dir/pin.py" <<EOF
import nbd
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=$dir/m.sock")
buf = bytearray(512)
c = h.aio_pread(buf, 0)
try:
    buf.pop()
    print("resized while in flight")
except BufferError:
    print("BufferError while in flight")
while not h.aio_command_completed(c):
    h.poll(-1)
buf.pop()
print("released at retirement")
EOF
same "python3 buffer pinned while in flight" /usr/bin/python3 "$dir/pin.py"
cat > "$dir/script.py" <<EOF
h.add_meta_context("base:allocation")
h.connect_uri("nbd+unix:///?socket=$dir/m.sock")
data = b"hello world" * 1000
h.pwrite(data, 65536)
assert h.pread(len(data), 65536) == data
seen = []
h.block_status(1 << 20, 0, lambda ctx, off, e, err: seen.append((ctx, off, len(e))) or 0)
print("extents", seen)
buf = nbd.Buffer(4096)
c = h.aio_pread(buf, 65536)
while not h.aio_command_completed(c):
    h.poll(-1)
print("aio", buf.to_bytearray()[:11], h.aio_in_flight())
try:
    h.pread(10, 1 << 40)
except nbd.Error as e:
    print("error", e.errnum, e.string)
h.shutdown()
print("closed", h.aio_is_closed())
EOF
same "nbdsh script" nbdsh -c "exec(open('$dir/script.py').read())"

# fio's nbd engine with verification.
# (fio keeps its verify state in the working directory.)
cd "$dir"
check "fio randrw verify=crc32c" fio --name=v --ioengine=nbd --uri="nbd+unix:///?socket=$dir/m.sock" \
  --rw=randrw --bs=4k --size=32m --iodepth=32 --verify=crc32c --do_verify=1 --output="$dir/fio.out"

cd - >/dev/null

# Errors injected at random by nbdkit's error filter reach the program,
# every one, on both libraries: fio (continuing on errors) counts as many
# as the filter logged, and nbdcopy fails with EIO whichever way it copies.
# A fresh server per run: nbdkit 1.32 can abort when a client drops its
# connections with replies in flight.
injecting_server() { # name, then plugin and error filter arguments
  local sock=$dir/$1.sock; shift
  nbdkit -f --exit-with-parent -U "$sock" --filter=error "$@" 2> "$sock.log" & pids+=($!)
  wait_for "$sock"
}
ok_if() { # name, then a test command
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"; else fail=1; echo "FAIL $name"; fi
}
# Random data, so that every piece is a write (sparse-random's are mostly zeroes).
head -c 16M /dev/urandom > "$dir/random.img"
for lib in debian ours; do
  libpath=""; [ $lib = ours ] && libpath=$ours
  injecting_server "fio-$lib" memory 64M error=EIO error-rate=2%
  (cd "$dir" && LD_LIBRARY_PATH=$libpath fio --name="e-$lib" --ioengine=nbd --uri="nbd+unix:///?socket=$dir/fio-$lib.sock" \
    --rw=randrw --bs=4k --size=16m --iodepth=32 --continue_on_error=all --output-format=json \
    --output="$dir/fio-$lib.json" > /dev/null 2>&1)
  reported=$(/usr/bin/python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["total_err"])' \
    "$dir/fio-$lib.json" 2>/dev/null || echo none)
  injected=$(grep -c 'injecting EIO' "$dir/fio-$lib.sock.log")
  ok_if "fio on $lib reports all $injected injected errors (it counted $reported)" \
    test "$injected" -gt 0 -a "$reported" = "$injected"
  injecting_server "rd-$lib" pattern 64M error-pread=EIO error-pread-rate=10%
  LD_LIBRARY_PATH=$libpath nbdcopy "nbd+unix:///?socket=$dir/rd-$lib.sock" "$dir/eio.img" > "$dir/rd.out" 2>&1
  ok_if "nbdcopy on $lib fails on an injected read error (status $?)" grep -q 'Input/output error' "$dir/rd.out"
  injecting_server "wr-$lib" memory 64M error-pwrite=EIO error-pwrite-rate=10%
  LD_LIBRARY_PATH=$libpath nbdcopy "$dir/random.img" "nbd+unix:///?socket=$dir/wr-$lib.sock" > "$dir/wr.out" 2>&1
  ok_if "nbdcopy on $lib fails on an injected write error (status $?)" grep -q 'Input/output error' "$dir/wr.out"
done

# Multi-conn (nbd-rs only; libnbd ignores the URI parameter): the same
# programs with multi-conn=4 in the URI, against nbdkit logging every
# connection. nbdinfo's handle makes 4 connections; its output is the one
# it prints over one connection; nbdcopy round trips and fio verifies.
nbdkit -f --exit-with-parent -U "$dir/mc.sock" --filter=log memory 64M logfile="$dir/mc.log" & pids+=($!)
wait_for "$dir/mc.sock"
mc="nbd+unix:///?socket=$dir/mc.sock"
connects() { grep -c ' Connect ' "$dir/mc.log"; }
before=$(connects)
one=$(LD_LIBRARY_PATH=$ours nbdinfo "$mc" 2>&1)
between=$(connects)
four=$(LD_LIBRARY_PATH=$ours nbdinfo "$mc&multi-conn=4" 2>&1 | sed 's/&multi-conn=4//')
after=$(connects)
# nbdinfo makes a connection of its own first (a probe it ends in opt
# mode, so it stays one connection), then its handle: 4 with
# multi-conn=4, so 3 more than without.
ok_if "nbdinfo's handle made 4 connections with multi-conn=4 (server logged $((after - between)) against $((between - before)) without)" \
  test $((after - between)) = $((between - before + 3))
ok_if "nbdinfo with multi-conn=4 prints what it prints over one connection ($(echo "$one" | wc -l) lines)" \
  test "$one" = "$four"
for mode in --map --json "--can multi-conn"; do
  one=$(LD_LIBRARY_PATH=$ours nbdinfo $mode "$mc" 2>&1; echo "rc=$?")
  four=$(LD_LIBRARY_PATH=$ours nbdinfo $mode "$mc&multi-conn=4" 2>&1 | sed 's/&multi-conn=4//'; echo "rc=${PIPESTATUS[0]}")
  ok_if "nbdinfo $mode with multi-conn=4 as over one connection" test "$one" = "$four"
done
round_trip " with multi-conn=4" "$mc&multi-conn=4"
(cd "$dir" && check "fio randrw verify=crc32c with multi-conn=4" fio --name=mcv --ioengine=nbd --uri="$mc&multi-conn=4" \
  --rw=randrw --bs=4k --size=32m --iodepth=32 --verify=crc32c --do_verify=1 --output="$dir/fio-mc.out")

# nbdkit's nbd plugin proxying through our library, read by Debian's libnbd.
LD_LIBRARY_PATH=$ours nbdkit -f --exit-with-parent -U "$dir/x.sock" nbd socket="$dir/p.sock" & pids+=($!)
wait_for "$dir/x.sock"
nbdcopy "nbd+unix:///?socket=$dir/x.sock" "$dir/proxy.img" && nbdcopy "nbd+unix:///?socket=$dir/p.sock" "$dir/direct.img"
if cmp -s "$dir/proxy.img" "$dir/direct.img" && \
   grep -q "$ours/libnbd.so.0" "/proc/${pids[-1]}/maps"; then
  passed=$((passed + 1)); echo "ok   nbdkit nbd plugin on our library proxies pattern 64M identically"
else
  fail=1; echo "FAIL nbdkit nbd plugin proxy"
fi

# The same programs over TLS (PSK): nbds URIs, output and copies identical.
echo "alice:$(openssl rand -hex 32)" > "$dir/keys.psk"
nbdkit -f --exit-with-parent -U "$dir/ts.sock" --tls=require --tls-psk="$dir/keys.psk" \
  sparse-random 64M seed=7 & pids+=($!)
nbdkit -f --exit-with-parent -U "$dir/tm.sock" --tls=require --tls-psk="$dir/keys.psk" memory 64M & pids+=($!)
for s in ts tm; do wait_for "$dir/$s.sock"; done
tls="tls-psk-file=$dir/keys.psk"
for mode in "" --map --json; do
  same "nbdinfo $mode over TLS" nbdinfo $mode "nbds+unix://alice@/?socket=$dir/ts.sock&$tls"
done
same "nbdinfo with a wrong TLS user" nbdinfo "nbds+unix://bob@/?socket=$dir/ts.sock&$tls"
check "nbdcopy sparse-random over TLS to file" nbdcopy "nbds+unix://alice@/?socket=$dir/ts.sock&$tls" "$dir/tls.img"
check "nbdcopy over TLS identical" cmp "$dir/ref.img" "$dir/tls.img"
round_trip " over TLS" "nbds+unix://alice@/?socket=$dir/tm.sock&$tls"

# And X.509: qemu-nbd (which wants a client certificate) and nbdkit over
# TCP, verified against the test CA.
tests/tls-certs.sh "$dir/certs" > /dev/null
free_port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
qport=$(free_port)
qemu-nbd -t -f raw -p "$qport" -b 127.0.0.1 -x qe \
  --object "tls-creds-x509,id=t0,endpoint=server,dir=$dir/certs/server" --tls-creds t0 "$dir/q.img" & pids+=($!)
kport=$(free_port)
nbdkit -f --exit-with-parent -p "$kport" -i 127.0.0.1 --tls=require --tls-certificates="$dir/certs/server" \
  memory 64M & pids+=($!)
for p in $qport $kport; do wait_for_port $p; done
x509="tls-certificates=$dir/certs/client"
for mode in "" --map --json; do
  same "nbdinfo $mode over TLS X.509 (qemu-nbd)" nbdinfo $mode "nbds://localhost:$qport/qe?$x509"
done
same_failure "nbdinfo with an untrusted CA" nbdinfo "nbds://localhost:$qport/qe?tls-certificates=$dir/certs/client-ca2"
round_trip " over TLS X.509" "nbds://localhost:$kport/?$x509"

# Trixie's programs: nbdinfo, nbdcopy and nbddump of libnbd 1.22.2, built
# by `make reference` (the real binaries, not libtool's wrappers, which
# would load the build tree's library), on that library and on ours.
ref=$PWD/target/libnbd-1.22.2
if [ -x "$ref/info/.libs/nbdinfo" ] && [ -x "$ref/copy/.libs/nbdcopy" ] && [ -x "$ref/dump/.libs/nbddump" ]; then
  theirs_lib=$ref/lib/.libs
  for uri in "nbd+unix:///a?socket=$dir/k.sock" "nbd+unix:///qe?socket=$dir/q.sock" \
             "nbd+unix:///exp?socket=$dir/n.sock" "nbd+unix:///?socket=$dir/s.sock"; do
    for mode in "" --list --map --json --size --totals "--map=qemu:allocation-depth" "--can flush"; do
      same "trixie nbdinfo $mode $uri" "$ref/info/.libs/nbdinfo" $mode "$uri"
    done
  done
  same "trixie nbdinfo --version" "$ref/info/.libs/nbdinfo" --version
  same "trixie nbddump of a pattern" "$ref/dump/.libs/nbddump" --length=64k "nbd+unix:///?socket=$dir/p.sock"
  same "trixie nbddump of sparse data" "$ref/dump/.libs/nbddump" --length=1M "nbd+unix:///?socket=$dir/s.sock"
  for lib in "$theirs_lib" "$ours"; do
    rm -f "$dir/trixie.img"
    LD_LIBRARY_PATH=$lib "$ref/copy/.libs/nbdcopy" "nbd+unix:///?socket=$dir/s.sock" "$dir/trixie.img" ||
      { fail=1; echo "FAIL trixie nbdcopy on $lib"; }
    check "trixie nbdcopy identical ($lib)" cmp "$dir/ref.img" "$dir/trixie.img"
  done
else
  fail=1; echo "FAIL: trixie's programs are not built: make reference"
fi

# nbd-rs-server, our own server, under Debian's programs on Debian's
# libnbd and on ours: fio verifies, nbdinfo prints the same on both, and
# nbdcopy takes a file through a file export and back unchanged.
# (The comparison is with Debian's libnbd again, whatever the trixie
# section above set.)
theirs_lib=
rs_server=$PWD/target/release/nbd-rs-server
test -x "$rs_server" || { echo "build first: make lib ($rs_server is missing)" >&2; exit 1; }
# 8 MiB: the round trip below fills the file export exactly.
truncate -s 8M "$dir/rs-disk.img"
"$rs_server" -U "$dir/rs.sock" memory:64M file="file:$dir/rs-disk.img" 2> "$dir/rs.log" & pids+=($!)
wait_for "$dir/rs.sock"
rs_mem="nbd+unix:///?socket=$dir/rs.sock"
rs_file="nbd+unix:///file?socket=$dir/rs.sock"
for uri in "$rs_mem" "$rs_file"; do
  for mode in "" --map --json; do
    same "nbdinfo $mode nbd-rs-server $uri" nbdinfo $mode "$uri"
  done
done
for lib in debian ours; do
  libpath=""; [ $lib = ours ] && libpath=$ours
  for target in "mem $rs_mem 32m" "file $rs_file 8m"; do
    read -r export uri size <<< "$target"
    out=$dir/fio-rs-$lib-$export.out
    if (cd "$dir" && LD_LIBRARY_PATH=$libpath fio --name="rs-$lib-$export" --ioengine=nbd --uri="$uri" \
          --rw=randrw --bs=4k --size="$size" --iodepth=32 --verify=crc32c --do_verify=1 \
          --output="$out" > /dev/null 2>&1); then
      passed=$((passed + 1)); echo "ok   fio randrw verify=crc32c on $lib against nbd-rs-server's $export export"
    else
      fail=1; echo "FAIL fio randrw verify=crc32c on $lib against nbd-rs-server's $export export"; tail -20 "$out"
    fi
  done
done
head -c 8M /dev/urandom > "$dir/rs-random.img"
check "nbdcopy file to nbd-rs-server's file export" nbdcopy "$dir/rs-random.img" "$rs_file"
check "nbdcopy nbd-rs-server's file export back" nbdcopy "$rs_file" "$dir/rs-back.img"
check "nbdcopy round trip through nbd-rs-server identical" cmp "$dir/rs-random.img" "$dir/rs-back.img"
# What the server wrote is in the file itself (nbdcopy flushed at the end).
check "nbd-rs-server's file export holds the copy" cmp "$dir/rs-random.img" "$dir/rs-disk.img"

echo "debian programs: $passed passed, fail=$fail"
exit $fail
