#!/usr/bin/env bash
# Builds the reference: libnbd 1.22.2 from Debian trixie's source package,
# in target/libnbd-1.22.2/ (source and build tree; its library is
# lib/.libs/libnbd.so.0, its tools info/nbdinfo, copy/nbdcopy, dump/nbddump).
#
# The source comes through `apt-get source` with a private sources list
# (a deb-src line for trixie on the mirror this machine's apt already uses),
# private lists and cache under target/: nothing under /etc/apt is written.
# A finished build is kept; REBUILD=1 starts again.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.22.2
DEBVER=$VERSION-1
top=$PWD/target/libnbd-ref
tree=$PWD/target/libnbd-$VERSION

if [ -z "${REBUILD:-}" ] && [ -e "$tree/lib/.libs/libnbd.so.0" ] && [ -e "$tree/.built" ]; then
  echo "reference libnbd $VERSION: $tree (built)"
  exit 0
fi

# Build dependencies (Debian packages; the build itself needs no root).
need=""
for p in gcc make pkg-config libgnutls28-dev libxml2-dev dpkg-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need="$need $p"
done
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

# The mirror this machine's apt uses for Debian itself.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $NF == "main" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "reference-libnbd: no Debian mirror found in this machine's apt sources" >&2; exit 1; }

rm -rf "$top" "$tree"
mkdir -p "$top/lists/partial" "$top/cache/archives/partial" "$top/src"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$top/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$top/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$top/lists" -o "Dir::Cache=$top/cache")
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$top/src" && apt-get "${apt_opts[@]}" source "libnbd=$DEBVER" >source.log 2>&1) ||
  { tail -n 20 "$top/src/source.log" >&2; exit 1; }
mv "$top/src/libnbd-$VERSION" "$tree"

cd "$tree"
./configure -q --disable-ocaml --disable-golang --disable-rust --disable-fuse --disable-ublk >configure.log 2>&1 ||
  { tail -n 30 configure.log >&2; exit 1; }
make -j"$(nproc)" >make.log 2>&1 || { tail -n 30 make.log >&2; exit 1; }
touch .built
echo "reference libnbd $VERSION: $tree"
