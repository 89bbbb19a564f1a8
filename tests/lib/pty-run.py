#!/usr/bin/env python3
"""Runs a command on a new pseudo-terminal of a given size, as a user's
terminal would be: `pty-run.py ROWS COLS TIMEOUT CMD...`.

The command's terminal output goes to our stdout (CR LF as the terminal
sends it); our exit status is the command's (128 + signal when killed, 124
when it is still running after TIMEOUT seconds, then it is killed). Nothing
is typed into the terminal; the test suites use it for `ctr run -t`, which
needs a terminal on its stdin.
"""
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time


def main():
    if len(sys.argv) < 5:
        sys.exit("usage: pty-run.py ROWS COLS TIMEOUT CMD...")
    rows, cols, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    cmd = sys.argv[4:]
    pid, master = pty.fork()
    if pid == 0:
        try:
            # The size is set before the command starts: it reads it at once.
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    deadline = time.monotonic() + timeout
    status = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if status is None:  # not reaped yet: the pid is still ours
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            sys.stdout.flush()
            print(f"\npty-run: {cmd[0]} still running after {timeout:g} s: killed", file=sys.stderr)
            sys.exit(124)
        r, _, _ = select.select([master], [], [], min(left, 0.5))
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed
                data = b""
            if not data:
                break
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        elif status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
    if status is None:
        _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
