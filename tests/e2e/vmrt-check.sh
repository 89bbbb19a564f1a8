#!/usr/bin/env bash
# `vmrt check` on a host that can run sandboxes: inside the runner VM (nested SVM) or
# on a host with hardware KVM, with the kernel and initramfs of build/ configured, the
# shim and VMM on PATH and a containerd config that registers the handler, the check
# must report the hardware flavour and exit 0.
# Closing line: `vmrt-check: N passed, M failed`; exit status 0 iff M = 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/vmrt-config.sh
BIN=$PWD/target/x86_64-unknown-linux-gnu/release
passed=0 failed=0
ok()  { passed=$((passed + 1)); echo "ok   - $1"; }
bad() { failed=$((failed + 1)); echo "FAIL - $1${2:+: $2}"; }

tmp=$(mktemp -d /tmp/vmrt-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
vmrt_test_config "$tmp/vmrt.toml"
cat > "$tmp/containerd.toml" <<'TOML'
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrt]
runtime_type = "io.containerd.vmrt.v2"
TOML

out=$(PATH="$BIN:$PATH" "$BIN/vmrt" check --json --config "$tmp/vmrt.toml" \
        --containerd-config "$tmp/containerd.toml" 2>&1); rc=$?
flavour=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["flavour"])' 2>/dev/null)
fails=$(printf '%s' "$out" | python3 -c 'import json,sys; print(" ".join(i["id"]+": "+i["detail"] for i in json.load(sys.stdin)["items"] if i["status"]=="fail"))' 2>/dev/null)
case $flavour in
  svm|vmx) ok "vmrt check reports hardware KVM ($flavour)" ;;
  *) bad "vmrt check flavour" "got '$flavour'" ;;
esac
[ $rc -eq 0 ] && [ -n "$flavour" ] && [ -z "$fails" ] && ok "vmrt check exits 0 with no failing item" \
  || bad "vmrt check exit status" "rc=$rc failing: ${fails:-$out}"

# The human report says the same.
human=$(PATH="$BIN:$PATH" "$BIN/vmrt" check --config "$tmp/vmrt.toml" \
          --containerd-config "$tmp/containerd.toml" 2>&1); hrc=$?
[ $hrc -eq $rc ] && grep -qiE 'svm|vmx' <<<"$human" && ok "human report agrees (exit $hrc)" \
  || bad "human report" "rc=$hrc: $(head -c 400 <<<"$human")"

echo "vmrt-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
