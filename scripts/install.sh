#!/usr/bin/env bash
# `make install` and `make uninstall`: puts the built library, its header,
# pkg-config file and man pages under PREFIX (inside DESTDIR if set), and
# records every file and every directory it created in a manifest, so that
# uninstall removes exactly those and nothing else.
#
#   scripts/install.sh install|uninstall
#
# Environment (the Makefile passes them): DESTDIR, PREFIX, libdir,
# includedir, mandir, datadir (where things go), BUILD_DIR (where `make lib`
# put them) and STATIC (1 to install libnbd.a too).
set -euo pipefail
shopt -s nullglob
: "${PREFIX:?}" "${libdir:?}" "${includedir:?}" "${mandir:?}" "${datadir:?}"
DESTDIR=${DESTDIR:-}
manifest=$datadir/nbd-rs/install-manifest

die() { echo "${0##*/}: $*" >&2; exit 1; }

# A file a Debian package owns is dpkg's; writing over it would break the
# package behind dpkg's back (and be undone by its next upgrade).
refuse_if_packaged() {
  [ -z "$DESTDIR" ] && command -v dpkg-query >/dev/null || return 0
  local owner
  if owner=$(dpkg-query -S "$1" 2>/dev/null); then
    die "refusing to overwrite $1, which belongs to Debian's ${owner%%:*}; install under PREFIX=/usr/local instead (the default), which the dynamic linker searches first"
  fi
}

install_all() {
  : "${BUILD_DIR:?}"
  local built
  for built in libnbd.so.0 libnbd.pc.in; do
    [ -f "$BUILD_DIR/$built" ] || die "$BUILD_DIR/$built is missing: run make lib"
  done
  local files=(
    "$libdir/libnbd.so.0"
    "$libdir/libnbd.so"
    "$libdir/pkgconfig/libnbd.pc"
    "$includedir/libnbd.h"
  )
  local page
  for page in man/*.3; do files+=("$mandir/man3/${page##*/}"); done
  [ "${STATIC:-0}" = 1 ] && files+=("$libdir/libnbd.a")
  local f
  for f in "${files[@]}"; do refuse_if_packaged "$f"; done

  # Directories first, noting each one this install creates (DESTDIR
  # itself is the caller's).
  [ -z "$DESTDIR" ] || mkdir -p "$DESTDIR"
  local record=() d
  for d in "$libdir/pkgconfig" "$includedir" "$mandir/man3" "$datadir/nbd-rs"; do
    local missing=() p=$d
    while [ "$p" != / ] && [ ! -d "$DESTDIR$p" ]; do missing=("$p" "${missing[@]}"); p=$(dirname "$p"); done
    for p in "${missing[@]}"; do
      install -d -m 755 "$DESTDIR$p"
      record+=("d $p")
    done
  done

  install -m 755 "$BUILD_DIR/libnbd.so.0" "$DESTDIR$libdir/libnbd.so.0"
  ln -sfn libnbd.so.0 "$DESTDIR$libdir/libnbd.so"
  sed "s|@PREFIX@|$PREFIX|; s|@LIBDIR@|$libdir|; s|@INCLUDEDIR@|$includedir|" "$BUILD_DIR/libnbd.pc.in" \
    > "$DESTDIR$libdir/pkgconfig/libnbd.pc"
  chmod 644 "$DESTDIR$libdir/pkgconfig/libnbd.pc"
  install -m 644 include/libnbd.h "$DESTDIR$includedir/libnbd.h"
  for page in man/*.3; do install -m 644 "$page" "$DESTDIR$mandir/man3/"; done
  [ "${STATIC:-0}" = 1 ] && install -m 644 "$BUILD_DIR/libnbd.a" "$DESTDIR$libdir/libnbd.a"

  # Keep what an earlier install (to the same place) recorded as created.
  if [ -f "$DESTDIR$manifest" ]; then
    mapfile -t -O "${#record[@]}" record < <(grep '^d ' "$DESTDIR$manifest")
  fi
  for f in "${files[@]}"; do record+=("f $f"); done
  record+=("f $manifest")
  printf '%s\n' "${record[@]}" | awk '!seen[$0]++' > "$DESTDIR$manifest"
  echo "installed ${#files[@]} files under $DESTDIR$PREFIX (manifest: $DESTDIR$manifest)"
  [ -n "$DESTDIR" ] || echo "run ldconfig so that programs load this libnbd.so.0; make uninstall undoes this install"
}

uninstall_all() {
  [ -f "$DESTDIR$manifest" ] || die "nothing to uninstall: $DESTDIR$manifest is missing (was it installed with another PREFIX?)"
  local kind path dirs=()
  while read -r kind path; do
    case $kind in
      f) rm -f "$DESTDIR$path" ;;
      d) dirs=("$path" "${dirs[@]}") ;;
      *) die "$manifest: bad line: $kind $path" ;;
    esac
  done < "$DESTDIR$manifest"
  # Deepest first; a directory something else has since put files in stays.
  for path in "${dirs[@]}"; do rmdir "$DESTDIR$path" 2>/dev/null || true; done
  echo "uninstalled from $DESTDIR$PREFIX"
  [ -n "$DESTDIR" ] || echo "run ldconfig so that programs go back to the system's libnbd.so.0"
}

case ${1:-} in
  install) install_all ;;
  uninstall) uninstall_all ;;
  *) die "usage: $0 install|uninstall" ;;
esac
