#!/usr/bin/env python3
"""Write a deterministic cpio "newc" archive (an initramfs) from a spec file.

Usage: mkcpio.py SPEC OUT

SPEC lines, in the kernel's usr/gen_init_cpio syntax (mode in octal; uid and gid
are ignored: every entry is owned by 0:0):
    dir   NAME MODE UID GID
    file  NAME SOURCE MODE UID GID
    slink NAME TARGET MODE UID GID
    nod   NAME MODE UID GID c|b MAJOR MINOR
Blank lines and lines starting with '#' are skipped. Missing parent
directories are added (0755). Entries are written sorted by name, with mtime 0
and inode numbers in that order, so the same inputs give the same bytes.
A later line for the same NAME replaces an earlier one.
"""
import stat
import sys

S_TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "slink": stat.S_IFLNK}


def fail(msg):
    sys.exit(f"mkcpio: {msg}")


def parse(spec_path):
    entries = {}  # name -> (mode, data, rdev major, rdev minor)
    with open(spec_path) as spec:
        for lineno, line in enumerate(spec, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            kind, args = words[0], words[1:]
            try:
                if kind == "dir" and len(args) == 4:
                    name, mode = args[0], int(args[1], 8)
                    entry = (stat.S_IFDIR | mode, b"", 0, 0)
                elif kind == "file" and len(args) == 5:
                    name, mode = args[0], int(args[2], 8)
                    with open(args[1], "rb") as f:
                        entry = (stat.S_IFREG | mode, f.read(), 0, 0)
                elif kind == "slink" and len(args) == 5:
                    name, mode = args[0], int(args[2], 8)
                    entry = (stat.S_IFLNK | mode, args[1].encode(), 0, 0)
                elif kind == "nod" and len(args) == 7 and args[4] in ("c", "b"):
                    name, mode = args[0], int(args[1], 8)
                    dev = stat.S_IFCHR if args[4] == "c" else stat.S_IFBLK
                    entry = (dev | mode, b"", int(args[5]), int(args[6]))
                else:
                    fail(f"{spec_path}:{lineno}: cannot parse {line.strip()!r}")
            except (ValueError, OSError) as e:
                fail(f"{spec_path}:{lineno}: {e}")
            name = name.strip("/")
            if not name or ".." in name.split("/"):
                fail(f"{spec_path}:{lineno}: bad name {name!r}")
            parts = name.split("/")
            for i in range(1, len(parts)):
                entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", 0, 0))
            entries[name] = entry
    return entries


def header(ino, mode, nlink, size, rmaj, rmin, namesize):
    # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    # rdevmajor, rdevminor, namesize, check
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def pad4(n):
    return b"\0" * (-n % 4)


def write(entries, out_path):
    with open(out_path, "wb") as out:
        for ino, name in enumerate(sorted(entries), 1):
            mode, data, rmaj, rmin = entries[name]
            bname = name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            h = header(ino, mode, nlink, len(data), rmaj, rmin, len(bname))
            out.write(h + bname + pad4(len(h) + len(bname)) + data + pad4(len(data)))
        bname = b"TRAILER!!!\0"
        h = header(0, 0, 1, 0, 0, 0, len(bname))
        out.write(h + bname + pad4(len(h) + len(bname)))


def main():
    if len(sys.argv) != 3:
        fail("usage: mkcpio.py SPEC OUT")
    entries = parse(sys.argv[1])
    write(entries, sys.argv[2])
    print(f"mkcpio: {len(entries)} entries -> {sys.argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main()
