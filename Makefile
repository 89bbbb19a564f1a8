# vmrt — top-level build. `make` builds everything, `make test` runs every test,
# `make demo` runs a container in a microVM through containerd.

SHELL := /bin/bash
CARGO ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
BIN := target/$(TRIPLE)/release
BUILD := build
PREFIX ?= /usr/local
DESTDIR ?=

RUST_BINS := $(BIN)/vmrt-vmm $(BIN)/vmrt-agent $(BIN)/containerd-shim-vmrt-v2 $(BIN)/vmrt
# The agent that becomes the guest's /init: built for size (Cargo.toml, profile.guest).
GUEST_AGENT := target/$(TRIPLE)/guest/vmrt-agent
# ... and linked as a static non-PIE executable: a static-pie /init relocates
# itself at every boot (~17,000 relative relocations, whose table is 400 KB of
# the file) and dirties every page it patches (docs/design.md).
GUEST_AGENT_RUSTFLAGS := -C relocation-model=static
ARTIFACTS := $(BUILD)/vmlinux $(BUILD)/bzImage $(BUILD)/initramfs.cpio $(BUILD)/initramfs-test.cpio \
             $(BUILD)/busybox-test.oci.tar $(BUILD)/pause-test.oci.tar

.PHONY: all deps rust kernel rootfs images test unit-test e2e demo bench install clean check-static

all: rust kernel rootfs images

deps:
	@tests/install-deps.sh

# Cargo decides what is stale; always ask it. The binaries land under the explicit
# triple (.cargo/config.toml); target/release/ gets hard links to them, where cargo
# users look first.
rust:
	$(CARGO) build --release --workspace
	$(CARGO) rustc --profile guest -p vmrt-agent --bin vmrt-agent -- $(GUEST_AGENT_RUSTFLAGS)
	@mkdir -p target/release
	@for b in $(RUST_BINS); do ln -f $$b target/release/; done

kernel:
	guest-kernel/build.sh

rootfs: rust
	guest-rootfs/build.sh

images:
	tests/image/build-test-initramfs.sh
	python3 tests/image/build-oci.py busybox
	python3 tests/image/build-oci.py pause

check-static: rust
	@out=$$(file -L $(GUEST_AGENT)); echo "$$out"; grep -Eq 'statically linked|static-pie linked' <<<"$$out"

test: deps all check-static unit-test e2e

# The container tests that need cgroup v2 controllers SKIP on hosts without
# them; --prepare records their binary for the agent-cgroups guest suite.
unit-test:
	$(CARGO) test --release --workspace
	@tests/e2e/agent-cgroups.sh --prepare

e2e:
	tests/e2e/run-all.sh

demo: deps all
	tests/demo.sh

bench: deps all
	tests/bench/run.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/vmrt $(DESTDIR)/etc/vmrt
	install -m 0755 $(RUST_BINS) $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(BUILD)/vmlinux $(BUILD)/vmlinux.config $(BUILD)/initramfs.cpio $(DESTDIR)$(PREFIX)/share/vmrt/
	sed 's|@PREFIX@|$(PREFIX)|g' packaging/config.toml.in > $(DESTDIR)/etc/vmrt/config.toml.sample
	test -e $(DESTDIR)/etc/vmrt/config.toml || cp $(DESTDIR)/etc/vmrt/config.toml.sample $(DESTDIR)/etc/vmrt/config.toml

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
