# shellcheck shell=bash
# Private containerd harness for vmrt tests. Source it, then:
#
#   ctrd_start                 # start a private containerd 1.6 (returns when `ctr version` answers)
#   ctrd_import build/busybox-test.oci.tar
#   ctr_ run --rm docker.io/library/busybox-test:latest t1 /bin/echo hi
#   ctrd_stop                  # also run automatically on EXIT (trap installed by ctrd_start)
#
# Everything lives in one temp dir ($VMRT_CTRD_DIR, default /tmp/vmrt-ctrd.XXXXXX):
#   config.toml        generated containerd config (version 2)
#   root/ state/       containerd root and state
#   containerd.sock    gRPC address ($CTRD_SOCK); containerd.sock.ttrpc its ttrpc address
#   containerd.log     containerd's stdout+stderr
#   fifo/              ctr IO FIFOs (ctr_ adds --fifo-dir to run / tasks start / tasks exec)
#
# The config registers runtime `vmrt` (runtime_type io.containerd.vmrt.v2, option
# ConfigPath = $VMRT_SHIM_CONFIG, else $VMRT_CONFIG, else /etc/vmrt/config.toml)
# as the README shows (ctr itself ignores that CRI table: tests select the
# runtime with `ctr run --runtime io.containerd.vmrt.v2`, and the shim finds its
# config through VMRT_CONFIG, which containerd passes on to shims when it is
# exported before ctrd_start, see tests/lib/vmrt-config.sh), keeps runc on the cgroupfs
# driver (SystemdCgroup = false: PID 1 here is not systemd) and disables the CRI
# plugin so startup takes ~0.1 s. containerd finds `containerd-shim-vmrt-v2` on
# PATH: $VMRT_BIN_DIR (default target/x86_64-unknown-linux-gnu/release) is
# prepended to containerd's PATH.
#
# Knobs (environment): VMRT_CTRD_DIR, VMRT_CTRD_NS (namespace, default vmrt-test),
# VMRT_CTRD_TIMEOUT (seconds to wait for readiness, default 2 x VMRT_CTRD_OP_TIMEOUT),
# VMRT_CTRD_OP_TIMEOUT (bound on each harness ctr call, default 15, 120 in the
# runner VM), VMRT_BIN_DIR,
# VMRT_SHIM_CONFIG, VMRT_CTRD_LOG_LEVEL (default info), VMRT_CTRD_KEEP=1 (keep the
# temp dir after stop, for debugging), VMRT_CTRD_TMPFS=auto|1|0 (mount a tmpfs on
# the dir: auto = when it lies on overlayfs/9p/fuse/nfs, where overlayfs
# snapshots cannot live).
#
# Functions return non-zero with a message on stderr instead of exiting, except
# that the EXIT/INT/TERM trap always stops containerd. A caller that installs its
# own EXIT trap after ctrd_start must call ctrd_stop from it.
#
# containerd 1.6 puts shim sockets under /run/containerd/s/ and the runc shim
# keeps runc state under /run/containerd/runc/<namespace>/ even for a private
# instance; ctrd_stop removes only the entries this instance created there.

_CTRD_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_CTRD_REPO="$(cd "$_CTRD_LIB_DIR/../.." && pwd)"

CTRD_NS="${VMRT_CTRD_NS:-vmrt-test}"
# Bound (seconds) on each ctr call the harness makes and on containerd's exit
# after SIGTERM; startup waits twice that. The runner VM emulates the CPU (TCG),
# ~20x slower, hence the larger default there.
if [ -n "${VMRT_IN_RUNNER:-}" ]; then CTRD_OP_TIMEOUT="${VMRT_CTRD_OP_TIMEOUT:-120}"; else CTRD_OP_TIMEOUT="${VMRT_CTRD_OP_TIMEOUT:-15}"; fi
CTRD_DIR=""
CTRD_SOCK=""
CTRD_PID=""
CTRD_LOG=""
CTRD_FIFO_DIR=""
_CTRD_DIR_CREATED=0
_CTRD_RUN_PREEXIST=()   # /run/containerd entries that existed before ctrd_start

_ctrd_err() { echo "containerd.sh: $*" >&2; }

# Monotonic-enough wall clock in milliseconds (for timings printed by tests).
ctrd_now_ms() { date +%s%3N; }

# Arguments for ctr with IO FIFOs kept under CTRD_FIFO_DIR: `run`, `tasks start`
# and `tasks exec` otherwise leave FIFOs in /run/containerd/fifo (ctr run -d
# never removes them). Sets the array _CTRD_ARGS.
_ctrd_args() {
  _CTRD_ARGS=("$@")
  case " $* " in *" --fifo-dir "*|*" --fifo-dir="*) return ;; esac
  case "${1:-}" in
    run) _CTRD_ARGS=(run --fifo-dir "$CTRD_FIFO_DIR" "${@:2}") ;;
    t|task|tasks)
      case "${2:-}" in
        start|exec) _CTRD_ARGS=("$1" "$2" --fifo-dir "$CTRD_FIFO_DIR" "${@:3}") ;;
      esac ;;
  esac
}

# ctr against the private instance, in the test namespace (FIFOs in our dir).
ctr_() {
  [ -n "$CTRD_SOCK" ] || { _ctrd_err "ctr_: containerd not started"; return 1; }
  _ctrd_args "$@"
  ctr --address "$CTRD_SOCK" -n "$CTRD_NS" "${_CTRD_ARGS[@]}"
}

# Like ctr_ but bounded: ctr_timeout SECONDS ARGS... (exit 124 on timeout).
ctr_timeout() {
  [ -n "$CTRD_SOCK" ] || { _ctrd_err "ctr_timeout: containerd not started"; return 1; }
  local secs="$1"; shift
  _ctrd_args "$@"
  timeout "$secs" ctr --address "$CTRD_SOCK" -n "$CTRD_NS" "${_CTRD_ARGS[@]}"
}

_ctrd_write_config() {
  local bin_dir="$1" shim_cfg="$2"
  cat >"$CTRD_DIR/config.toml" <<EOF
version = 2
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"
# CRI is not needed by the tests (ctr talks to the containerd API directly) and
# is the slowest plugin to start; its runtime table below is kept as the
# documented way to register vmrt.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$CTRD_DIR/containerd.sock"

[ttrpc]
  address = "$CTRD_DIR/containerd.sock.ttrpc"

[debug]
  level = "${VMRT_CTRD_LOG_LEVEL:-info}"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CTRD_DIR/opt"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrt]
  runtime_type = "io.containerd.vmrt.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrt.options]
  ConfigPath = "$shim_cfg"
EOF
  # Shim binary dir recorded for debugging.
  echo "# containerd PATH prefix: $bin_dir" >>"$CTRD_DIR/config.toml"
}

# Start the private containerd. Sets CTRD_DIR, CTRD_SOCK, CTRD_PID, CTRD_LOG,
# CTRD_FIFO_DIR. Must run in the calling shell (not in $(...)) so the PID and
# the trap belong to it.
ctrd_start() {
  if [ -n "$CTRD_PID" ]; then _ctrd_err "ctrd_start: already running (pid $CTRD_PID)"; return 1; fi
  command -v containerd >/dev/null || { _ctrd_err "containerd not installed (tests/install-deps.sh)"; return 1; }
  command -v ctr >/dev/null || { _ctrd_err "ctr not installed (tests/install-deps.sh)"; return 1; }

  if [ -n "${VMRT_CTRD_DIR:-}" ]; then
    CTRD_DIR="$VMRT_CTRD_DIR"
    if [ ! -d "$CTRD_DIR" ]; then mkdir -p "$CTRD_DIR" || return 1; _CTRD_DIR_CREATED=1; fi
  else
    CTRD_DIR="$(mktemp -d /tmp/vmrt-ctrd.XXXXXX)" || return 1
    _CTRD_DIR_CREATED=1
  fi
  CTRD_DIR="$(cd "$CTRD_DIR" && pwd)"
  # containerd's overlayfs snapshotter cannot put upper dirs on overlayfs or 9p
  # (the runner VM's / is 9p + an overlay): give it a tmpfs of its own there.
  # ctrd_stop unmounts it with everything else under CTRD_DIR.
  local fstype
  fstype="$(stat -f -c %T "$CTRD_DIR")"
  case "${VMRT_CTRD_TMPFS:-auto}:$fstype" in
    1:*|auto:overlayfs|auto:v9fs|auto:9p|auto:fuseblk|auto:fuse|auto:nfs|auto:UNKNOWN*)
      mount -t tmpfs -o mode=0711 vmrt-ctrd "$CTRD_DIR" \
        || { _ctrd_err "ctrd_start: cannot mount a tmpfs on $CTRD_DIR ($fstype)"; return 1; } ;;
  esac
  # Unix socket paths are limited to 108 bytes.
  if [ "${#CTRD_DIR}" -gt 80 ]; then _ctrd_err "ctrd_start: dir path too long for sockets: $CTRD_DIR"; return 1; fi
  CTRD_SOCK="$CTRD_DIR/containerd.sock"
  CTRD_LOG="$CTRD_DIR/containerd.log"
  CTRD_FIFO_DIR="$CTRD_DIR/fifo"
  mkdir -p "$CTRD_DIR/root" "$CTRD_DIR/state" "$CTRD_DIR/opt" "$CTRD_FIFO_DIR"

  local bin_dir="${VMRT_BIN_DIR:-$_CTRD_REPO/target/x86_64-unknown-linux-gnu/release}"
  local shim_cfg="${VMRT_SHIM_CONFIG:-${VMRT_CONFIG:-/etc/vmrt/config.toml}}"
  _ctrd_write_config "$bin_dir" "$shim_cfg"

  _CTRD_RUN_PREEXIST=()
  local p
  for p in /run/containerd /run/containerd/s /run/containerd/fifo /run/containerd/runc \
           "/run/containerd/runc/$CTRD_NS" $(_ctrd_ns_cgroups); do
    [ -e "$p" ] && _CTRD_RUN_PREEXIST+=("$p")
  done

  trap 'ctrd_stop' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  PATH="$bin_dir:$PATH" containerd --config "$CTRD_DIR/config.toml" >"$CTRD_LOG" 2>&1 &
  CTRD_PID=$!
  echo "$CTRD_PID" >"$CTRD_DIR/containerd.pid"

  local timeout_s="${VMRT_CTRD_TIMEOUT:-$((CTRD_OP_TIMEOUT * 2))}"
  local deadline=$(( $(ctrd_now_ms) + timeout_s * 1000 ))
  while :; do
    if ! kill -0 "$CTRD_PID" 2>/dev/null; then
      _ctrd_err "containerd (pid $CTRD_PID) exited during startup; log tail:"
      tail -n 30 "$CTRD_LOG" >&2
      wait "$CTRD_PID" 2>/dev/null
      CTRD_PID=""
      return 1
    fi
    if [ -S "$CTRD_SOCK" ] && timeout 2 ctr --address "$CTRD_SOCK" version >/dev/null 2>&1; then
      return 0
    fi
    if [ "$(ctrd_now_ms)" -ge "$deadline" ]; then
      _ctrd_err "containerd did not answer on $CTRD_SOCK within ${timeout_s}s; log tail:"
      tail -n 30 "$CTRD_LOG" >&2
      ctrd_stop
      return 1
    fi
    sleep 0.02
  done
}

# Import an image tarball (OCI layout or docker save) into the test namespace.
ctrd_import() {
  [ -f "${1:-}" ] || { _ctrd_err "ctrd_import: no such image tarball: ${1:-}"; return 1; }
  ctr_ images import "$1" >/dev/null
}

# Shim socket path containerd 1.6 derives for (address, namespace, id):
# /run/containerd/s/<sha256(address/namespace/id)> (runtime/v2/shim/util_unix.go).
_ctrd_shim_socket() {
  printf '%s' "$CTRD_SOCK/$CTRD_NS/$1" | sha256sum | cut -d' ' -f1 | sed 's|^|/run/containerd/s/|'
}

# PIDs of processes whose command line contains STRING (e.g. our socket path,
# which only our shims carry). The pattern reaches grep on stdin so grep's own
# command line does not match. (No process substitution anywhere in this file:
# the runner VM has no /dev/fd.)
ctrd_pids_referring() {
  local f
  # shellcheck disable=SC2062  # the glob names files; the pattern comes from -f -
  printf '%s\n' "$1" | grep -laF -f - /proc/[0-9]*/cmdline 2>/dev/null | while IFS= read -r f; do
    f="${f#/proc/}"; echo "${f%/cmdline}"
  done
}

# Mount points under DIR, deepest first.
_ctrd_mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print length($5) " " $5 }' /proc/self/mountinfo \
    | sort -rn | cut -d' ' -f2-
}

# Parent cgroups runc creates for ctr's default cgroup path /<namespace>/<id>
# (v1 controllers and the v2 hierarchy, wherever mounted).
_ctrd_ns_cgroups() {
  find /sys/fs/cgroup -maxdepth 2 -type d -name "$CTRD_NS" 2>/dev/null
}

_ctrd_preexisted() {
  local p
  for p in "${_CTRD_RUN_PREEXIST[@]}"; do [ "$p" = "$1" ] && return 0; done
  return 1
}

# Stop everything the harness started; safe to call twice. Returns non-zero if
# something could not be cleaned (and says what).
ctrd_stop() {
  local rc=0 id ids=() pid m
  [ -n "$CTRD_DIR" ] || return 0
  if [ -n "$CTRD_PID" ] && kill -0 "$CTRD_PID" 2>/dev/null; then
    # Tasks: kill, then delete (delete -f kills what survived).
    for id in $(ctr_timeout "$CTRD_OP_TIMEOUT" tasks ls -q 2>/dev/null); do
      ctr_timeout "$CTRD_OP_TIMEOUT" tasks kill -s KILL "$id" >/dev/null 2>&1
    done
    mapfile -t ids <<<"$(ctr_timeout "$CTRD_OP_TIMEOUT" containers ls -q 2>/dev/null)"
    for id in $(ctr_timeout "$CTRD_OP_TIMEOUT" tasks ls -q 2>/dev/null); do
      ctr_timeout "$CTRD_OP_TIMEOUT" tasks delete -f "$id" >/dev/null 2>&1 || { _ctrd_err "could not delete task $id"; rc=1; }
    done
    for id in "${ids[@]}"; do
      [ -n "$id" ] || continue
      ctr_timeout "$CTRD_OP_TIMEOUT" containers rm "$id" >/dev/null 2>&1 || { _ctrd_err "could not delete container $id"; rc=1; }
    done
    kill -TERM "$CTRD_PID" 2>/dev/null
    for _ in $(seq 1 $((CTRD_OP_TIMEOUT * 20))); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$CTRD_PID" 2>/dev/null; then
      _ctrd_err "containerd (pid $CTRD_PID) ignored SIGTERM for ${CTRD_OP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$CTRD_PID" 2>/dev/null
    fi
    wait "$CTRD_PID" 2>/dev/null
  fi
  CTRD_PID=""
  # Tasks containerd could not delete (or containerd died first): runc tasks
  # are deleted with runc itself, from the state containerd left behind.
  local taskdir="$CTRD_DIR/state/io.containerd.runtime.v2.task/$CTRD_NS" b runc_root="/run/containerd/runc/$CTRD_NS"
  for b in "$taskdir"/*/; do
    [ -d "$b" ] || continue
    id="$(basename "$b")"
    ids+=("$id")
    if command -v runc >/dev/null && runc --root "$runc_root" state "$id" >/dev/null 2>&1; then
      _ctrd_err "task $id survived containerd; runc delete -f $id"
      runc --root "$runc_root" delete -f "$id" >/dev/null 2>&1 || _ctrd_err "runc delete -f $id failed"
      rc=1
    fi
  done
  # A shim whose task was deleted is still tearing its sandbox down (a
  # microVM's shutdown takes seconds under emulation): give it the operation
  # timeout to exit on its own. Shims still alive then outlive containerd; end
  # the ones bound to our address, by PID.
  local _w
  for _w in $(seq 1 $((CTRD_OP_TIMEOUT * 10))); do
    [ -z "$(ctrd_pids_referring "$CTRD_SOCK")" ] && break
    sleep 0.1
  done
  for pid in $(ctrd_pids_referring "$CTRD_SOCK"); do
    _ctrd_err "killing leftover shim pid $pid"
    kill -KILL "$pid" 2>/dev/null
    rc=1
  done
  for id in "${ids[@]}"; do [ -n "$id" ] && rm -f "$(_ctrd_shim_socket "$id")"; done
  # vmrt sandboxes the shim left behind (docs/contracts.md "Sandbox directory";
  # ctr's sandbox id is the container id): end the VMM by its recorded PID
  # (checked to be a vmrt-vmm), unmount, remove. A leftover is a shim bug: rc=1.
  local sb vpid
  for id in "${ids[@]}"; do
    case "$id" in ''|*/*|.|..) continue ;; esac
    sb="/run/vmrt/sandboxes/$id"
    [ -d "$sb" ] || continue
    _ctrd_err "vmrt sandbox $sb left behind; cleaning it"
    rc=1
    vpid="$(cat "$sb/vmm.pid" 2>/dev/null)"
    if [[ "$vpid" =~ ^[0-9]+$ ]] && grep -qaF vmrt-vmm "/proc/$vpid/cmdline" 2>/dev/null; then
      kill -KILL "$vpid" 2>/dev/null
    fi
    while IFS= read -r m; do
      [ -n "$m" ] && { umount -l "$m" 2>/dev/null || _ctrd_err "could not unmount $m"; }
    done <<<"$(_ctrd_mounts_under "$sb")"
    rm -rf --one-file-system "$sb"
  done
  while IFS= read -r m; do
    [ -n "$m" ] || continue
    umount -l "$m" 2>/dev/null || { _ctrd_err "could not unmount $m"; rc=1; }
  done <<<"$(_ctrd_mounts_under "$CTRD_DIR")"
  # Only empty directories we created under /run/containerd (never rm -r there).
  for m in "/run/containerd/runc/$CTRD_NS" /run/containerd/runc /run/containerd/fifo \
           /run/containerd/s /run/containerd; do
    _ctrd_preexisted "$m" || rmdir "$m" 2>/dev/null
  done
  for m in $(_ctrd_ns_cgroups); do
    _ctrd_preexisted "$m" || rmdir "$m" 2>/dev/null
  done
  if [ "${VMRT_CTRD_KEEP:-0}" = 1 ]; then
    echo "containerd.sh: kept $CTRD_DIR" >&2
  elif [ "$_CTRD_DIR_CREATED" = 1 ]; then
    rm -rf --one-file-system "$CTRD_DIR" || rc=1
  else
    rm -rf --one-file-system "${CTRD_DIR:?}"/{root,state,opt,fifo,config.toml,containerd.sock,containerd.sock.ttrpc,containerd.log,containerd.pid} || rc=1
  fi
  CTRD_DIR=""
  trap - EXIT INT TERM
  return $rc
}
