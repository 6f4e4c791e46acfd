#!/usr/bin/env bash
# The compiler flags an example in examples-c needs besides libnbd's: the
# event loops of glib-loop and libev-loop (libev has no pkg-config file).
# Nothing for the others; a missing event loop is a failure.
set -euo pipefail
need() { [ -e "$1" ] || { echo "$1 is missing (Debian's $2): make deps" >&2; exit 1; }; }
case $1 in
  glib-loop) need /usr/include/glib-2.0/glib.h libglib2.0-dev; pkg-config --cflags --libs glib-2.0 ;;
  libev-loop) need /usr/include/ev.h libev-dev; echo -lev ;;
esac
