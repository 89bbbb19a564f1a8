#!/usr/bin/env python3
"""Writes the guest agent's symbol ordering file (`make agent-order`).

The guest's /init is the static vmrt-agent. Its code and read-only data are
file pages of the initramfs, and Linux maps them into the agent 64 KiB at a
time (fault-around): with the ~900 functions that start-up and the first RPCs
run scattered over 4.3 MB of text, the agent maps about 2.6 MB of code to use
under 0.5 MB. Listing those functions (and the read-only data they load) first,
in the order they first run, lets the linker (LLD, `--symbol-ordering-file`)
put them side by side, so the pages the agent maps are the pages it uses.

How: run the agent under valgrind's lackey tool, which reports every
instruction fetch and data load, twice, and map the addresses to the unstripped
binary's symbols (`nm`) in first-touch order:
  1. as PID 1, as in the guest, in new user, pid, mount, UTS, IPC, network and
     cgroup namespaces with a tmpfs /dev whose "console" is a file of this
     run: its mounts, console, cgroup and listener set-up run as in the guest;
     its mounts stay in its namespace and devtmpfs is refused there. Two steps
     do touch the host: the vsock listeners bind the host's vsock ports
     (vsock has no namespaces; the phase fails when another program holds
     them), and the cgroup step writes the caller's own cgroup's
     cgroup.subtree_control (refused unless that cgroup is a root one, where
     it enables the controllers the agent asks for). Stopped once its vsock
     listener is polled;
  2. as a plain process (`--listen unix://...`) answering Health, Version
     and Health, as the shim and the bench call them.
Then the functions of guest-rootfs/agent-guest-seen.txt (`--guest-seen`), which
the guest was measured running and no host run reaches (that file says how).
glibc picks a variant of memcpy, strlen and the like for the CPU at run time,
and the guest's CPU is not this one: every variant of every string function is
listed, after what the runs touched. Code the runs never reach (the log port, virtio-fs shares,
containers) is laid out after the list, as before, so a stale or partial list
costs pages, never correctness.

Usage: guest-rootfs/agent-order.py [--agent PATH] [-o OUTPUT]
       guest-rootfs/agent-order.py --check [--agent PATH] [-o LIST]
  --agent  the guest build of vmrt-agent, unstripped
           (default target/x86_64-unknown-linux-gnu/guest/vmrt-agent)
  -o       the list (default guest-rootfs/agent-startup.order)
  --guest-seen  functions measured in the guest, merged after the traces
           (default guest-rootfs/agent-guest-seen.txt; lines starting with # are
           comments)
  --check  (`make check-order`, part of `make test`) checks that the binary was
           linked with the list: the listed functions it has lie together (within
           twice their size plus 64 KiB; unordered, they span megabytes). Prints how many of the listed functions
           the binary still has; a list that no longer matches (the code or
           the compiler changed) is reported, to be rewritten, and fails only
           when nothing of it matches.
Needs valgrind, unshare (util-linux), nm and readelf (binutils); --check only
the last two.
Exit 1 with a message when a step or the check fails (for --check also when
none of the list's functions is in the binary).
"""

import argparse
import bisect
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lib"))
from ttrpc_client import call  # noqa: E402  (tests/lib: the bench's ttrpc client)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 120
# Phase 1 ends this long after the agent, as PID 1, polls its vsock listener.
PID1_SETTLE_S = 1.0
# glibc's multiarch string functions, `__<name>_<ISA>[_<more>]` (__memmove_avx_unaligned_erms,
# __strcmp_sse2, ...): about 150 of them, 117 KB.
MULTIARCH = re.compile(r"^__([a-z]+?(?:_chk|_l)?)_(sse2|ssse3|sse4_1|sse4_2|sse42|avx|avx2|avx512[a-z0-9]*|evex[0-9]*"
                       r"|erms|generic)(_[a-z0-9_]+)?$")
# nm symbol types kept: code (t/T, weak W/w) and read-only or initialized data.
CODE_TYPES = "tTWw"
DATA_TYPES = "rRdD"


def die(msg):
    print(f"agent-order: {msg}", file=sys.stderr)
    sys.exit(1)


def text_range(binary):
    """(start, end) of the binary's .text section: code elsewhere (glibc's
    __libc_freeres_fn, .init) is not laid out by the list."""
    try:
        p = subprocess.run(["readelf", "-S", "-W", binary], capture_output=True, text=True)
    except OSError as e:
        die(f"readelf: {e} (apt-get install binutils)")
    for line in p.stdout.splitlines():
        f = line.replace("[ ", "[").split()
        if len(f) > 5 and f[1] == ".text":
            start, size = int(f[3], 16), int(f[5], 16)
            return start, start + size
    die(f"{binary}: no .text section ({p.stderr.strip()})")


def symbols(binary):
    """Sorted [(start, size, name, is_code)] of the binary's sized symbols; code
    only inside .text."""
    text_start, text_end = text_range(binary)
    try:
        p = subprocess.run(["nm", "-n", "-S", "--defined-only", binary], capture_output=True, text=True)
    except OSError as e:
        die(f"nm: {e} (apt-get install binutils)")
    if p.returncode != 0:
        die(f"nm {binary}: {p.stderr.strip()}")
    out = []
    for line in p.stdout.splitlines():
        f = line.split()
        if len(f) == 4 and f[2] in CODE_TYPES + DATA_TYPES and int(f[1], 16) > 0:
            start, is_code = int(f[0], 16), f[2] in CODE_TYPES
            if is_code and not text_start <= start < text_end:
                continue
            out.append((start, int(f[1], 16), f[3], is_code))
    if not out:
        die(f"{binary} has no symbols (stripped?): use the unstripped build under target/")
    return out


class Touches:
    """First-touch order of the symbols that lackey's trace lines hit."""

    def __init__(self, syms):
        self.syms = syms
        self.starts = [s[0] for s in syms]
        self.order = []
        self.seen = set()
        self.lines = 0

    def touched(self, fragment):
        """True once a symbol whose name contains `fragment` was touched."""
        return any(fragment in self.syms[i][2] for i in list(self.order))

    def feed(self, stream):
        """Reads lackey's trace lines from `stream` to its end."""
        for raw in stream:
            self.lines += 1
            # "I  0x401000,3" (fetch), " L 0x...,8" (load); stores are private pages anyway.
            kind = raw[:2].strip()
            if kind not in ("I", "L", "M"):
                continue
            try:
                addr = int(raw[2:].split(",", 1)[0], 16)
            except ValueError:
                continue
            i = bisect.bisect_right(self.starts, addr) - 1
            if i < 0 or i in self.seen:
                continue
            start, size, _, is_code = self.syms[i]
            if addr < start + size and is_code == (kind == "I"):
                self.seen.add(i)
                self.order.append(i)


def lackey(agent_argv, touches, **popen):
    """Starts `valgrind --tool=lackey` on agent_argv (a list, valgrind first) with its
    trace feeding `touches` on a thread; returns (process, thread)."""
    rfd, wfd = os.pipe()
    argv = [a.replace("@FD@", str(wfd)) for a in agent_argv]
    proc = subprocess.Popen(argv, pass_fds=(wfd,), start_new_session=True, **popen)
    os.close(wfd)
    reader = threading.Thread(target=touches.feed, args=(os.fdopen(rfd, "r", errors="replace"),))
    reader.start()
    return proc, reader


def stop(proc, reader):
    """Kills `proc`'s process group and waits for it and its trace reader."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()


def profile_pid1(agent, work, touches):
    """Phase 1 (see the module doc): the agent as PID 1 in namespaces of its own."""
    valgrind = ["valgrind", "--tool=lackey", "--trace-mem=yes", "--log-fd=@FD@", agent]
    console = os.path.join(work, "console.log")
    open(console, "w").close()
    # The agent's console (its log) is a file of this run, bound over the tmpfs /dev's.
    script = 'c=$1; shift; mount -t tmpfs none /dev && : > /dev/console && mount --bind "$c" /dev/console && exec "$@"'
    argv = ["unshare", "--user", "--map-root-user", "--fork", "--kill-child", "--pid", "--mount", "--uts", "--ipc",
            "--net", "--cgroup", "--propagation", "private", "sh", "-c", script, "sh", console] + valgrind
    log_path = os.path.join(work, "pid1.log")
    with open(log_path, "wb") as log:
        proc, reader = lackey(argv, touches, stdout=log, stderr=subprocess.STDOUT)
    print("agent-order: phase 1: the agent as PID 1 in namespaces of its own", file=sys.stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not touches.touched("VsockListener11poll_accept"):
            if proc.poll() is not None:
                die(f"phase 1: exit {proc.returncode} before the agent listened (user namespaces not allowed, "
                    f"or its vsock ports taken?): "
                    + (open(log_path, errors="replace").read() + open(console, errors="replace").read())[-1500:])
            if time.monotonic() > deadline:
                die(f"phase 1: the agent did not poll its vsock listener within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        time.sleep(PID1_SETTLE_S)
    finally:
        stop(proc, reader)


def profile_plain(agent, work, touches):
    """Phase 2 (see the module doc): the agent as a plain process answering RPCs."""
    api = os.path.join(work, "api.sock")
    log_path = os.path.join(work, "plain.log")
    argv = ["valgrind", "--tool=lackey", "--trace-mem=yes", "--log-fd=@FD@", agent,
            "--listen", f"unix://{api}", "--io-listen", f"unix://{os.path.join(work, 'io.sock')}",
            "--state-dir", os.path.join(work, "state"), "--cmdline", "vmrt.log=info"]
    with open(log_path, "wb") as log:
        proc, reader = lackey(argv, touches, stdout=log, stderr=subprocess.STDOUT)
    print("agent-order: phase 2: the agent answering Health and Version", file=sys.stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        sid = 1
        while True:
            if proc.poll() is not None:
                die(f"phase 2: the agent exited with {proc.returncode}: "
                    + open(log_path, errors="replace").read()[-1000:])
            try:
                if call(api, "Health", timeout=10, stream_id=sid):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                die(f"phase 2: no Health answer within {START_TIMEOUT_S} s")
            sid += 2
            time.sleep(0.2)
        for method in ("Version", "Health"):
            sid += 2
            try:
                ok = call(api, method, timeout=10, stream_id=sid)
            except OSError as e:
                die(f"phase 2: {method}: {e}")
            if not ok:
                die(f"phase 2: {method}: no successful response")
    finally:
        stop(proc, reader)


# Below this share of the listed functions still in the binary, --check says to rewrite the list.
STALE_BELOW = 0.8


def check(agent, list_path):
    """--check: the listed functions the binary has lie together, as the linker lays
    out the sections that hold them first (a section carries all of its functions,
    e.g. a glibc object's, so some unlisted ones come along and the order is
    approximate)."""
    syms = symbols(agent)
    data_names = {s[2] for s in syms if not s[3]}
    try:
        lines = open(list_path).read().split()
    except OSError as e:
        die(f"{list_path}: {e}")
    listed = [n for n in lines if n not in data_names]
    code = [s for s in syms if s[3]]
    by_name = {}
    for start, size, name, _ in code:
        by_name.setdefault(name, (start, size))
    present = [n for n in listed if n in by_name]
    if not present:
        die(f"{agent} has none of the {len(listed)} functions of {list_path}: rewrite it (`make agent-order`)")
    starts = [by_name[n][0] for n in present]
    out_of_order = sum(1 for a, b in zip(starts, starts[1:]) if b < a)
    end = max(by_name[n][0] + by_name[n][1] for n in present)
    listed_set = set(present)
    inside = [name for start, size, name, _ in code
              if start < end and name not in listed_set and size > 0 and start >= min(starts)]
    listed_bytes = sum(by_name[n][1] for n in set(present))
    spread = end - min(starts)
    share = len(present) / len(listed)
    print(f"agent-order: {len(present)} of {len(listed)} listed functions in {agent} ({share:.0%}), "
          f"laid out in {spread} bytes for {listed_bytes} bytes of listed code; "
          f"{out_of_order} out of order, {len(inside)} unlisted functions among them")
    if spread > 2 * listed_bytes + 65536:
        die("the binary was not linked with the list (Makefile's GUEST_AGENT_RUSTFLAGS, LLD's "
            "--symbol-ordering-file): its start-up code is scattered again")
    if share < STALE_BELOW:
        print(f"agent-order: WARNING: only {share:.0%} of the list matches this build; rewrite it with "
              f"`make agent-order` (needs valgrind) and compare the agent rss in `make bench`")


def main():
    """Writes the list, or checks a binary against it (--check)."""
    # A SIGTERM (make, a CI time-out) unwinds through the `finally` blocks
    # that kill the traced agent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", default=os.path.join(REPO, "target/x86_64-unknown-linux-gnu/guest/vmrt-agent"))
    ap.add_argument("-o", "--output", default=os.path.join(REPO, "guest-rootfs/agent-startup.order"))
    ap.add_argument("--guest-seen", default=os.path.join(REPO, "guest-rootfs/agent-guest-seen.txt"))
    ap.add_argument("--check", action="store_true", help="check the binary's layout against the list")
    args = ap.parse_args()
    if not os.access(args.agent, os.X_OK):
        die(f"{args.agent}: not an executable (run `make rust` first)")
    if args.check:
        check(args.agent, args.output)
        return
    for tool in ("valgrind", "nm", "unshare"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            die(f"missing tool '{tool}' (apt-get install valgrind binutils util-linux)")
    syms = symbols(args.agent)
    pid1 = Touches(syms)
    plain = Touches(syms)
    with tempfile.TemporaryDirectory(prefix="vmrt-agent-order.") as work:
        profile_pid1(args.agent, work, pid1)
        profile_plain(args.agent, work, plain)

    order, seen = [], set()
    index = {}
    for i, sym in enumerate(syms):
        index.setdefault(sym[2], i)
    guest_names = [n for n in (line.strip() for line in open(args.guest_seen)) if n and not n.startswith("#")]
    guest = [index[n] for n in guest_names if n in index and syms[index[n]][3]]
    for i in pid1.order + plain.order + guest:
        if i not in seen:
            seen.add(i)
            order.append(i)
    traced = set(pid1.order) | set(plain.order)
    guest_added = len(set(guest) - traced)
    # Every variant of every multiarch string function, after the code the runs touched.
    variants = [i for i, sym in enumerate(syms) if i not in seen and sym[3] and MULTIARCH.match(sym[2])]
    code = [i for i in order if syms[i][3]] + variants
    data = [i for i in order if not syms[i][3]]
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        for i in code + data:
            f.write(syms[i][2] + "\n")
    os.replace(tmp, args.output)
    print(f"agent-order: {len(code)} functions ({sum(syms[i][1] for i in code)} bytes; {guest_added} of them from "
          f"{os.path.basename(args.guest_seen)} ({len(guest)} of its {len(guest_names)} names in this build), "
          f"{len(variants)} string function variants) and {len(data)} data symbols ({sum(syms[i][1] for i in data)} bytes) "
          f"from {pid1.lines} + {plain.lines} trace lines -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
