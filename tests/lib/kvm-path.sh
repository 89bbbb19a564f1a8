# Sourced by every e2e script that boots a guest. Decides how guests can run:
#
#   direct  this host's /dev/kvm boots standard Linux guests: hardware
#           virtualisation (vmx or svm in /proc/cpuinfo) with kvm_intel or
#           kvm_amd loaded, and not kvm-pvm (/sys/module/kvm_pvm absent).
#   runner  anything else: guests run inside the runner VM (tests/runner-vm/run,
#           QEMU TCG with nested SVM), which itself always reports `direct`.
#
# VMRT_E2E_PATH=direct|runner forces a path on the host; inside the runner VM
# (VMRT_IN_RUNNER set by tests/runner-vm/run) the answer is always `direct`, so
# a runner never starts another runner.
#
# Functions:
#   vmrt_kvm_path        prints `direct` or `runner` on stdout; the reason goes
#                        to stderr (once per shell)
#   vmrt_kvm_path_reason prints the reason only
#   vmrt_run_e2e CMD...  runs CMD here (direct) or in the runner VM; returns its
#                        exit status (124 on runner timeout, 125 runner failure)

_vmrt_kvm_path_top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Sets _vmrt_kvm_path_choice and _vmrt_kvm_path_why.
_vmrt_kvm_path_decide() {
  local hw='' mod=''
  if [ -n "${VMRT_IN_RUNNER:-}" ]; then
    _vmrt_kvm_path_choice=direct
    _vmrt_kvm_path_why="inside the runner VM (VMRT_IN_RUNNER=1)"
    if [ ! -c /dev/kvm ]; then _vmrt_kvm_path_why+="; WARNING: /dev/kvm is missing"; fi
    return
  fi
  case ${VMRT_E2E_PATH:-} in
    direct | runner)
      _vmrt_kvm_path_choice=$VMRT_E2E_PATH
      _vmrt_kvm_path_why="forced by VMRT_E2E_PATH=$VMRT_E2E_PATH"
      return ;;
    "") ;;
    *) echo "kvm-path: ignoring VMRT_E2E_PATH=$VMRT_E2E_PATH (want direct or runner)" >&2 ;;
  esac
  grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null && hw=1
  { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && mod=1
  if [ -d /sys/module/kvm_pvm ]; then
    _vmrt_kvm_path_choice=runner
    _vmrt_kvm_path_why="/dev/kvm is kvm-pvm (/sys/module/kvm_pvm): it cannot boot standard guests"
  elif [ ! -c /dev/kvm ]; then
    _vmrt_kvm_path_choice=runner
    _vmrt_kvm_path_why="no /dev/kvm"
  elif [ -z "$hw" ]; then
    _vmrt_kvm_path_choice=runner
    _vmrt_kvm_path_why="no vmx/svm flag in /proc/cpuinfo"
  elif [ -z "$mod" ]; then
    _vmrt_kvm_path_choice=runner
    _vmrt_kvm_path_why="neither kvm_intel nor kvm_amd is loaded"
  else
    _vmrt_kvm_path_choice=direct
    _vmrt_kvm_path_why="hardware KVM ($( [ -d /sys/module/kvm_intel ] && echo kvm_intel || echo kvm_amd))"
  fi
}

vmrt_kvm_path_reason() {
  _vmrt_kvm_path_decide
  echo "$_vmrt_kvm_path_why"
}

vmrt_kvm_path() {
  _vmrt_kvm_path_decide
  if [ "${_vmrt_kvm_path_said:-}" != "$_vmrt_kvm_path_choice" ]; then
    echo "kvm-path: $_vmrt_kvm_path_choice ($_vmrt_kvm_path_why)" >&2
    _vmrt_kvm_path_said=$_vmrt_kvm_path_choice
  fi
  echo "$_vmrt_kvm_path_choice"
}

vmrt_run_e2e() {
  if [ $# -eq 0 ]; then
    echo "usage: vmrt_run_e2e CMD [ARG...]" >&2
    return 2
  fi
  # (not through $(...): the "said" marker must stay in this shell)
  _vmrt_kvm_path_decide
  if [ "${_vmrt_kvm_path_said:-}" != "$_vmrt_kvm_path_choice" ]; then
    echo "kvm-path: $_vmrt_kvm_path_choice ($_vmrt_kvm_path_why)" >&2
    _vmrt_kvm_path_said=$_vmrt_kvm_path_choice
  fi
  if [ "$_vmrt_kvm_path_choice" = direct ]; then
    "$@"
  else
    "$_vmrt_kvm_path_top/tests/runner-vm/run" "$@"
  fi
}
