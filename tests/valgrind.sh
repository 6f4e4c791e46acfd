#!/usr/bin/env bash
# The C examples and C tests on our libnbd.so.0 under valgrind's memcheck:
# any invalid access or leak fails (--error-exitcode). tls-test runs with
# a longer time limit (about 2 minutes under valgrind), and "possibly
# lost" is not an error there (nor in the other tests that use TLS): the openssl crate keeps a static hash map
# whose only pointer is into the middle of its block. Then stress-test's
# threads, and multiconn-test's 8 threads on one handle of 4 connections,
# under helgrind: any race or lock misuse fails.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind > /dev/null || { echo "valgrind is not installed (make deps)" >&2; exit 1; }
out=target/valgrind
mkdir -p "$out"
ours=$PWD/target/lib
vg=(valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=99)
fail=0
report() { # name, log, status
  local errors leaked
  errors=$(grep -o 'ERROR SUMMARY: [0-9]*' "$2" | tail -1 | grep -o '[0-9]*$')
  leaked=$(grep -o 'in use at exit: [0-9,]* bytes' "$2" | tail -1 | grep -o '[0-9,]* bytes' || echo "not measured")
  if [ "$3" = 0 ]; then
    echo "ok   $1 under valgrind: $errors errors, $leaked in use at exit"
  else
    fail=1; echo "FAIL $1 under valgrind (status $3)"; grep -v '^nbdkit' "$2" | tail -30
  fi
}
for src in examples-c/*.c; do
  name=$(basename "$src" .c)
  flags=$(tests/example-flags.sh "$name")
  ${CC:-cc} -std=gnu99 -g -Wall -Werror -pthread -Iinclude -o "$out/$name" "$src" -L"$ours" -l:libnbd.so.0 $flags
  status=0
  nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$ours ${vg[*]} $out/$name \$unixsocket" > "$out/$name.log" 2>&1 || status=$?
  report "$name" "$out/$name.log" $status
done
# api122-test uses libnbd 1.16-1.22 functions: it links against ours.
for name in capi-test compat-test debug-test messages-test peers-test stress-test tls-test api122-test multiconn-test reconnect-test writer-test; do
  ${CC:-cc} -std=gnu99 -g -Wall -Werror -pthread -Iinclude -o "$out/$name" "tests/c/$name.c" -L"$ours" -l:libnbd.so.0
  leaks=() limit=
  # OpenSSL (and the openssl crate's index cache) keep process-wide state.
  [ "$name" = tls-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=1200
  [ "$name" = api122-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=600
  [ "$name" = messages-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=600
  [ "$name" = multiconn-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=600
  [ "$name" = reconnect-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=900
  [ "$name" = writer-test ] && leaks=(--errors-for-leak-kinds=definite,indirect) limit=900
  status=0
  TEST_TIME_LIMIT=$limit STRESS_OPS=40 MULTICONN_OPS=40 NBD_TEST_LIBRARY=ours LD_LIBRARY_PATH=$ours "${vg[@]}" "${leaks[@]}" "$out/$name" \
    > "$out/$name.log" 2>&1 || status=$?
  report "$name" "$out/$name.log" $status
done
status=0
STRESS_OPS=${HELGRIND_OPS:-100} STRESS_THREADS_ONLY=1 LD_LIBRARY_PATH=$ours \
  valgrind --tool=helgrind --error-exitcode=99 "$out/stress-test" > "$out/stress-test.helgrind.log" 2>&1 || status=$?
report "stress-test (helgrind)" "$out/stress-test.helgrind.log" $status
grep -E "threads on one handle|handles in 8 threads|injected, " "$out/stress-test.helgrind.log" || fail=1
status=0
MULTICONN_ONLY=threads MULTICONN_OPS=${HELGRIND_OPS:-100} TEST_TIME_LIMIT=600 LD_LIBRARY_PATH=$ours \
  valgrind --tool=helgrind --error-exitcode=99 "$out/multiconn-test" > "$out/multiconn-test.helgrind.log" 2>&1 || status=$?
report "multiconn-test threads (helgrind)" "$out/multiconn-test.helgrind.log" $status
grep -E "threads on one handle of 4 connections" "$out/multiconn-test.helgrind.log" || fail=1
# The concurrent writer: a writer thread sending while this thread
# receives (the examples), and reporting its error while this thread
# waits in a synchronous call (writer-test's error part).
for name in concurrent-writer concurrent-writer-shared; do
  status=0
  nbdkit -U - memory 16M --run "LD_LIBRARY_PATH=$ours valgrind --tool=helgrind --error-exitcode=99 $out/$name \$unixsocket" \
    > "$out/$name.helgrind.log" 2>&1 || status=$?
  report "$name (helgrind)" "$out/$name.helgrind.log" $status
  grep -E "^verified" "$out/$name.helgrind.log" || fail=1
done
status=0
WRITER_TEST_ONLY=error TEST_TIME_LIMIT=600 LD_LIBRARY_PATH=$ours \
  valgrind --tool=helgrind --error-exitcode=99 "$out/writer-test" > "$out/writer-test.helgrind.log" 2>&1 || status=$?
report "writer-test error (helgrind)" "$out/writer-test.helgrind.log" $status
grep -E "writer-test: [0-9]+ checks, 0 failures" "$out/writer-test.helgrind.log" || fail=1
exit $fail
