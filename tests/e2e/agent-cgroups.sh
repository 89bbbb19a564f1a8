#!/usr/bin/env bash
# The agent's container tests that need cgroup v2 controllers (cpu, memory,
# pids): pids.max stops the 6th process, memory.max ends in an OOM kill that
# is reported as an OOM event before the exit, and update resources. On this
# project's hosts those controllers are bound to cgroup v1, so `cargo test`
# there prints SKIP for them; this suite runs the same test binary where the
# controllers exist (the runner VM's pure cgroup2, or a host with them) and
# fails instead of skipping (VMRT_REQUIRE_CGROUP_CONTROLLERS).
#
#   tests/e2e/agent-cgroups.sh --prepare   (host, after cargo test --release)
#       records the container_cgroups test binary in build/agent-cgroups-test
#   tests/e2e/agent-cgroups.sh             (guest-capable env, e.g. the runner)
#       runs it.
# Closing line: `agent-cgroups: N passed, M failed`; exit 0 iff M = 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
link=build/agent-cgroups-test

if [ "${1:-}" = --prepare ]; then
  exe=$(cargo test --release -p vmrt-agent --test container_cgroups --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "container_cgroups":
        print(m["executable"])')
  [ -n "$exe" ] || { echo "agent-cgroups: cannot find the container_cgroups test binary" >&2; exit 1; }
  mkdir -p build && ln -f "$exe" "$link" && echo "agent-cgroups: $link -> $exe"
  exit 0
fi

passed=0 failed=0
newest=$(ls -t target/x86_64-unknown-linux-gnu/release/deps/container_cgroups-* 2>/dev/null | grep -v '\.d$' | head -n 1)
if [ -x "$link" ] && [ -n "$newest" ] && [ "$newest" -nt "$link" ]; then
  echo "FAIL - $link is older than $newest (rebuilt since --prepare: run make unit-test)"
  failed=1
elif [ ! -x "$link" ]; then
  echo "FAIL - $link missing (make unit-test, or tests/e2e/agent-cgroups.sh --prepare)"
  failed=1
else
  for c in cpu memory pids; do
    grep -qw "$c" /sys/fs/cgroup/cgroup.controllers 2>/dev/null || echo "note: controller $c not at /sys/fs/cgroup"
  done
  # Each test is its own process: a test that hangs cannot take the others along.
  for t in $("$link" --list 2>/dev/null | sed -n 's/: test$//p'); do
    out=$(VMRT_REQUIRE_CGROUP_CONTROLLERS=1 timeout -k 5 300 "$link" --exact "$t" --nocapture --test-threads=1 2>&1); rc=$?
    if [ $rc -eq 0 ] && grep -q "test result: ok. 1 passed" <<<"$out"; then
      passed=$((passed + 1)); echo "ok   - $t"
    else
      failed=$((failed + 1)); echo "FAIL - $t (exit $rc)"; tail -n 30 <<<"$out" | sed 's/^/     /'
    fi
  done
  [ $((passed + failed)) -gt 0 ] || { failed=1; echo "FAIL - no tests listed by $link"; }
fi
echo "agent-cgroups: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
