# Build, test and demo entry points. `make check` is what CI runs.

CARGO ?= cargo
FUZZ_TIME ?= 60
FUZZ_SMOKE_TIME ?= 10
# Programs the tests need, and the Debian packages that provide them.
PEERS := valgrind:valgrind strace:strace openssl:openssl pkg-config:pkg-config /usr/include/openssl/ssl.h:libssl-dev certtool:gnutls-bin nbdkit:nbdkit nbd-server:nbd-server qemu-nbd:qemu-utils nbdinfo:libnbd-bin fio:fio psktool:gnutls-bin \
  /usr/include/libnbd.h:libnbd-dev /usr/lib/python3/dist-packages/nbd.py:python3-libnbd \
  /usr/include/glib-2.0/glib.h:libglib2.0-dev /usr/include/ev.h:libev-dev \
  mandoc:mandoc groff:groff-base man:man-db

.PHONY: all build build-deps lib header check-header deps demo-deps demo reference check check-c check-debian check-reconnect check-libnbd-suite check-abi check-valgrind check-install check-doc check-examples-rust bench test lint fuzz-build fuzz-smoke fuzz fuzz-seeds fuzz-seeds-real install install-static uninstall clean

CC ?= cc

# Where `make lib` puts the library it builds.
BUILD_DIR := target/lib

# Where `make install` puts it, inside DESTDIR if set. /usr/local/lib comes
# before Debian's multiarch directory in the dynamic linker's search, so
# after `ldconfig` programs load this library instead of libnbd0's.
PREFIX ?= /usr/local
libdir ?= $(PREFIX)/lib
includedir ?= $(PREFIX)/include
datadir ?= $(PREFIX)/share
mandir ?= $(datadir)/man
INSTALL_VARS = DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' libdir='$(libdir)' includedir='$(includedir)' \
  datadir='$(datadir)' mandir='$(mandir)' BUILD_DIR='$(BUILD_DIR)'

all: lib

# Building needs a Rust toolchain (rustc 1.85 or newer), a C compiler,
# pkg-config and OpenSSL's headers; never root, never apt-get.
build: build-deps
	$(CARGO) build --workspace --release

build-deps:
	@for p in pkg-config:pkg-config /usr/include/openssl/ssl.h:libssl-dev $(CC):gcc objcopy:binutils; do \
	  { command -v $${p%%:*} || test -e $${p%%:*}; } >/dev/null 2>&1 || missing="$$missing $${p#*:}"; \
	done; \
	if [ -n "$$missing" ]; then echo "building needs:$$missing (apt-get install$$missing)"; exit 1; fi

# libnbd.so.0: the Rust staticlib (built with LTO, one codegen unit) linked
# by the C compiler with a version script made from the export table (a
# cdylib cannot carry version nodes), then stripped, its debug information
# kept beside it in libnbd.so.0.debug (found by gdb and valgrind through
# the debug link). libnbd.pc.in is libnbd.pc with the paths still to fill.
lib: build
	mkdir -p $(BUILD_DIR)
	target/release/nbd-capi-gen version-script > $(BUILD_DIR)/libnbd.sym
	$(CC) -shared -o $(BUILD_DIR)/libnbd.so.0 -Wl,-soname,libnbd.so.0 \
	  -Wl,--version-script=$(BUILD_DIR)/libnbd.sym -Wl,--gc-sections -Wl,-O1 -Wl,-z,relro -Wl,-z,now \
	  -Wl,--whole-archive target/release/libnbd.a -Wl,--no-whole-archive -lssl -lcrypto -lpthread -ldl -lm
	objcopy --only-keep-debug --compress-debug-sections $(BUILD_DIR)/libnbd.so.0 $(BUILD_DIR)/libnbd.so.0.debug
	cd $(BUILD_DIR) && objcopy --strip-all --add-gnu-debuglink=libnbd.so.0.debug libnbd.so.0
	ln -sf libnbd.so.0 $(BUILD_DIR)/libnbd.so
	cp target/release/libnbd.a $(BUILD_DIR)/libnbd.a
	target/release/nbd-capi-gen pkg-config < nbd-capi/libnbd.pc.in > $(BUILD_DIR)/libnbd.pc.in
	@echo "$(BUILD_DIR)/libnbd.so.0: $$(stat -c %s $(BUILD_DIR)/libnbd.so.0) bytes"

# The shared library, header, pkg-config file and man pages; scripts/install.sh
# keeps a manifest so that `make uninstall` removes exactly what it put there.
install: lib
	$(INSTALL_VARS) scripts/install.sh install

# The same, and libnbd.a.
install-static: lib
	$(INSTALL_VARS) STATIC=1 scripts/install.sh install

uninstall:
	$(INSTALL_VARS) scripts/install.sh uninstall

CBINDGEN_VERSION := 0.27.0

# include/libnbd.h: cbindgen's output from nbd-capi, finished with the
# macros that come from the export table.
header: build
	@cbindgen --version | grep -qx 'cbindgen $(CBINDGEN_VERSION)' || \
	  { echo "need cbindgen $(CBINDGEN_VERSION): cargo install cbindgen --version $(CBINDGEN_VERSION) --locked"; exit 1; }
	cbindgen --quiet --config nbd-capi/cbindgen.toml --crate nbd-capi --output target/libnbd.cbindgen.h nbd-capi
	target/release/nbd-capi-gen finish-header < target/libnbd.cbindgen.h > target/libnbd.h
	cp target/libnbd.h include/libnbd.h

# The committed header must be what the sources generate, must compile
# alone as C99 (pedantic) and as C++, must have one LIBNBD_HAVE_NBD_* macro
# per exported function and per callback struct, and must offer every
# declaration and macro of libnbd 1.22.2's header (tests/header-check.sh).
check-header: build reference
	@cbindgen --version | grep -qx 'cbindgen $(CBINDGEN_VERSION)' || \
	  { echo "need cbindgen $(CBINDGEN_VERSION): cargo install cbindgen --version $(CBINDGEN_VERSION) --locked"; exit 1; }
	cbindgen --quiet --config nbd-capi/cbindgen.toml --crate nbd-capi --output target/libnbd.cbindgen.h nbd-capi
	target/release/nbd-capi-gen finish-header < target/libnbd.cbindgen.h > target/libnbd.h
	diff -u include/libnbd.h target/libnbd.h || { echo "include/libnbd.h is stale: make header"; exit 1; }
	printf '#include <libnbd.h>\nint main (void) { return 0; }\n' > target/header-test.c
	$(CC) -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -c target/header-test.c -o target/header-test.o
	cp target/header-test.c target/header-test.cpp
	c++ -std=c++11 -Wall -Wextra -Werror -Iinclude -c target/header-test.cpp -o target/header-test-cpp.o
	@functions=$$(grep -c 'row("' nbd-capi/src/table.rs); \
	callbacks=$$(grep -c '^} nbd_[a-z0-9_]*_callback;' include/libnbd.h); \
	macros=$$(grep -c '^#define LIBNBD_HAVE_NBD_' include/libnbd.h); \
	test "$$macros" = "$$((functions + callbacks))" || \
	  { echo "$$macros LIBNBD_HAVE_NBD_* macros for $$functions functions and $$callbacks callback structs"; exit 1; }
	tests/header-check.sh

# The exported symbols, version nodes and SONAME are libnbd 1.22.2's.
check-abi: deps lib reference
	tests/abi-check.sh

# C programs on our library and on Debian's, same binary, same output.
check-c: deps lib reference
	tests/c-compare.sh

# The C examples and tests on our library under valgrind: no invalid
# access, no leak; and stress-test's threads under helgrind: no race.
check-valgrind: deps lib
	tests/valgrind.sh

# Debian's nbdinfo, nbdcopy, nbdsh, python3-libnbd, fio and nbdkit's nbd
# plugin, unchanged, on our libnbd.so.0.
check-debian: deps lib reference
	tests/debian-programs.sh

# Debian's fio and nbdcopy surviving server restarts (reconnect-delay=30).
check-reconnect: deps lib
	tests/reconnect-programs.sh

# make install, uninstall and the switch of the system's programs to ours
# and back (in a private mount namespace, so nothing leaks), as root.
check-install: deps lib
	tests/install-check.sh

# libnbd 1.22.2's own tests (tests/, info/, copy/, dump/) on libnbd and on
# ours, same binaries: every test passing on libnbd must pass on ours, but
# for the deliberate differences in tests/libnbd-suite.known. About 3
# minutes on 2 cores; LIBNBD_SUITE_REF=reuse runs only ours.
check-libnbd-suite: deps lib reference
	tests/libnbd-suite.sh

# The man pages in man/: lint clean (groff, mandoc, man), one page per
# nbd_rs_* export, and the overview names every extension function and
# every environment variable the sources use (tests/man-check.sh).
.PHONY: check-man
check-man: deps
	tests/man-check.sh

# Ours against Debian's libnbd 1.14.2 and libnbd 1.22.2 (make reference),
# same programs, rotated rounds; the table
# goes to target/bench.md. BENCH_ARGS="--rounds 7 --seconds 5", "--quick".
BENCH_ARGS ?=
bench: deps lib reference
	$(CARGO) build --release -p nbd-server
	mkdir -p target/bench
	$(CC) -std=gnu99 -O2 -Wall -Werror -Iinclude -o target/bench/aio-bench bench/aio-bench.c -l:libnbd.so.0
	$(CC) -std=gnu99 -O2 -Wall -Werror -pthread -Iinclude -o target/bench/threads-bench bench/threads-bench.c -l:libnbd.so.0
	$(CC) -std=gnu99 -O2 -Wall -Werror -pthread -Iinclude -o target/bench/concurrent-writer examples-c/concurrent-writer.c -Ltarget/lib -l:libnbd.so.0
	/usr/bin/python3 bench/bench.py --markdown target/bench.md $(BENCH_ARGS)

# libnbd 1.22.2 built from Debian trixie's source package in
# target/libnbd-1.22.2: the reference for behaviour, tools and tests.
reference:
	tests/reference-libnbd.sh

# Installs the test peers that are missing (Debian; needs root).
install_missing = missing=""; for p in $(1); do \
	  { command -v $${p%%:*} || test -e $${p%%:*}; } >/dev/null 2>&1 || missing="$$missing $${p\#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
deps:
	@$(call install_missing,$(PEERS))

# What the demo needs: the build's headers and Debian's nbdinfo; no
# server, since it runs nbd-rs's own.
DEMO_PEERS := pkg-config:pkg-config /usr/include/openssl/ssl.h:libssl-dev nbdinfo:libnbd-bin
demo-deps:
	@$(call install_missing,$(DEMO_PEERS))

# The main job in miniature, on nbd-rs's own server (scripts/demo.sh).
demo: demo-deps lib
	$(CARGO) build --release -p nbd-io --example demo -p nbd-server
	scripts/demo.sh

# Every public item of nbd-proto documented, no broken intra-doc link, no
# other rustdoc warning (cargo test runs the doctests).
check-doc:
	RUSTDOCFLAGS="-D warnings -W missing_docs" $(CARGO) doc -p nbd-proto --no-deps

# nbd-proto driven from a mio event loop, 64 READs and WRITEs in flight,
# every byte read verified, against an nbdkit this command starts.
check-examples-rust: deps
	$(CARGO) build --release -p nbd-proto --example mio_loop
	nbdkit -U - memory 64M --run 'target/release/examples/mio_loop "$$unixsocket"'

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps
	$(CARGO) test --workspace

check: lint test check-doc check-man check-examples-rust check-header check-abi check-c check-valgrind check-debian check-reconnect check-install check-libnbd-suite fuzz-smoke
	@if grep -rnE 'std::net|std::os::|std::thread|Instant::now|SystemTime::now|libc::|mio::' nbd-proto/src; then \
	  echo "nbd-proto must stay sans-IO"; exit 1; fi
	@! awk '/^\[/ { deps = ($$0 ~ /dependencies\]$$/ && $$0 !~ /dev-dependencies/) } deps' nbd-proto/Cargo.toml | \
	  grep -E '^(libc|mio|tokio|socket2|nix)' || { echo "nbd-proto has an I/O dependency"; exit 1; }
	@grep -qx '#!\[forbid(unsafe_code)\]' nbd-io/src/lib.rs || { echo "nbd-io must have no unsafe code"; exit 1; }
	@echo "make check: all passed"

# Seeds for the fuzzer: sessions recorded from the scripted servers, one
# directory per target. The committed seeds in nbd-proto/fuzz/seeds-real (none
# yet for the server role, which no real client has recorded)
# were recorded from real servers by `make fuzz-seeds-real`.
FUZZ_TARGETS := client handshake transmission server reconnect
fuzz-seeds:
	FUZZ_CORPUS_DIR=$(CURDIR)/nbd-proto/fuzz/seeds $(CARGO) test -q -p nbd-proto --test fuzz_corpus write_seed_corpus_when_asked

fuzz-seeds-real:
	FUZZ_REAL_SEEDS=1 $(CARGO) test -q -p nbd-proto --test fuzz_seeds record_real_sessions_when_asked

fuzz-build:
	cd nbd-proto && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -O
	cd nbd-capi && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -O

# libFuzzer needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP
# lets it run on the stable toolchain. Every target runs FUZZ_TIME seconds.
fuzz-smoke: fuzz-seeds
	@command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz"; exit 1; }
	$(MAKE) fuzz FUZZ_TIME=$(FUZZ_SMOKE_TIME)

fuzz: fuzz-seeds fuzz-build
	set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p nbd-proto/fuzz/corpus/$$t; \
	  mkdir -p nbd-proto/fuzz/regressions/$$t; \
	  real=fuzz/seeds-real/$$t; [ -d nbd-proto/$$real ] || real=; \
	  (cd nbd-proto && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t fuzz/corpus/$$t fuzz/seeds/$$t $$real fuzz/regressions/$$t -- \
	    -max_total_time=$(FUZZ_TIME) -max_len=200000 -print_final_stats=1); \
	done
	mkdir -p nbd-capi/fuzz/corpus/uri
	cd nbd-capi && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O uri fuzz/corpus/uri fuzz/seeds/uri -- \
	  -max_total_time=$(FUZZ_TIME) -max_len=4096 -print_final_stats=1

clean:
	$(CARGO) clean
	rm -rf nbd-proto/fuzz/target nbd-proto/fuzz/corpus nbd-proto/fuzz/seeds nbd-proto/fuzz/artifacts
	rm -rf nbd-capi/fuzz/target nbd-capi/fuzz/corpus nbd-capi/fuzz/artifacts
