#!/usr/bin/env bash
# Debian's programs, unchanged, on our libnbd.so.0 with reconnect-delay=30
# (and open-timeout=10) in the URI, while the server is restarted under
# them on the same socket (make check-reconnect):
#  - fio's nbd engine, random 4k writes with verify=crc32c, survives 5
#    restarts: no error, every block verified;
#  - nbdcopy of 1 GiB into the server survives 3 restarts; the copy is
#    byte-identical;
# each against nbdkit on a file, plain and over TLS with X.509 (killed
# with SIGKILL: its writes are in the page cache), and
# qemu-nbd on a qcow2 file (stopped with SIGTERM: it keeps qcow2 metadata
# in memory until it flushes, which a crash would lose).
# The restarts are counted; a workload that ends before they all happened
# fails the test rather than proving nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH
ours=$PWD/target/lib
test -f "$ours/libnbd.so.0" || { echo "build first: make lib" >&2; exit 1; }
for p in nbdcopy nbdkit qemu-nbd qemu-img fio; do
  command -v $p >/dev/null || { echo "$p missing: make deps" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/nbd-reconnect.XXXXXX)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null
  jobs -p | xargs -r kill 2>/dev/null
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
sock=$dir/s.sock
fail=0 passed=0

wait_for() {
  for _ in $(seq 200); do
    [ -S "$sock" ] && /usr/bin/python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$sock" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "no server on $sock" >&2; exit 1
}

# start KIND IMAGE: the server, in the background; nbdkit with the TLS
# options in ${tls[@]}, the filters in ${filters[@]} and their parameters
# in ${params[@]}.
filters=() params=() tls=()
start() {
  local kind=$1 image=$2
  rm -f "$sock"
  case $kind in
    nbdkit*) nbdkit -f -U "$sock" "${tls[@]}" "${filters[@]}" file "$image" "${params[@]}" > /dev/null 2>&1 & ;;
    qemu) qemu-nbd -f qcow2 -t -k "$sock" "$image" > /dev/null 2>&1 & ;;
  esac
  server_pid=$!
  wait_for
}

stop() { # KIND: nbdkit dies as in a crash; qemu-nbd is stopped
  case $1 in
    nbdkit*) kill -9 "$server_pid" ;;
    qemu) kill -TERM "$server_pid" ;;
  esac
  # Not always our child (a restarter subshell may stop the first one).
  while kill -0 "$server_pid" 2>/dev/null; do sleep 0.02; done
  wait "$server_pid" 2>/dev/null
  server_pid=
}

# restarts KIND IMAGE N GAP PID: restarts the server N times, GAP seconds
# apart, while PID runs; writes how many it did to $dir/restarts.
restarts() {
  local kind=$1 image=$2 n=$3 gap=$4 pid=$5
  local done=0
  for _ in $(seq "$n"); do
    sleep "$gap"
    kill -0 "$pid" 2>/dev/null || break
    stop "$kind"
    start "$kind" "$image"
    done=$((done + 1))
  done
  echo "$done" > "$dir/restarts"
  # Keep the last server up for the rest of the workload.
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  stop "$kind"
}

result() { # name, status of the workload, restarts wanted
  local got
  got=$(cat "$dir/restarts")
  if [ "$2" = 0 ] && [ "$got" = "$3" ]; then
    passed=$((passed + 1)); echo "ok   $1 ($got restarts)"
  else
    fail=1; echo "FAIL $1: status $2, $got of $3 restarts"; tail -20 "$dir/out"
  fi
}

# open-timeout: a program that opens another handle while the server
# restarts (fio opens one to learn the size, then its own) waits for it.
query="reconnect-delay=30&open-timeout=10"
tests/tls-certs.sh "$dir/certs" > /dev/null || { echo "tests/tls-certs.sh failed" >&2; exit 1; }
# nbdkit plain, qemu-nbd plain, and nbdkit over TLS with X.509 (every
# reconnect a new TLS session, the certificate checked again). The
# programs refuse a URI that names local files (tls-psk-file,
# tls-certificates), as libnbd does by default, so the CA comes from
# SSL_CERT_FILE; PSK is reconnect-test's.
for kind in nbdkit qemu nbdkit-x509; do
  case $kind in
    nbdkit-x509)
      tls=(--tls=require --tls-certificates="$dir/certs/server")
      export SSL_CERT_FILE=$dir/certs/client-ca/ca-cert.pem
      uri="nbds+unix:///?socket=$sock&$query" ;;
    *) tls=() uri="nbd+unix:///?socket=$sock&$query" ;;
  esac
  # fio: random writes, each block checked when read back at the end.
  image=$dir/fio.$kind
  if [ $kind = qemu ]; then qemu-img create -q -f qcow2 "$image" 256M; else truncate -s 256M "$image"; fi
  start $kind "$image"
  (cd "$dir" && LD_LIBRARY_PATH=$ours exec fio --name=rc --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
     --iodepth=32 --size=256m --rate_iops=15000 --verify=crc32c --do_verify=1 --thread > "$dir/out" 2>&1) &
  wpid=$!
  # The restarter owns the server from here; its pid is in this subshell.
  restarts $kind "$image" 5 0.6 $wpid &
  rpid=$!
  wait $wpid; status=$?
  wait $rpid
  grep -q "err= 0" "$dir/out" || status=1
  grep -qi "verify.*fail\|bad magic\|crc32c" "$dir/out" && status=1
  result "fio randwrite verify=crc32c through 5 restarts of $kind" $status 5
  server_pid=
  rm -f "$image"

  # nbdcopy: 1 GiB into the server, compared afterwards.
  [ -f "$dir/src" ] || head -c 1G /dev/urandom > "$dir/src"
  image=$dir/copy.$kind
  if [ $kind = qemu ]; then
    qemu-img create -q -f qcow2 "$image" 1G
    pace=(--requests=1 --request-size=16384 --connections=1)
  else
    truncate -s 1G "$image"
    # 256 MiB/s: the copy lasts about 4 s.
    filters=(--filter=rate) params=(rate=256M)
    pace=()
  fi
  start $kind "$image"
  (LD_LIBRARY_PATH=$ours exec nbdcopy "${pace[@]}" "$dir/src" "$uri" > "$dir/out" 2>&1) &
  wpid=$!
  restarts $kind "$image" 3 0.7 $wpid &
  rpid=$!
  wait $wpid; status=$?
  wait $rpid
  server_pid=
  if [ $kind = qemu ]; then
    qemu-img compare -q -f qcow2 -F raw "$image" "$dir/src" || status=1
  else
    cmp -s "$image" "$dir/src" || status=1
  fi
  result "nbdcopy 1 GiB through 3 restarts of $kind, byte-identical" $status 3
  rm -f "$image"
  filters=() params=()
done

echo "reconnect-programs: $passed passed, $fail failed"
exit $fail
