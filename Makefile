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
# Its start-up functions are laid out side by side (LLD's --symbol-ordering-file,
# guest-rootfs/agent-startup.order, written by `make agent-order`): the guest maps
# /init 64 KiB at a time, so scattered hot code mapped 2.6 MB of it (docs/design.md).
# The copy under target/ is named by the list's hash, so that cargo relinks when it
# changes; make takes the hash when it starts, so run `make agent-order` on its own
# and build after it.
AGENT_ORDER := guest-rootfs/agent-startup.order
AGENT_ORDER_COPY := target/agent-startup-$(shell sha256sum $(AGENT_ORDER) | cut -c1-16).order
GUEST_AGENT_RUSTFLAGS := -C relocation-model=static \
	-C link-arg=-Wl,--symbol-ordering-file=$(abspath $(AGENT_ORDER_COPY)) -C link-arg=-Wl,--no-warn-symbol-ordering
ARTIFACTS := $(BUILD)/vmlinux $(BUILD)/bzImage $(BUILD)/initramfs.cpio $(BUILD)/initramfs-test.cpio \
             $(BUILD)/busybox-test.oci.tar $(BUILD)/pause-test.oci.tar

.PHONY: all deps rust kernel rootfs images test unit-test e2e demo bench install clean check-static check-order agent-order

all: rust kernel rootfs images

deps:
	@tests/install-deps.sh

# Cargo decides what is stale; always ask it. The binaries land under the explicit
# triple (.cargo/config.toml); target/release/ gets hard links to them, where cargo
# users look first.
rust:
	$(CARGO) build --release --workspace
	@mkdir -p target && rm -f target/agent-startup-*.order && cp $(AGENT_ORDER) $(AGENT_ORDER_COPY)
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

# Rewrites guest-rootfs/agent-startup.order from valgrind traces of the agent's
# start-up and first RPCs plus guest-rootfs/agent-guest-seen.txt (needs valgrind);
# rerun after changes to what the agent does at start-up, then `make rust rootfs`
# and compare the agent rss in `make bench`.
agent-order: rust
	python3 guest-rootfs/agent-order.py --agent $(GUEST_AGENT) -o $(AGENT_ORDER)

check-static: rust
	@out=$$(file -L $(GUEST_AGENT)); echo "$$out"; grep -Eq 'statically linked|static-pie linked' <<<"$$out"

# The guest agent was linked with guest-rootfs/agent-startup.order (and how much of
# the list still matches it).
check-order: rust
	python3 guest-rootfs/agent-order.py --check --agent $(GUEST_AGENT) -o $(AGENT_ORDER)

test: deps all check-static check-order unit-test e2e

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
