#!/usr/bin/env bash
# include/libnbd.h offers everything libnbd 1.22.2's libnbd.h does: one C
# file includes ours, then repeats every function declaration of the
# reference header (a C compiler refuses a redeclaration whose type
# differs), checks every macro it defines is defined, and that every
# numeric one has the reference's value. The reference is the header of
# the libnbd 1.22.2 built by `make reference`.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=target/libnbd-1.22.2/include/libnbd.h
[ -f "$ref" ] || { echo "FAIL: $ref is missing: run make reference (or link target/libnbd-1.22.2 to a built one)"; exit 1; }
out=target/header-check
mkdir -p "$out"
{
  echo '#include <libnbd.h>'
  echo '/* Every declaration of the reference header, verbatim. */'
  awk '/^extern [^"]/{p=1} p{print} p && /;/{p=0}' "$ref"
  echo '/* Every macro of the reference header, with its value where numeric. */'
  grep -E '^#define (LIBNBD|NBD)_[A-Z0-9_]+' "$ref" | grep -v -E '^#define LIBNBD_(H|GCC_VERSION)\b' |
    while read -r _ name value; do
      name=${name%%(*}
      printf '#ifndef %s\n#error "%s is not defined"\n#endif\n' "$name" "$name"
      if [[ "$value" =~ ^(0x[0-9a-fA-F]+U?|[0-9]+U?)$ ]]; then
        printf '_Static_assert ((%s) == (%s), "%s has the wrong value");\n' "$name" "$value" "$name"
      elif [[ "$value" =~ ^\".*\"$ ]]; then
        printf '_Static_assert (sizeof (%s) == sizeof (%s), "%s has the wrong value");\n' "$name" "$value" "$name"
      fi
    done
  echo '/* Every type of the reference header. */'
  grep -oE '^} nbd_[a-z0-9_]+;' "$ref" | tr -d '};' | while read -r t; do echo "typedef $t check_$t;"; done
  echo 'int main (void) { return 0; }'
} > "$out/uses-1.22.c"
${CC:-cc} -std=c11 -Wall -Wextra -Werror -Iinclude -c "$out/uses-1.22.c" -o "$out/uses-1.22.o"
nf=$(grep -c '^extern [^"]' "$ref"); nm=$(grep -c '^#ifndef' "$out/uses-1.22.c")
echo "header: all $nf declarations and $nm macros of libnbd 1.22.2's libnbd.h match include/libnbd.h"
