#!/usr/bin/env python3
"""vmrt benchmarks that boot guests (run where /dev/kvm boots Linux guests:
inside the runner VM, or directly on a hardware-KVM host).

Usage: tests/bench/vm_benches.py [boot] [rss] [virtiofs] [agent]   (default: all)
       tests/bench/vm_benches.py smaps PID GUEST_MIB   (VMM RSS without guest memory)

Every benchmark compares vmrt with a peer run side by side in the same
environment and asserts nothing: a failing step prints `NOTE: ...` and the
suite goes on. Result lines start with `RESULT: ` (tests/bench/run.sh collects
them into the summary); raw samples are printed as `bench: ... samples ...`.

  boot      VMM process start -> `VMRT-GUEST-INIT-OK` on the console, for
            vmrt-vmm and QEMU -M microvm (same kernel, initramfs-test, 256 MiB,
            1 vCPU), 10 runs each, alternating, after one untimed warm-up each.
            The marker is timestamped when its bytes arrive on the VMM's stdout.
  rss       VMM RSS without guest memory: sum of Rss over /proc/PID/smaps
            minus the anonymous mapping(s) whose size is the guest memory size
            (the KVM memslots), guest kept alive with `vmrt.test=sleep:N`.
  virtiofs  256 MiB sequential read (busybox dd bs=1M) and `busybox stat` of
            10,000 files: guest over virtio-fs (cache=never) vs the same script
            on this machine's own filesystem (the one holding $TMPDIR or /tmp).
            Both sides time with kernel log marks (/dev/kmsg, dmesg timestamps).
  agent     VMM start -> first successful agent RPC (Health), median of 10,
            with build/initramfs.cpio (vmrt-agent as /init), and the agent's
            Rss (smaps_rollup), guest uptime at /init and /init -> API listening (guest clock,
            measured by the agent itself) from `vmrt agent --uds P version`.
            Uses the CLI `vmrt agent --uds P health` when it exists, else a
            minimal ttrpc Health client over the hybrid vsock socket
            (docs/contracts.md).
"""
import faulthandler
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import ttrpc_client  # noqa: E402  (tests/lib)

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = os.path.join(TOP, "target/x86_64-unknown-linux-gnu/release")
VMM = os.environ.get("VMRT_BENCH_VMM") or os.path.join(REL, "vmrt-vmm")
CLI = os.path.join(REL, "vmrt")
KERNEL = os.path.join(TOP, "build/vmlinux")
INITRD_TEST = os.path.join(TOP, "build/initramfs-test.cpio")
INITRD_AGENT = os.environ.get("VMRT_BENCH_AGENT_INITRD") or os.path.join(TOP, "build/initramfs.cpio")
QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
MEM_MIB = 256
VCPUS = 1
MARKER = b"VMRT-GUEST-INIT-OK"
# The agent's log port, as the shim sets it (vmrt.log_port).
LOG_PORT = 1026
BOOT_RUNS = int(os.environ.get("VMRT_BENCH_BOOT_RUNS", "10"))
AGENT_RUNS = int(os.environ.get("VMRT_BENCH_AGENT_RUNS", "10"))
FS_REPS = int(os.environ.get("VMRT_BENCH_FS_REPS", "3"))
# Seconds after which further repetitions of one virtio-fs test are skipped.
FS_BUDGET = int(os.environ.get("VMRT_BENCH_FS_BUDGET", "120"))
FS_FILE_MIB = 256
FS_FILES = 10000
# Everything is ~20x slower under the runner's TCG: generous bounds.
BOOT_TIMEOUT = float(os.environ.get("VMRT_BENCH_BOOT_TIMEOUT", "120"))
# The kernel command line both VMMs boot with (vmrt-vmm appends
# `reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd`;
# QEMU gets the same with reboot=t: its microvm has no i8042, see
# tests/e2e/runner-selftest.sh).
BASE_CMDLINE = "console=ttyS0 quiet"
QEMU_SUFFIX = "reboot=t panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd"


def result(line):
    print("RESULT: " + line, flush=True)


def note(msg):
    print("NOTE: " + msg, flush=True)


def say(msg):
    print("bench: " + msg, flush=True)


def fmt_samples(xs, unit="ms"):
    return " ".join(f"{x:.0f}" if unit == "ms" else f"{x:.3f}" for x in xs) + f" ({unit})"


def median(xs):
    return statistics.median(xs) if xs else None


# Guests not stopped yet (the watchdog kills them) and the scratch directory.
LIVE = set()
WORK = None


def watchdog(limit_s, what):
    """After `limit_s` seconds: NOTE, dump every thread's stack to stderr,
    SIGKILL the live VMMs, exit 3 (a hung step must not eat the suite)."""
    def fire():
        note(f"{what}: still running after {limit_s} s (VMRT_BENCH_LIMIT); stacks on stderr, stopping it")
        faulthandler.dump_traceback(all_threads=True)
        for g in list(LIVE):
            try:
                g.proc.kill()
            except OSError:
                pass
        if WORK:
            shutil.rmtree(WORK, ignore_errors=True)
        os._exit(3)
    t = threading.Timer(limit_s, fire)
    t.daemon = True
    t.start()


class Guest:
    """A VMM process whose guest console arrives on its stdout.

    A reader thread drains stdout (so the guest never blocks on a full pipe)
    and records, for each marker (bytes), the monotonic time at which the
    chunk completing it arrived. Times are seconds since just before spawn.
    """

    def __init__(self, argv, log_path, markers=(MARKER,)):
        self.markers = {m: None for m in markers}
        self.buf = bytearray()
        self.cv = threading.Condition()
        self.log = open(log_path, "wb")
        self.t0 = time.monotonic()
        # Same process group as this script: tests/bench/in-vm.sh's timeout(1)
        # backstop signals the whole group, VMMs included.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log)
        LIVE.add(self)
        self.done = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic() - self.t0
            with self.cv:
                if not chunk:
                    self.done = True
                    self.cv.notify_all()
                    return
                # keep the console bounded (a chatty guest must not eat memory)
                start = max(0, len(self.buf) - 256)
                self.buf += chunk
                for m, t in self.markers.items():
                    if t is None and self.buf.find(m, start) >= 0:
                        self.markers[m] = now
                if len(self.buf) > 8 << 20:
                    del self.buf[: len(self.buf) - (4 << 20)]
                self.cv.notify_all()

    def wait_for(self, marker, timeout):
        """Seconds from spawn to `marker`, or None (timeout or VMM exit)."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.markers[marker] is None and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            return self.markers[marker]

    def wait_exit(self, timeout):
        """Exit status, or None after killing a VMM that outlived `timeout`."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        self.thread.join(5)
        self.log.close()
        LIVE.discard(self)
        return rc

    def stop(self):
        """SIGTERM (both VMMs exit on it), SIGKILL after 10 s; never blocks for long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                note(f"VMM pid {self.proc.pid} ignored SIGTERM for 10 s; SIGKILL")
                self.proc.kill()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    note(f"VMM pid {self.proc.pid} still there 20 s after SIGKILL (uninterruptible?); moving on")
        self.thread.join(5)
        self.log.close()
        LIVE.discard(self)
        return self.proc.returncode

    def console_text(self):
        with self.cv:
            return self.buf.decode("utf-8", "replace")

    def tail(self, n=3):
        """The last `n` console lines and VMM stderr lines, each cut to 200 chars."""
        lines = ["console: " + l for l in self.console_text().replace("\r", "").splitlines()[-n:]]
        try:
            with open(self.log.name, "rb") as f:
                lines += ["vmm: " + l for l in f.read().decode("utf-8", "replace").splitlines()[-n:]]
        except OSError:
            pass
        return " | ".join(l[:200] for l in lines) if lines else "(no output)"


def vmrt_argv(initrd, cmdline, config=None):
    if config:
        return [VMM, "--config", config]
    return [VMM, "--kernel", KERNEL, "--initrd", initrd, "--cmdline", cmdline,
            "--vcpus", str(VCPUS), "--memory-mib", str(MEM_MIB), "--serial", "stdout"]


# How vmrt-vmm is started in the boot and rss benchmarks: plain flags (no
# virtio device, like QEMU's microvm here) unless that fails to boot, then a
# JSON config with one virtio-vsock device (decided once, by `vmrt_variant`).
_VMRT_VARIANT = {}


def vmrt_variant_argv(work, cmdline, variant):
    if variant == "plain":
        return vmrt_argv(INITRD_TEST, cmdline)
    tag = f"v{len(os.listdir(work))}"
    return vmrt_argv(None, None, write_config(
        os.path.join(work, f"{tag}.json"), INITRD_TEST, cmdline,
        vsock={"guest_cid": 3, "uds_path": os.path.join(work, f"{tag}.vsock")}))


def clear_sockets(work):
    """Remove vsock sockets a previous VMM left in `work` (the next one binds there)."""
    for f in os.listdir(work):
        if f.endswith(".vsock") or ".vsock_" in f:
            try:
                os.unlink(os.path.join(work, f))
            except OSError:
                pass


def vmrt_variant(work):
    """'plain' or 'vsock': the first vmrt-vmm start-up that reaches the marker."""
    if "v" in _VMRT_VARIANT:
        return _VMRT_VARIANT["v"]
    errors = []
    for variant in ("plain", "vsock"):
        clear_sockets(work)
        g = Guest(vmrt_variant_argv(work, BASE_CMDLINE, variant), os.path.join(work, f"probe-{variant}.log"))
        t = g.wait_for(MARKER, BOOT_TIMEOUT)
        g.wait_exit(60)
        if t is not None:
            if errors:
                note("vmrt-vmm without any virtio device did not boot (" + errors[0] + "); the boot and rss "
                     "benchmarks boot it with one virtio-vsock device (JSON config) instead")
            _VMRT_VARIANT["v"] = variant
            say(f"vmrt-vmm variant: {variant} (warm-up {t * 1000:.0f} ms)")
            return variant
        errors.append(f"{variant}: {g.tail(2)}")
    _VMRT_VARIANT["v"] = None
    note("vmrt-vmm did not boot build/initramfs-test.cpio: " + " || ".join(errors))
    return None


def qemu_argv(initrd, cmdline):
    return [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host", "-smp", str(VCPUS),
            "-m", str(MEM_MIB), "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-kernel", KERNEL, "-initrd", initrd,
            "-append", f"{cmdline} {QEMU_SUFFIX}"]


def write_config(path, initrd, cmdline, shares=None, vsock=None):
    cfg = {"vcpus": VCPUS, "memory_mib": MEM_MIB, "kernel": KERNEL, "initrd": initrd,
           "cmdline": cmdline, "serial": {"type": "stdout"}}
    if shares:
        cfg["shares"] = shares
    if vsock:
        cfg["vsock"] = vsock
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


# ---------------------------------------------------------------- boot --
def bench_boot(work):
    say(f"boot: {BOOT_RUNS} runs each of vmrt-vmm and QEMU microvm, alternating "
        f"({MEM_MIB} MiB, {VCPUS} vCPU, build/initramfs-test.cpio, cmdline '{BASE_CMDLINE}')")
    variant = vmrt_variant(work)
    peers = {"vmrt": vmrt_variant_argv(work, BASE_CMDLINE, variant or "plain"),
             "qemu-microvm": qemu_argv(INITRD_TEST, BASE_CMDLINE)}
    samples = {k: [] for k in peers}
    exits = {k: [] for k in peers}
    broken = {}
    if variant is None:
        broken["vmrt"] = "does not boot"

    def one(name, timed=True):
        clear_sockets(work)
        g = Guest(peers[name], os.path.join(work, f"boot-{name}.log"))
        t = g.wait_for(MARKER, BOOT_TIMEOUT)
        rc = g.wait_exit(60)
        total = time.monotonic() - g.t0
        if t is None:
            return None, f"no {MARKER.decode()} within {BOOT_TIMEOUT:.0f} s (exit {rc}): {g.tail()}"
        if rc != 0:
            note(f"boot: {name} reached the marker but exited {rc}")
        if timed:
            exits[name].append(total * 1000)
        return t * 1000, None

    # Warm-up: the first start of each binary (and of the kernel/initrd
    # reads) is slow in a fresh runner, whose / comes over 9p.
    for name in peers:
        if name in broken:
            continue
        t, err = one(name, timed=False)
        if err:
            broken[name] = err
            note(f"boot: {name} warm-up failed: {err}")
        else:
            say(f"boot: warm-up {name} {t:.0f} ms")
    for i in range(BOOT_RUNS):
        for name in peers:
            if name in broken:
                continue
            t, err = one(name)
            if err:
                note(f"boot: {name} run {i + 1} failed: {err}")
                if not samples[name] and i >= 1:
                    broken[name] = err
                continue
            samples[name].append(t)
    for name in peers:
        if samples[name]:
            say(f"boot: samples {name} start->marker {fmt_samples(samples[name])}; "
                f"start->exit {fmt_samples(exits[name])}")
            result(f"boot {name} = {median(samples[name]):.0f} ms (median of {len(samples[name])})")
    if samples["vmrt"] and samples["qemu-microvm"]:
        r = median(samples["vmrt"]) / median(samples["qemu-microvm"])
        result(f"boot vmrt/qemu-microvm = {r:.2f} (target <= 0.8)")
    else:
        note("boot: no ratio (a side has no samples)")


# ----------------------------------------------------------------- rss --
def smaps(pid, guest_mib):
    """(rss_total_kib, rss_without_guest_kib, excluded mappings) of PID.

    Guest memory = anonymous mappings (no path, or [anon:...]/memfd) whose
    size is exactly the guest memory size; when there is none, the largest
    anonymous mapping of at least that size (and a note says so).
    """
    guest_kib = guest_mib * 1024
    maps = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(None, 5)
                cur = {"range": parts[0], "path": parts[5].strip() if len(parts) > 5 else "",
                       "size": 0, "rss": 0}
                maps.append(cur)
            elif cur is not None and line.startswith("Size:"):
                cur["size"] = int(line.split()[1])
            elif cur is not None and line.startswith("Rss:"):
                cur["rss"] = int(line.split()[1])

    def anon(m):
        return m["path"] == "" or m["path"].startswith("[anon") or m["path"].startswith("/memfd:")

    guest = [m for m in maps if anon(m) and m["size"] == guest_kib]
    how = "size == guest memory"
    if not guest:
        big = sorted((m for m in maps if anon(m) and m["size"] >= guest_kib), key=lambda m: -m["size"])
        guest = big[:1]
        how = "largest anonymous mapping >= guest memory (none had exactly its size)"
    total = sum(m["rss"] for m in maps)
    excl = sum(m["rss"] for m in guest)
    return total, total - excl, guest, how


def vm_rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def bench_rss(work):
    cmdline = BASE_CMDLINE + " vmrt.test=sleep:600"
    variant = vmrt_variant(work)
    peers = {"qemu-microvm": qemu_argv(INITRD_TEST, cmdline)}
    if variant:
        peers["vmrt"] = vmrt_variant_argv(work, cmdline, variant)
    say(f"rss: each VMM boots build/initramfs-test.cpio with vmrt.test=sleep:600 "
        f"({MEM_MIB} MiB guest), smaps read 2 s after {MARKER.decode()}")
    for name, argv in peers.items():
        clear_sockets(work)
        g = Guest(argv, os.path.join(work, f"rss-{name}.log"))
        try:
            t = g.wait_for(MARKER, BOOT_TIMEOUT)
            if t is None:
                note(f"rss: {name} did not boot: {g.tail()}")
                continue
            time.sleep(2)
            total, without, guest, how = smaps(g.proc.pid, MEM_MIB)
            say(f"rss: {name} pid {g.proc.pid}: Rss total {total} KiB, guest memory mapping(s) "
                f"[{', '.join(m['range'] + ' size ' + str(m['size']) + ' KiB rss ' + str(m['rss']) + ' KiB' for m in guest)}] "
                f"identified by {how}; VmRSS {vm_rss_of(g.proc.pid)} KiB")
            target = " (target <= 5120)" if name == "vmrt" else ""
            result(f"vmm-rss {name} = {without} KiB{target}")
        except OSError as e:
            note(f"rss: {name}: reading /proc: {e}")
        finally:
            g.stop()


# ------------------------------------------------------------ virtiofs --
GUEST_FS_SCRIPT = r"""#!/bin/sh
# vmrt virtio-fs bench (tests/bench/vm_benches.py): $1 = directory holding
# big.bin and many/, $2 = repetitions, $3 = time budget per test in s (further
# repetitions are skipped once it is spent). The same script runs in the guest
# (over virtio-fs) and on the peer's own filesystem; busybox tools on both.
# Timing: kernel log marks (dmesg timestamps, us); `read` is a shell builtin.
# In the guest (run by the test initramfs's `vmrt.test=run:TAG` hook with the
# mount point only) $2 and $3 come from `vmrt.bench=REPS,BUDGET` on the
# kernel command line.
d=$1; n=${2:-3}; budget=${3:-120}
if [ -z "${2:-}" ]; then
  for a in $(cat /proc/cmdline); do
    case $a in vmrt.bench=*,*) v=${a#vmrt.bench=}; n=${v%,*}; budget=${v#*,} ;; esac
  done
fi
mark() { echo "vmrt-bench-mark $1" >/dev/kmsg || echo "VMRT-BENCH-UPTIME $1 $(cut -d' ' -f1 /proc/uptime)"; }
up() { read -r u _ </proc/uptime; echo "${u%.*}"; }
run() { # run NAME CMD...
  name=$1; shift
  t0=$(up); i=1
  while [ $i -le $n ]; do
    mark $name-$i-start
    "$@" || echo "VMRT-BENCH-ERROR $name"
    mark $name-$i-end
    [ $(( $(up) - t0 )) -ge "$budget" ] && { echo "VMRT-BENCH-BUDGET $name after $i"; break; }
    i=$((i + 1))
  done
}
rd() { busybox dd if="$d/big.bin" of=/dev/null bs=1M 2>/dev/null; }
st() { (cd "$d/many" && busybox stat -c %s * >/dev/null); }
run read rd
run stat st
busybox dmesg | busybox grep 'vmrt-bench-mark' | busybox sed 's/^/VMRT-BENCH /'
"""


def parse_marks(text):
    """{name: seconds} from `VMRT-BENCH [  t] vmrt-bench-mark NAME` lines (last wins)."""
    marks = {}
    for m in re.finditer(r"\[\s*([0-9]+\.[0-9]+)\]\s+vmrt-bench-mark (\S+)", text):
        marks[m.group(2)] = float(m.group(1))
    for m in re.finditer(r"VMRT-BENCH-UPTIME (\S+) ([0-9.]+)", text):
        marks.setdefault(m.group(1), float(m.group(2)))
    return marks


def durations(marks, what, n):
    out = []
    for i in range(1, n + 1):
        a, b = marks.get(f"{what}-{i}-start"), marks.get(f"{what}-{i}-end")
        if a is not None and b is not None:
            out.append((b - a) * 1000)
    return out


def bench_virtiofs(work):
    base = tempfile.mkdtemp(prefix="vmrt-bench-fs.", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        share = os.path.join(base, "share")
        os.makedirs(os.path.join(share, "many"))
        fstype = subprocess.run(["stat", "-f", "-c", "%T", share], capture_output=True, text=True).stdout.strip()
        say(f"virtiofs: writing {FS_FILE_MIB} MiB file and {FS_FILES} files in {share} ({fstype})")
        block = os.urandom(1 << 20)
        with open(os.path.join(share, "big.bin"), "wb") as f:
            for _ in range(FS_FILE_MIB):
                f.write(block)
        for i in range(FS_FILES):
            open(os.path.join(share, "many", f"f{i:05d}"), "wb").close()
        script = os.path.join(share, "guest.sh")
        with open(script, "w") as f:
            f.write(GUEST_FS_SCRIPT)

        # Peer: this machine's own filesystem, same script, same tools.
        p = subprocess.run(["busybox", "sh", script, share, str(FS_REPS), str(FS_BUDGET)],
                           capture_output=True, text=True, timeout=900)
        host_marks = parse_marks(p.stdout)
        if "VMRT-BENCH-ERROR" in p.stdout or p.returncode != 0:
            note(f"virtiofs: peer run: exit {p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")
        h_read, h_stat = durations(host_marks, "read", FS_REPS), durations(host_marks, "stat", FS_REPS)
        say(f"virtiofs: samples peer ({fstype}) read {fmt_samples(h_read)}; stat-10k {fmt_samples(h_stat)}")

        cfg = write_config(os.path.join(work, "fs.json"), INITRD_TEST,
                           f"{BASE_CMDLINE} vmrt.test=run:bench vmrt.bench={FS_REPS},{FS_BUDGET}",
                           shares=[{"tag": "bench", "path": share, "cache": "never"}])
        done = b"VMRT-TEST run bench"
        g = Guest(vmrt_argv(None, None, cfg), os.path.join(work, "fs-vmm.log"), markers=(MARKER, done))
        t = g.wait_for(done, 2 * FS_BUDGET * 3 + BOOT_TIMEOUT)
        rc = g.wait_exit(60)
        text = g.console_text()
        if t is None:
            note(f"virtiofs: the guest run did not finish (VMM exit {rc}): {g.tail()}")
            return
        if "VMRT-BENCH-ERROR" in text or "rc=0" not in text.split("VMRT-TEST run bench", 1)[1][:8]:
            note(f"virtiofs: guest script reported an error: {g.tail(12)}")
        for line in re.findall(r"VMRT-BENCH-BUDGET [^\r\n]*", text):
            say(f"virtiofs: guest {line[len('VMRT-BENCH-'):]} repetition(s) (time budget {FS_BUDGET} s spent)")
        gm = parse_marks(text)
        g_read, g_stat = durations(gm, "read", FS_REPS), durations(gm, "stat", FS_REPS)
        say(f"virtiofs: samples guest (virtio-fs, cache=never) read {fmt_samples(g_read)}; "
            f"stat-10k {fmt_samples(g_stat)}")
        if g_read and h_read:
            mib_s = FS_FILE_MIB / (median(g_read) / 1000)
            say(f"virtiofs: guest seq-read {mib_s:.0f} MiB/s, peer {FS_FILE_MIB / (median(h_read) / 1000):.0f} MiB/s")
            result(f"virtiofs seq-read guest/runner = {median(g_read) / median(h_read):.2f} "
                   f"(time ratio; peer fs {fstype}; {median(g_read):.0f} ms vs {median(h_read):.0f} ms)")
        else:
            note("virtiofs: no seq-read ratio (missing samples)")
        if g_stat and h_stat:
            result(f"virtiofs stat-10k guest/runner = {median(g_stat) / median(h_stat):.2f} "
                   f"(time ratio; peer fs {fstype}; {median(g_stat):.0f} ms vs {median(h_stat):.0f} ms)")
        else:
            note("virtiofs: no stat-10k ratio (missing samples)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------- agent --
AGENT_PORT = 1024


def ttrpc_health(uds, timeout=2.0, hybrid=True):
    """Health over hybrid vsock (or a plain Unix socket) + ttrpc; True when the
    agent answers with status 0 (tests/lib/ttrpc_client.py)."""
    try:
        return ttrpc_client.call(uds, "Health", timeout, hybrid_port=AGENT_PORT if hybrid else None)
    except OSError:
        return False


def cli_has_agent():
    try:
        p = subprocess.run([CLI, "agent", "--help"], capture_output=True, timeout=30)
        return p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def bench_agent(work):
    use_cli = cli_has_agent()
    if use_cli:
        say("agent: polling with `vmrt agent --uds P health`")
    else:
        note("agent: `vmrt agent` subcommand not available in target/.../vmrt: polling Health with the "
             "bench's own ttrpc client over the hybrid vsock socket; agent RSS needs `vmrt agent ... version`")

    def healthy(uds):
        if use_cli:
            try:
                return subprocess.run([CLI, "agent", "--uds", uds, "health"], capture_output=True,
                                      timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        return ttrpc_health(uds)

    steps = []

    def drain_log_port(listener, keep_steps):
        """Accept the agent's log connection and read it to the end, as the shim does;
        with keep_steps, keeps the start-up steps line (logged at vmrt.log=debug)."""
        try:
            conn, _ = listener.accept()
            with conn:
                buf = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    if keep_steps and not steps:
                        buf = (buf + data)[-65536:]
                        for line in buf.split(b"\n")[:-1]:
                            if b"start-up steps" in line:
                                steps.append(line.decode(errors="replace").split("(ms): ", 1)[-1])
                                break
        except OSError:
            pass
        finally:
            listener.close()

    def boot(i, cmdline):
        uds = os.path.join(work, f"agent-{i}.vsock")
        # The shim's set-up: the agent logs over vsock port LOG_PORT to a host listener.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_{LOG_PORT}")
        listener.listen(1)
        listener.settimeout(BOOT_TIMEOUT)
        threading.Thread(target=drain_log_port, args=(listener, i >= 1), daemon=True).start()
        cfg = write_config(os.path.join(work, f"agent-{i}.json"), INITRD_AGENT, cmdline,
                           vsock={"guest_cid": 3, "uds_path": uds})
        g = Guest(vmrt_argv(None, None, cfg), os.path.join(work, f"agent-{i}.log"), markers=(b"listening",))
        deadline = time.monotonic() + BOOT_TIMEOUT
        t = None
        while time.monotonic() < deadline and g.proc.poll() is None:
            if os.path.exists(uds) and healthy(uds):
                t = (time.monotonic() - g.t0) * 1000
                break
            time.sleep(0.005)
        return g, uds, t

    samples, ready, started, rss, anon = [], [], [], [], []
    cmdline = (BASE_CMDLINE + " vmrt.log=" + os.environ.get("VMRT_BENCH_AGENT_LOG", "info")
               + f" vmrt.log_port={LOG_PORT}")
    for i in range(AGENT_RUNS + 1):  # run 0 is the warm-up
        g, uds, t = boot(i, cmdline)
        try:
            if t is None:
                note(f"agent: run {i} no successful Health within {BOOT_TIMEOUT:.0f} s: {g.tail()}")
                if not samples and i >= 1:
                    break
                continue
            if i == 0:
                say(f"agent: warm-up {t:.0f} ms")
                continue
            samples.append(t)
            if not use_cli:
                continue
            # The agent measures itself on the guest clock (CLOCK_BOOTTIME): its start
            # as /init, start -> API listening (PID 1 mounts included), and its Rss (smaps_rollup).
            p = subprocess.run([CLI, "agent", "--uds", uds, "version"], capture_output=True, text=True, timeout=30)
            try:
                v = json.loads(p.stdout)
            except ValueError:
                note(f"agent: `vmrt agent version` exit {p.returncode}: {p.stdout[-200:]} {p.stderr[-200:]}")
                continue
            if i == 1:
                say(f"agent: version {json.dumps(v, separators=(',', ':'))}")
            if v.get("agent_rss_kib"):
                rss.append(v["agent_rss_kib"])
                anon.append(v.get("agent_rss_anon_kib", 0))
            if v.get("agent_started_at_us"):
                started.append(v["agent_started_at_us"] / 1000)
                ready.append(v.get("agent_start_to_ready_us", 0) / 1000)
        finally:
            g.stop()
    if samples:
        say(f"agent: samples first-rpc {fmt_samples(samples)}")
        result(f"agent first-rpc = {median(samples):.0f} ms (median of {len(samples)})")
    if rss:
        say(f"agent: samples rss {' '.join(str(x) for x in rss)} (KiB), of it anonymous {' '.join(str(x) for x in anon)}")
        result(f"agent rss = {median(rss):.0f} KiB (Rss of smaps_rollup in the guest, /init's file pages included; "
               f"anonymous {median(anon):.0f} KiB; median of {len(rss)}; target <= 2048)")
    if steps:
        say(f"agent: start-up steps of the first timed boot (ms, guest clock): {steps[0]}")
    if ready:
        say(f"agent: samples guest uptime at /init {' '.join(f'{x:.0f}' for x in started)} (ms)")
        say(f"agent: samples start-to-ready {' '.join(f'{x:.1f}' for x in ready)} (ms)")
        result(f"agent start-to-ready = {median(ready):.1f} ms (guest clock: /init's first instruction -> "
               f"API listening, median of {len(ready)}; target <= 20)")
        result(f"guest kernel boot-to-init = {median(started):.0f} ms (guest uptime when /init started, "
               f"median of {len(started)})")
    elif samples:
        note("agent: `vmrt agent version` gave no agent clock: host-side number only")


def main(argv):
    if argv[:1] == ["smaps"]:
        total, without, guest, how = smaps(int(argv[1]), int(argv[2]))
        print(f"{without} {total} {';'.join(m['range'] for m in guest)} ({how})")
        return 0
    benches = {"boot": bench_boot, "rss": bench_rss, "virtiofs": bench_virtiofs, "agent": bench_agent}
    names = argv or list(benches)
    for n in names:
        if n not in benches:
            print(f"usage: vm_benches.py [{'|'.join(benches)}]... | smaps PID GUEST_MIB", file=sys.stderr)
            return 2
    missing = [p for p in (VMM, KERNEL, INITRD_TEST, INITRD_AGENT) if not os.path.exists(p)]
    if missing:
        note(f"missing {' '.join(missing)} (make all)")
    if not os.path.exists("/dev/kvm"):
        note("no /dev/kvm here: guest benchmarks cannot run")
        return 0
    limit = int(os.environ.get("VMRT_BENCH_LIMIT", "0"))
    if limit > 0:
        watchdog(limit, " ".join(names))
    global WORK
    work = WORK = tempfile.mkdtemp(prefix="vmrt-bench.", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        for n in names:
            t0 = time.monotonic()
            say(f"--- {n}")
            try:
                benches[n](work)
            except Exception as e:  # a failing step is a note, never the end of the suite
                note(f"{n}: {type(e).__name__}: {e}")
            say(f"--- {n} took {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
