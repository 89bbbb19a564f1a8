#!/usr/bin/env bash
# Tests guest-rootfs/build.sh with a stand-in /init (Debian's static busybox,
# or $VMRT_AGENT when set): layout, metadata, reproducibility, refusal of a
# dynamic /init. Closes with "guest-rootfs: N passed, M failed".
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
agent="${VMRT_AGENT:-/bin/busybox}"
work="$(mktemp -d /tmp/vmrt-rootfs-test.XXXXXX)"
trap 'rm -rf "$work"' EXIT

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   - $*"; }
nok() { failed=$((failed + 1)); echo "FAIL - $*"; }

"$here/build.sh" --agent "$agent" -o "$work/a.cpio" >/dev/null || nok "build.sh failed"
"$here/build.sh" --agent "$agent" -o "$work/b.cpio" >/dev/null || nok "build.sh failed (2nd run)"
if cmp -s "$work/a.cpio" "$work/b.cpio"; then ok "two builds are byte-identical"; else nok "builds differ"; fi

listing="$(cpio -itv --quiet <"$work/a.cpio" 2>/dev/null)"
names="$(awk '{ print $NF }' <<<"$listing" | LC_ALL=C sort | tr '\n' ' ')"
want="dev dev/console etc init proc run sys tmp "
if [ "$names" = "$want" ]; then ok "entries: $names"; else nok "entries '$names', want '$want'"; fi
if [ "$(cpio -itv --quiet <"$work/a.cpio" 2>/dev/null | awk '$3 != "root" || $4 != "root"' | wc -l)" -eq 0 ]; then
  ok "every entry owned by root:root"
else
  nok "entries not owned by root"
fi
if grep -Eq '^crw------- +1 root +root +5, +1 .* dev/console$' <<<"$listing"; then ok "/dev/console is char 5,1"; else nok "/dev/console missing or wrong"; fi
if grep -Eq '^drwxrwxrwt .* tmp$' <<<"$listing"; then ok "/tmp is 1777"; else nok "/tmp mode wrong"; fi
mkdir "$work/x"
(cd "$work/x" && cpio -idm --quiet <"$work/a.cpio" 2>/dev/null)
strip --strip-all -o "$work/agent.stripped" "$agent"
if cmp -s "$work/x/init" "$work/agent.stripped" && [ -x "$work/x/init" ]; then ok "/init is the agent, stripped, executable"; else nok "/init differs from $agent stripped"; fi
if [ -z "$(readelf -S -W "$work/x/init" | grep -E ' \.(symtab|strtab|debug_[a-z]+) ')" ]; then ok "/init has no symbol or debug sections"; else nok "/init keeps symbol or debug sections"; fi
# newc c_mtime is the 8 hex digits at offset 46 of each 110-byte header.
mtimes="$(python3 - "$work/a.cpio" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
off, bad = 0, []
while off + 110 <= len(data):
    h = data[off:off + 110]
    assert h[:6] == b"070701", f"bad magic at {off}"
    namesize, filesize = int(h[94:102], 16), int(h[54:62], 16)
    name = data[off + 110:off + 110 + namesize - 1].decode()
    if name == "TRAILER!!!":
        break
    if int(h[46:54], 16) != 0:
        bad.append(name)
    off = (off + 110 + namesize + 3) & ~3
    off = (off + filesize + 3) & ~3
print(" ".join(bad) if bad else "ok")
PY
)"
if [ "$mtimes" = ok ]; then ok "all mtimes in the archive are 0"; else nok "entries with mtime != 0: $mtimes"; fi

"$here/build.sh" --debug --agent "$agent" -o "$work/d.cpio" >/dev/null || nok "build.sh --debug failed"
dlist="$(cpio -itv --quiet <"$work/d.cpio" 2>/dev/null)"
if grep -Eq ' bin/sh -> /bin/busybox$' <<<"$dlist" && grep -Eq ' bin/busybox$' <<<"$dlist" \
   && grep -Eq ' init$' <<<"$dlist"; then
  ok "--debug adds busybox and applet links, keeps /init"
else
  nok "--debug layout wrong"
fi

if out="$("$here/build.sh" --agent /bin/ls -o "$work/dyn.cpio" 2>&1)"; then
  nok "dynamic /init accepted"
elif grep -q "not a static ELF" <<<"$out" && [ ! -e "$work/dyn.cpio" ]; then
  ok "dynamic /init refused: ${out%%$'\n'*}"
else
  nok "dynamic /init refused without a clear message: $out"
fi
if "$here/build.sh" --agent "$work/missing" -o "$work/m.cpio" >/dev/null 2>&1; then nok "missing agent accepted"; else ok "missing agent refused"; fi

echo "guest-rootfs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
