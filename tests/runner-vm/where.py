#!/usr/bin/env python3
"""Print where each vCPU of a running QEMU is: RIP, the runner kernel's symbol at it, and
whether the CPU is halted or inside a nested guest.

Usage: where.py MONITOR_SOCKET RUNNER_SYSTEM_MAP [GUEST_SYMBOLS]

MONITOR_SOCKET is QEMU's human monitor (-monitor unix:PATH,server=on,wait=off);
RUNNER_SYSTEM_MAP is the runner kernel's System.map; GUEST_SYMBOLS, `nm` output of
the nested guest's kernel. The monitor does not say whether a CPU runs the runner's
kernel or the nested guest (both are at the same virtual addresses), so a kernel RIP is
looked up in both maps; the runner's kernel must run with `nokaslr` for its map to hold. Samples the registers 3 times, 1 s
apart, so a CPU spinning in a loop shows up as such. Used by tests/runner-vm/run when
the runner stalls; prints nothing useful but never fails when the monitor is gone.
"""
import bisect
import re
import socket
import sys
import time


def load_symbols(path):
    addrs, names = [], []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    addrs.append(int(parts[0], 16))
                    names.append(parts[2])
    except OSError:
        pass
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def symbolize(rip, addrs, names):
    i = bisect.bisect_right(addrs, rip) - 1
    if i < 0 or rip - addrs[i] > 1 << 20:
        return "?"
    return f"{names[i]}+{rip - addrs[i]:#x}"


def monitor(path, *commands):
    """Runs commands in one monitor session; returns the output of the last."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    out = b""

    def read_until_prompt():
        buf = b""
        while not buf.endswith(b"(qemu) "):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf

    read_until_prompt()
    for command in commands:
        s.sendall(command.encode() + b"\n")
        out = read_until_prompt()
    s.close()
    return out.decode(errors="replace")


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    sock = sys.argv[1]
    runner = load_symbols(sys.argv[2])
    guest = load_symbols(sys.argv[3]) if len(sys.argv) == 4 else ([], [])
    for sample in range(3):
        try:
            regs = monitor(sock, "info registers -a")
        except OSError as e:
            print(f"monitor: {e}")
            return 0
        cpus = re.split(r"\nCPU#", "\n" + regs)
        for cpu in cpus[1:]:
            num = cpu.split(None, 1)[0].rstrip(":")
            rip = re.search(r"RIP=([0-9a-f]+)", cpu)
            hlt = re.search(r"HLT=(\d)", cpu)
            cr3 = re.search(r"CR3=([0-9a-f]+)", cpu)
            rip_v = int(rip.group(1), 16) if rip else 0
            if rip_v >= 0xFFFF_8000_0000_0000:
                where = f"runner:{symbolize(rip_v, *runner)} guest:{symbolize(rip_v, *guest)}"
            else:
                where = "user space"
            print(f"sample {sample} cpu {num}: rip={rip_v:#x} {where} "
                  f"hlt={hlt.group(1) if hlt else '?'} cr3={cr3.group(1) if cr3 else '?'}")
        time.sleep(1)
    # Pending (IRR) and in-service (ISR) vectors of each CPU's local APIC.
    for num in range(len(cpus) - 1):
        try:
            lapic = monitor(sock, f"cpu {num}", "info lapic")
        except OSError as e:
            print(f"monitor: {e}")
            return 0
        for line in lapic.splitlines():
            if line.startswith(("ISR", "IRR", "dumping", "LVTT", "Timer", "PPR")):
                print(f"lapic cpu {num}: {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
