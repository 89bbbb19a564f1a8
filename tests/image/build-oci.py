#!/usr/bin/env python3
"""Build the vmrt test images as OCI image-layout tarballs, offline and reproducibly.

The image has ONE gzip layer made from Debian's busybox-static (/bin/busybox):
/bin/busybox plus a symlink per applet (paths from `busybox --list-full`, each
pointing at /bin/busybox), /etc/passwd (root 0, vmrt 1000, nobody 65534),
/etc/group, /tmp (1777), /root (0700), /home/vmrt (1000:1000) and empty
/proc /sys /dev mount points.

Output (OCI image-layout spec v1.0, "image-layout.md"): a tar holding
`oci-layout`, `index.json` and `blobs/sha256/<hex>` (layer, config, manifest).
The index entry is annotated with `io.containerd.image.name` (the full
reference, read by `ctr images import`) and `org.opencontainers.image.ref.name`
(the tag).

Determinism: every tar entry has mtime 0, uid/gid 0 (except /home/vmrt),
sorted order; gzip header has mtime 0 and no file name; JSON is serialised
with sorted keys and no whitespace. Same inputs give the same bytes.

Usage:
  build-oci.py                      # both default images into build/
  build-oci.py --preset pause-test  # one preset (also: build-oci.py pause)
  build-oci.py --name docker.io/library/x:latest --output out.tar --cmd '["/bin/sh"]'
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PRESETS = {
    "busybox-test": {
        "name": "docker.io/library/busybox-test:latest",
        "output": os.path.join(REPO, "build", "busybox-test.oci.tar"),
        "cmd": ["/bin/sh"],
    },
    # Never exits on its own: busybox `sleep infinity` is supported (1.35).
    "pause-test": {
        "name": "docker.io/library/pause-test:latest",
        "output": os.path.join(REPO, "build", "pause-test.oci.tar"),
        "cmd": ["/bin/sleep", "infinity"],
    },
}

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "vmrt:x:1000:1000:vmrt:/home/vmrt:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nvmrt:x:1000:\nnogroup:x:65534:\n"

MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


class BuildError(Exception):
    """A build input is missing or invalid (message names the problem)."""


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _info(name, kind, mode, size=0, linkname="", uid=0, gid=0):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.mtime = 0
    ti.uid, ti.gid = uid, gid
    ti.uname = "root" if uid == 0 else ""
    ti.gname = "root" if gid == 0 else ""
    return ti


def busybox_applets(busybox: str) -> list:
    """Relative applet paths (e.g. "bin/sh", "usr/bin/env") from `busybox --list-full`."""
    try:
        out = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"cannot run '{busybox} --list-full': {e}") from e
    applets = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("/") or ".." in line.split("/"):
            continue
        applets.append(line)
    if "bin/sh" not in applets:
        raise BuildError(f"{busybox} has no bin/sh applet; is it busybox-static?")
    return applets


def build_layer_tar(busybox: str) -> bytes:
    """Uncompressed layer tar: entries sorted by path, parents before children."""
    with open(busybox, "rb") as f:
        bb = f.read()
    if bb[:4] != b"\x7fELF":
        raise BuildError(f"{busybox} is not an ELF binary")

    # path -> TarInfo builder (data for regular files)
    entries = {}

    def add_dir(path, mode=0o755, uid=0, gid=0):
        entries[path] = (_info(path, tarfile.DIRTYPE, mode, uid=uid, gid=gid), None)

    def add_file(path, data, mode=0o644):
        entries[path] = (_info(path, tarfile.REGTYPE, mode, size=len(data)), data)

    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "home"):
        add_dir(d)
    add_dir("tmp", 0o1777)
    add_dir("root", 0o700)
    add_dir("home/vmrt", 0o755, uid=1000, gid=1000)
    add_file("bin/busybox", bb, 0o755)
    add_file("etc/passwd", PASSWD.encode())
    add_file("etc/group", GROUP.encode())
    for applet in busybox_applets(busybox):
        if applet in entries:
            continue
        parent = os.path.dirname(applet)
        if parent and parent not in entries:
            add_dir(parent)
        entries[applet] = (_info(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"), None)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            ti, data = entries[path]
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def gzip_deterministic(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(name: str, output: str, cmd: list, busybox: str) -> str:
    """Write the OCI layout tarball to `output`; return the manifest digest."""
    if ":" not in name.rsplit("/", 1)[-1]:
        raise BuildError(f"image name '{name}' has no tag (expected e.g. docker.io/library/x:latest)")
    tag = name.rsplit(":", 1)[1]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise BuildError(f"cmd must be a non-empty JSON array of strings, got {cmd!r}")

    layer_tar = build_layer_tar(busybox)
    layer = gzip_deterministic(layer_tar)
    config = canonical_json({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [PATH_ENV], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(layer_tar)]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "vmrt tests/image/build-oci.py (Debian busybox-static)"}],
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": "sha256:" + sha256_hex(config), "size": len(config)},
        "layers": [{"mediaType": MT_LAYER, "digest": "sha256:" + sha256_hex(layer), "size": len(layer)}],
    })
    manifest_digest = "sha256:" + sha256_hex(manifest)
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    oci_layout = canonical_json({"imageLayoutVersion": "1.0.0"})

    files = {
        "oci-layout": oci_layout,
        "index.json": index,
    }
    for blob in (layer, config, manifest):
        files["blobs/sha256/" + sha256_hex(blob)] = blob

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for d in ("blobs", "blobs/sha256"):
                tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
            for path in sorted(files):
                data = files[path]
                tar.addfile(_info(path, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest_digest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="*", metavar="PRESET",
                   help="preset(s) to build: busybox[-test], pause[-test] (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), action="append", default=[],
                   help="build a preset image (repeatable); default: all presets")
    p.add_argument("--name", help="full image reference, e.g. docker.io/library/x:latest")
    p.add_argument("--output", help="output tarball path")
    p.add_argument("--cmd", help='image Cmd as a JSON array, e.g. \'["/bin/sh"]\' (default ["/bin/sh"])')
    p.add_argument("--busybox", default=os.environ.get("VMRT_BUSYBOX", "/bin/busybox"),
                   help="static busybox binary (default /bin/busybox from busybox-static)")
    args = p.parse_args(argv)

    presets = list(args.preset)
    for name in args.presets:
        full = name if name in PRESETS else f"{name}-test"
        if full not in PRESETS:
            p.error(f"unknown preset '{name}' (known: {', '.join(sorted(PRESETS))})")
        presets.append(full)
    jobs = []
    if args.name or args.output or args.cmd:
        if not (args.name and args.output):
            p.error("--name and --output go together")
        try:
            cmd = json.loads(args.cmd) if args.cmd else ["/bin/sh"]
        except json.JSONDecodeError as e:
            p.error(f"--cmd is not valid JSON: {e}")
        jobs.append((args.name, args.output, cmd))
    for preset in presets or ([] if jobs else sorted(PRESETS)):
        pr = PRESETS[preset]
        jobs.append((pr["name"], pr["output"], pr["cmd"]))

    for name, output, cmd in jobs:
        try:
            digest = build_image(name, output, cmd, args.busybox)
        except (BuildError, OSError) as e:
            print(f"build-oci: {e}", file=sys.stderr)
            return 1
        print(f"build-oci: wrote {output} ({name}, manifest {digest}, {os.path.getsize(output)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
