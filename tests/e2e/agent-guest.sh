#!/usr/bin/env bash
# The guest agent as PID 1 of a real microVM: the agent_in_vm integration test
# boots vmrt-vmm with build/vmlinux and an initramfs of the current agent and
# talks to it over hybrid vsock (Version, Health, the stdio port, Shutdown →
# VMM exit 0); then `vmrt agent stress` sends 1000 requests on one connection
# and opens 50 concurrent connections to a booted agent.
set -uo pipefail
cd "$(dirname "$0")/../.."
rel=target/x86_64-unknown-linux-gnu/release
passed=0 failed=0
check() { if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "ok   - $1"; else failed=$((failed + 1)); echo "FAIL - $1"; fi; }

bin=$(ls -t $rel/deps/agent_in_vm-* 2>/dev/null | grep -v '\.d$' | head -n 1)
if [ -z "$bin" ]; then
  echo "agent-guest: agent_in_vm test binary missing (run cargo test --release --workspace --no-run first)"
  check "agent_in_vm test binary present" 1
else
  VMRT_E2E_PATH=direct "$bin" --nocapture; check "agent as PID 1 in a microVM (agent_in_vm)" $?
fi

dir=$(mktemp -d)
trap 'kill "$vmm_pid" 2>/dev/null; wait "$vmm_pid" 2>/dev/null; rm -rf "$dir"' EXIT
cat > "$dir/vm.json" <<JSON
{ "vcpus": 1, "memory_mib": 256, "kernel": "$PWD/build/vmlinux", "initrd": "$PWD/build/initramfs.cpio",
  "cmdline": "console=ttyS0 quiet", "serial": { "type": "file", "path": "$dir/console.log" },
  "vsock": { "guest_cid": 3, "uds_path": "$dir/vsock.sock" } }
JSON
$rel/vmrt-vmm --config "$dir/vm.json" >"$dir/vmm.log" 2>&1 &
vmm_pid=$!
out=$($rel/vmrt agent --uds "$dir/vsock.sock" --timeout-ms 120000 stress --requests 1000 --connections 50 2>&1)
rc=$?
echo "$out"
check "1000 requests on one connection and 50 concurrent connections over vsock" $rc
[ $rc -eq 0 ] || tail -n 30 "$dir/console.log"
# The agent measures itself: Rss (smaps_rollup) in the guest and its start-to-ready time.
v=$($rel/vmrt agent --uds "$dir/vsock.sock" --timeout-ms 60000 version 2>&1)
echo "$v"
rss=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["agent_rss_kib"])' "$v" 2>/dev/null)
[ "${rss:-0}" -gt 0 ] 2>/dev/null; check "vmrt agent version reports the agent's RSS (${rss:-none} KiB)" $?
echo "agent-guest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
