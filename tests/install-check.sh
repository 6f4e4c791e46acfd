#!/usr/bin/env bash
# `make install` and `make uninstall` as a packager and a sysadmin use them.
#
# 1. DESTDIR: install puts exactly the expected files there (a stripped
#    libnbd.so.0 with its SONAME, the header, pkg-config file, man pages;
#    libnbd.a only from install-static) and uninstall leaves the tree
#    empty.
# 2. Switching the system over and back, in a private mount namespace whose
#    /etc and /usr/local are overlays that vanish with it, so that a failed
#    run can never leave this machine switched over: Debian's unchanged
#    nbdinfo, nbdcopy, nbdsh and python3-libnbd load Debian's library;
#    after `make install` and `ldconfig` they load ours (ldd, the process's
#    own map, the first debug line) and work; a program built with
#    `pkg-config --cflags --libs libnbd` builds against ours and runs on
#    it; after `make uninstall` and `ldconfig` they load Debian's again.
#    Installing over Debian's own file is refused.
# 3. Per program, LD_LIBRARY_PATH does the same without installing.
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
# nbdsh runs whichever python3 comes first; Debian's has the nbd module.
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
MAKE=${MAKE:-make}
debian_lib=/lib/x86_64-linux-gnu/libnbd.so.0
fail=0 passed=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; fail=1; }
check() { # description, then a command that must succeed
  local what=$1; shift
  if "$@"; then ok; else bad "$what"; fi
}

# The libnbd.so.0 a program resolves to, by ldd.
resolves_to() { ldd "$1" | awk '$1 == "libnbd.so.0" {print $3}'; }
# The libnbd.so.0 mapped into a running python3 that imported nbd (nbdsh's
# module), as the process itself sees it.
python_maps() { /usr/bin/python3 -c 'import nbd; print(open("/proc/self/maps").read())' | grep -o '/[^ ]*libnbd\.so\.0[^ ]*' | sort -u; }
# The first line LIBNBD_DEBUG=1 makes nbdinfo print.
first_debug_line() { LIBNBD_DEBUG=1 "$@" 2>&1 >/dev/null | sed -n 1p; }

inside() {
  local dir=$1 uri=$2 version debian_sum
  debian_sum=$(sha256sum "$debian_lib")
  version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
  # Before: Debian's library everywhere.
  check "before install: nbdinfo resolves to $debian_lib, not $(resolves_to /usr/bin/nbdinfo)" \
    test "$(resolves_to /usr/bin/nbdinfo)" = "$debian_lib"

  # Refused: writing over the file libnbd0 owns.
  if $MAKE -s install libdir=/usr/lib/x86_64-linux-gnu > "$dir/refused.log" 2>&1; then
    bad "make install over Debian's libnbd.so.0 was not refused"
  else
    check "the refusal names the package: $(cat "$dir/refused.log")" grep -q "belongs to Debian's libnbd0" "$dir/refused.log"
  fi
  check "a refused install writes nothing" test "$(sha256sum "$debian_lib")" = "$debian_sum" -a ! -e /usr/share/nbd-rs

  # Switched over.
  $MAKE -s install PREFIX=/usr/local > "$dir/install.log" 2>&1 || { cat "$dir/install.log"; bad "make install"; return; }
  ldconfig
  local prog
  for prog in nbdinfo nbdcopy nbddump; do
    [ -x /usr/bin/$prog ] || continue
    check "installed: $prog resolves to /usr/local/lib/libnbd.so.0, not $(resolves_to /usr/bin/$prog)" \
      test "$(resolves_to /usr/bin/$prog)" = /usr/local/lib/libnbd.so.0
  done
  check "installed: python3-libnbd maps $(python_maps)" test "$(python_maps)" = /usr/local/lib/libnbd.so.0
  local line
  line=$(first_debug_line nbdinfo --size "$uri")
  check "installed: nbdinfo's first debug line names nbd-rs $version: $line" \
    grep -qF "opening handle (nbd-rs $version, libnbd 1.22.2 ABI)" <<<"$line"
  check "installed: nbdinfo --size" test "$(nbdinfo --size "$uri")" = 16777216
  head -c 4194304 /dev/urandom > "$dir/data"
  check "installed: nbdcopy to the server" nbdcopy "$dir/data" "$uri"
  check "installed: nbdcopy from the server" nbdcopy "$uri" "$dir/back"
  check "installed: the copy is the data" cmp -s <(head -c 4194304 "$dir/back") "$dir/data"
  check "installed: nbdsh reads the size" test "$(nbdsh -u "$uri" -c 'print(h.get_size())')" = 16777216
  check "installed: nbdsh sees nbd-rs" \
    grep -q /usr/local/lib/libnbd.so.0 <(nbdsh -c 'print(open("/proc/self/maps").read())')

  # A program built the way a developer would, against the installed copy.
  check "pkg-config: libnbd is version 1.22.2" test "$(pkg-config --modversion libnbd)" = 1.22.2
  check "pkg-config: nbd_rs_version is $version" test "$(pkg-config --variable=nbd_rs_version libnbd)" = "$version"
  local cflags
  cflags=$(pkg-config --cflags libnbd)
  check "pkg-config: the header is the installed one: $cflags" test "${cflags% }" = "-I/usr/local/include"
  cat > "$dir/probe.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <libnbd.h>
int
main (int argc, char *argv[])
{
#ifndef LIBNBD_HAVE_NBD_RS_GET_VERSION
  fprintf (stderr, "libnbd.h is not nbd-rs's\n");
  return 1;
#else
  struct nbd_handle *h = nbd_create ();
  if (argc != 2 || h == NULL || nbd_connect_uri (h, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return 1;
  }
  printf ("nbd-rs %s: %" PRIi64 "\n", nbd_rs_get_version (), nbd_get_size (h));
  nbd_close (h);
  return 0;
#endif
}
EOF
  sed -i '1i #include <inttypes.h>' "$dir/probe.c"
  # shellcheck disable=SC2046
  if cc -Wall -Werror -o "$dir/probe" "$dir/probe.c" $(pkg-config --cflags --libs libnbd); then
    ok
    check "pkg-config: the program resolves to /usr/local/lib/libnbd.so.0" \
      test "$(resolves_to "$dir/probe")" = /usr/local/lib/libnbd.so.0
    check "pkg-config: the program runs on nbd-rs" test "$("$dir/probe" "$uri")" = "nbd-rs $version: 16777216"
  else
    bad "a program built with pkg-config --cflags --libs libnbd"
  fi

  # Switched back.
  $MAKE -s uninstall PREFIX=/usr/local > "$dir/uninstall.log" 2>&1 || { cat "$dir/uninstall.log"; bad "make uninstall"; return; }
  ldconfig
  check "uninstalled: no file of ours is left under /usr/local: $(find /usr/local -name 'libnbd*' -o -name 'nbd-rs*' -o -name 'nbd_rs*')" \
    test -z "$(find /usr/local -name 'libnbd*' -o -name 'nbd-rs*' -o -name 'nbd_rs*')"
  for prog in nbdinfo nbdcopy; do
    check "uninstalled: $prog resolves to $debian_lib, not $(resolves_to /usr/bin/$prog)" \
      test "$(resolves_to /usr/bin/$prog)" = "$debian_lib"
  done
  check "uninstalled: python3-libnbd maps $(python_maps)" test "$(python_maps)" = "$(readlink -f "$debian_lib")"
  line=$(first_debug_line nbdinfo --size "$uri")
  check "uninstalled: Debian's first debug line: $line" test "$line" = "libnbd: debug: nbd1: nbd_create: opening handle"
  check "uninstalled: nbdinfo --size" test "$(nbdinfo --size "$uri")" = 16777216
  check "uninstalled: pkg-config finds Debian's libnbd $(pkg-config --modversion libnbd)" \
    test "$(pkg-config --modversion libnbd)" = 1.14.2
}

if [ "${1:-}" = --inside ]; then
  # In the private namespace (below): /etc (for ld.so.cache) and /usr/local
  # become overlays whose upper layers are in $2.
  dir=$2
  for over in etc usr/local; do
    mkdir -p "$dir/$over/upper" "$dir/$over/work"
    mount -t overlay overlay -o "lowerdir=/$over,upperdir=$dir/$over/upper,workdir=$dir/$over/work" "/$over" ||
      { echo "FAIL: cannot overlay /$over"; exit 1; }
  done
  inside "$dir" "$3"
  echo "install-check (namespace): $passed passed, $fail failed"
  exit $fail
fi

for p in nbdinfo nbdcopy nbdsh nbdkit pkg-config unshare ldconfig; do
  command -v $p >/dev/null || { echo "FAIL: $p missing: make deps" >&2; exit 1; }
done
[ -f "$debian_lib" ] || { echo "FAIL: Debian's $debian_lib is missing: make deps" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "FAIL: the switch-over test needs root (a mount namespace and ldconfig)" >&2; exit 1; }
dir=$(mktemp -d /tmp/nbd-install.XXXXXX)
cleanup() {
  [ -f "$dir/nbdkit.pid" ] && kill "$(cat "$dir/nbdkit.pid")" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

# 1. DESTDIR.
expected() { # the tree a DESTDIR install makes, one path per line
  local p=/usr/local
  printf '%s\n' /usr $p $p/lib $p/lib/libnbd.so.0 $p/lib/libnbd.so $p/lib/pkgconfig \
    $p/lib/pkgconfig/libnbd.pc $p/include $p/include/libnbd.h $p/share $p/share/man $p/share/man/man3 \
    $p/share/nbd-rs $p/share/nbd-rs/install-manifest | sed 's|^/||'
  for page in man/*.3; do echo "usr/local/share/man/man3/${page##*/}"; done
  [ "${1:-}" = static ] && echo usr/local/lib/libnbd.a
}
tree() { (cd "$1" && find . -mindepth 1 | sed 's|^\./||' | sort); }
d=$dir/destdir
$MAKE -s install DESTDIR="$d" > "$dir/destdir.log" 2>&1 || { cat "$dir/destdir.log"; bad "make install DESTDIR"; }
check "make install DESTDIR: the expected files" diff -u <(expected | sort) <(tree "$d")
so=$d/usr/local/lib/libnbd.so.0
check "libnbd.so.0's SONAME" grep -q 'Library soname: \[libnbd.so.0\]' <(readelf -d "$so")
check "libnbd.so.0 is stripped: no symbol table, no debug sections" \
  test -z "$(readelf -S -W "$so" | grep -E ' \.(symtab|debug_[a-z]+) ')"
check "libnbd.so.0 links to nbd-rs's debug file" grep -q libnbd.so.0.debug <(readelf -p .gnu_debuglink "$so" 2>/dev/null)
check "libnbd.so is a link to libnbd.so.0" test "$(readlink "$d/usr/local/lib/libnbd.so")" = libnbd.so.0
check "the header is include/libnbd.h" cmp -s include/libnbd.h "$d/usr/local/include/libnbd.h"
check "libnbd.pc's libdir" grep -qx 'libdir=/usr/local/lib' "$d/usr/local/lib/pkgconfig/libnbd.pc"
for page in "$d"/usr/local/share/man/man3/*.3; do
  check "${page##*/} renders" test -n "$(MANWIDTH=80 man -l "$page" 2>/dev/null | head -n3)"
done
echo "installed libnbd.so.0: $(stat -c %s "$so") bytes (Debian's libnbd0: $(stat -L -c %s $debian_lib) bytes)"
$MAKE -s uninstall DESTDIR="$d" > "$dir/destdir.log" 2>&1 || { cat "$dir/destdir.log"; bad "make uninstall DESTDIR"; }
check "make uninstall DESTDIR leaves the tree empty: $(tree "$d" | head -n3)" test -z "$(tree "$d")"
$MAKE -s install-static DESTDIR="$d" > "$dir/destdir.log" 2>&1 || { cat "$dir/destdir.log"; bad "make install-static DESTDIR"; }
check "make install-static DESTDIR: the expected files and libnbd.a" diff -u <(expected static | sort) <(tree "$d")
$MAKE -s uninstall DESTDIR="$d" > "$dir/destdir.log" 2>&1 || { cat "$dir/destdir.log"; bad "make uninstall DESTDIR (static)"; }
check "make uninstall after install-static leaves the tree empty" test -z "$(tree "$d")"
mkdir -p "$d/usr/local/lib"
touch "$d/usr/local/lib/someone-elses"
$MAKE -s install DESTDIR="$d" >/dev/null 2>&1 && $MAKE -s uninstall DESTDIR="$d" >/dev/null 2>&1
check "make uninstall keeps a directory that was there before, and what is in it" \
  test "$(tree "$d")" = "$(printf 'usr\nusr/local\nusr/local/lib\nusr/local/lib/someone-elses')"

# 2. The system, switched over and back, in a namespace of its own.
cache_before=$(sha256sum /etc/ld.so.cache)
local_before=$(find /usr/local -name 'libnbd*' | sort)
nbdkit -f -U "$dir/nbd.sock" -P "$dir/nbdkit.pid" memory 16M &
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///?socket=$dir/nbd.sock"
unshare --mount --propagation private "$0" --inside "$dir/ns" "$uri"
rc=$?
[ $rc = 0 ] && ok || bad "the switch-over and back, in a namespace (exit $rc)"
check "the machine's /etc/ld.so.cache is untouched" test "$(sha256sum /etc/ld.so.cache)" = "$cache_before"
check "the machine's /usr/local is untouched" test "$(find /usr/local -name 'libnbd*' | sort)" = "$local_before"

# 3. One program at a time.
check "LD_LIBRARY_PATH: nbdinfo resolves to ours" \
  test "$(LD_LIBRARY_PATH=$PWD/target/lib resolves_to /usr/bin/nbdinfo)" = "$PWD/target/lib/libnbd.so.0"
line=$(LD_LIBRARY_PATH=$PWD/target/lib first_debug_line nbdinfo --size "$uri")
check "LD_LIBRARY_PATH: nbdinfo's first debug line names nbd-rs: $line" grep -q '(nbd-rs ' <<<"$line"
check "LD_LIBRARY_PATH: nbdinfo --size" test "$(LD_LIBRARY_PATH=$PWD/target/lib nbdinfo --size "$uri")" = 16777216
check "without it: nbdinfo resolves to Debian's" test "$(resolves_to /usr/bin/nbdinfo)" = "$debian_lib"

echo "install-check: $passed passed, $fail failed"
exit $fail
