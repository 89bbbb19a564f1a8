//! `vmrt check`: whether this host can run vmrt sandboxes, and why not.
//!
//! Every probe reads from paths held in [`HostPaths`] so tests can point them
//! at crafted files; [`run`] turns the findings into a [`Report`] whose items
//! each say what was found and, when it is a problem, what to do.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Guest kernel options the runtime relies on, checked in the `.config`
/// installed next to the kernel (`<kernel>.config`, or `config` in the same
/// directory). The build-time list is longer: see guest-kernel/build.sh.
pub const REQUIRED_KERNEL_OPTIONS: &[&str] = &[
    "PVH",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "FUSE_FS",
    "VIRTIO_FS",
    "CGROUPS",
    "MEMCG",
    "CGROUP_PIDS",
    "NAMESPACES",
    "PID_NS",
    "SECCOMP_FILTER",
];

/// The runtime type containerd must map to our shim.
pub const RUNTIME_TYPE: &str = "io.containerd.vmrt.v2";

/// Where the probes look. [`HostPaths::default`] is the real host.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The KVM device node, normally `/dev/kvm`.
    pub kvm: PathBuf,
    /// CPU flags source, normally `/proc/cpuinfo`.
    pub cpuinfo: PathBuf,
    /// Loaded kernel modules, normally `/sys/module`.
    pub sys_module: PathBuf,
    /// vmrt runtime configuration (TOML), normally `/etc/vmrt/config.toml`.
    pub vmrt_config: PathBuf,
    /// containerd configuration (TOML), normally `/etc/containerd/config.toml`.
    pub containerd_config: PathBuf,
    /// Directories searched for the shim and VMM binaries (normally `$PATH`).
    pub path: Vec<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: "/sys/module".into(),
            vmrt_config: "/etc/vmrt/config.toml".into(),
            containerd_config: "/etc/containerd/config.toml".into(),
            path: std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        }
    }
}

/// Outcome of one check item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Worth knowing; sandboxes can still run.
    Warn,
    /// Sandboxes cannot run until this is fixed.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Stable identifier, e.g. `kvm.device`, `kernel.options`.
    pub id: String,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (empty when nothing).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

/// How KVM is provided on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavour {
    /// Intel VT-x (`vmx`).
    Vmx,
    /// AMD-V (`svm`).
    Svm,
    /// kvm-pvm: KVM without hardware virtualization (`/sys/module/kvm_pvm`).
    KvmPvm,
    /// Neither: no usable KVM.
    None,
}

/// The whole answer of `vmrt check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// KVM flavour detected.
    pub flavour: KvmFlavour,
    /// Whether the host itself runs under a hypervisor (`hypervisor` CPU flag).
    pub nested: bool,
    /// Every item, in check order.
    pub items: Vec<Item>,
    /// True when no item failed: sandboxes can run.
    pub ok: bool,
}

fn item(id: &str, status: Status, detail: impl Into<String>, hint: impl Into<String>) -> Item {
    Item { id: id.into(), status, detail: detail.into(), hint: hint.into() }
}

pub use vmm::host::PVM_EXPLANATION;

/// Detects the KVM flavour from the CPU flags and loaded modules.
pub fn kvm_flavour(paths: &HostPaths) -> (KvmFlavour, bool) {
    let cpuinfo = fs::read_to_string(&paths.cpuinfo).unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let nested = flags.contains(&"hypervisor");
    let flavour = if vmm::host::is_kvm_pvm(&paths.sys_module) {
        KvmFlavour::KvmPvm
    } else if flags.contains(&"vmx") {
        KvmFlavour::Vmx
    } else if flags.contains(&"svm") {
        KvmFlavour::Svm
    } else {
        KvmFlavour::None
    };
    (flavour, nested)
}

/// Reads `KEY=value` lines of a kernel `.config`.
pub fn kernel_config_options(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The kernel `.config` that belongs to `kernel`: `<kernel>.config`, else
/// `config` beside it.
pub fn kernel_config_path(kernel: &Path) -> Option<PathBuf> {
    let mut beside = kernel.as_os_str().to_owned();
    beside.push(".config");
    let beside = PathBuf::from(beside);
    if beside.exists() {
        return Some(beside);
    }
    let dir_config = kernel.parent()?.join("config");
    dir_config.exists().then_some(dir_config)
}

fn readable(path: &Path) -> Result<(), String> {
    fs::File::open(path).map(|_| ()).map_err(|e| e.to_string())
}

/// Checks `/dev/kvm` and, when it opens, the KVM API version and capabilities.
fn check_kvm(paths: &HostPaths, items: &mut Vec<Item>) -> bool {
    let meta = match fs::metadata(&paths.kvm) {
        Ok(m) => m,
        Err(e) => {
            items.push(item(
                "kvm.device",
                Status::Fail,
                format!("{}: {e}", paths.kvm.display()),
                "load kvm_intel or kvm_amd (enable virtualization in the firmware), or run on a VM type with nested virtualization",
            ));
            return false;
        }
    };
    if !meta.file_type().is_char_device() {
        items.push(item("kvm.device", Status::Fail, format!("{} is not a character device", paths.kvm.display()), ""));
        return false;
    }
    let file = match fs::OpenOptions::new().read(true).write(true).open(&paths.kvm) {
        Ok(f) => f,
        Err(e) => {
            items.push(item(
                "kvm.device",
                Status::Fail,
                format!("{} cannot be opened read-write: {e}", paths.kvm.display()),
                "run the runtime as root or add its user to the group owning /dev/kvm",
            ));
            return false;
        }
    };
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `file` is an open /dev/kvm descriptor whose ownership moves into `Kvm`.
    let kvm = unsafe { kvm_ioctls::Kvm::from_raw_fd(file.into_raw_fd()) };
    let api = kvm.get_api_version();
    if api != 12 {
        items.push(item("kvm.api", Status::Fail, format!("KVM API version {api}, vmrt needs 12"), ""));
        return false;
    }
    items.push(item("kvm.device", Status::Ok, format!("{} opens read-write, KVM API version {api}", paths.kvm.display()), ""));
    let missing: Vec<&str> = REQUIRED_CAPS.iter().filter(|(cap, _)| !kvm.check_extension(*cap)).map(|(_, n)| *n).collect();
    if missing.is_empty() {
        items.push(item("kvm.capabilities", Status::Ok, format!("all {} required capabilities present", REQUIRED_CAPS.len()), ""));
        true
    } else {
        items.push(item("kvm.capabilities", Status::Fail, format!("missing KVM capabilities: {}", missing.join(", ")), "upgrade the host kernel"));
        false
    }
}

/// KVM capabilities the VMM needs (the VMM's own list), with their KVM_CAP_* names.
pub use vmm::builder::REQUIRED_CAPS;

/// The part of the vmrt config `vmrt check` reads.
#[derive(Debug, Default, serde::Deserialize)]
struct VmrtConfig {
    #[serde(default)]
    hypervisor: HypervisorSection,
}

#[derive(Debug, Default, serde::Deserialize)]
struct HypervisorSection {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    #[serde(default)]
    pvm_guest: bool,
}

/// What the configured guest kernel says about PVM.
#[derive(Debug, Default, Clone, Copy)]
struct PvmGuest {
    /// `pvm_guest = true` in the vmrt config: what the shim goes by.
    declared: bool,
    /// `CONFIG_PVM_GUEST=y` in the kernel's `.config`.
    built: bool,
}

/// Checks the configured guest kernel and initrd; returns what they say about PVM.
fn check_guest(paths: &HostPaths, items: &mut Vec<Item>) -> PvmGuest {
    let text = match fs::read_to_string(&paths.vmrt_config) {
        Ok(t) => t,
        Err(e) => {
            items.push(item(
                "config",
                Status::Fail,
                format!("{}: {e}", paths.vmrt_config.display()),
                "run `make install`, or point --config at a vmrt config.toml",
            ));
            return PvmGuest::default();
        }
    };
    let config: VmrtConfig = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            items.push(item("config", Status::Fail, format!("{}: {e}", paths.vmrt_config.display()), ""));
            return PvmGuest::default();
        }
    };
    items.push(item("config", Status::Ok, format!("{} parses", paths.vmrt_config.display()), ""));
    let mut pvm = PvmGuest { declared: config.hypervisor.pvm_guest, built: false };
    match &config.hypervisor.kernel {
        None => items.push(item("kernel", Status::Fail, "no [hypervisor] kernel configured", "set hypervisor.kernel")),
        Some(kernel) => match readable(kernel) {
            Err(e) => items.push(item("kernel", Status::Fail, format!("{}: {e}", kernel.display()), "build it with `make kernel` and `make install`")),
            Ok(()) => {
                items.push(item("kernel", Status::Ok, format!("{} is readable", kernel.display()), ""));
                pvm.built = check_kernel_options(kernel, items);
            }
        },
    }
    match &config.hypervisor.initrd {
        None => items.push(item("initrd", Status::Fail, "no [hypervisor] initrd configured", "set hypervisor.initrd")),
        Some(initrd) => match readable(initrd) {
            Err(e) => items.push(item("initrd", Status::Fail, format!("{}: {e}", initrd.display()), "build it with `make rootfs` and `make install`")),
            Ok(()) => items.push(item("initrd", Status::Ok, format!("{} is readable", initrd.display()), "")),
        },
    }
    pvm
}

/// Checks the kernel's `.config` for the options vmrt needs; returns whether it
/// has `CONFIG_PVM_GUEST=y`.
fn check_kernel_options(kernel: &Path, items: &mut Vec<Item>) -> bool {
    let Some(config_path) = kernel_config_path(kernel) else {
        items.push(item(
            "kernel.options",
            Status::Fail,
            format!("no kernel .config next to {} (looked for {}.config and config)", kernel.display(), kernel.display()),
            "install the .config the kernel was built with beside it",
        ));
        return false;
    };
    let options = match fs::read_to_string(&config_path) {
        Ok(t) => kernel_config_options(&t),
        Err(e) => {
            items.push(item("kernel.options", Status::Fail, format!("{}: {e}", config_path.display()), ""));
            return false;
        }
    };
    let pvm = options.get("PVM_GUEST").map(String::as_str) == Some("y");
    let missing: Vec<&str> = REQUIRED_KERNEL_OPTIONS
        .iter()
        .copied()
        .filter(|o| options.get(*o).map(String::as_str) != Some("y"))
        .collect();
    if missing.is_empty() {
        items.push(item("kernel.options", Status::Ok, format!("{}: all {} required options set", config_path.display(), REQUIRED_KERNEL_OPTIONS.len()), ""));
    } else {
        items.push(item(
            "kernel.options",
            Status::Fail,
            format!("{}: missing CONFIG_{}", config_path.display(), missing.join(", CONFIG_")),
            "rebuild the guest kernel with guest-kernel/build.sh",
        ));
    }
    pvm
}

/// Checks that containerd's config maps a runtime to `io.containerd.vmrt.v2`
/// for the CRI plugin. `ctr run --runtime io.containerd.vmrt.v2` needs no
/// entry, only the shim on containerd's PATH (checked separately).
fn check_containerd(paths: &HostPaths, items: &mut Vec<Item>) {
    let text = match fs::read_to_string(&paths.containerd_config) {
        Ok(t) => t,
        Err(e) => {
            items.push(item(
                "containerd.cri",
                Status::Fail,
                format!("{}: {e}", paths.containerd_config.display()),
                "register the runtime as shown in the README (runtime_type = \"io.containerd.vmrt.v2\")",
            ));
            return;
        }
    };
    let value: toml::Value = match toml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            items.push(item("containerd.cri", Status::Fail, format!("{}: {e}", paths.containerd_config.display()), ""));
            return;
        }
    };
    let runtimes = value
        .get("plugins")
        .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
        .and_then(|c| c.get("containerd"))
        .and_then(|c| c.get("runtimes"))
        .and_then(|r| r.as_table());
    let handlers: Vec<&String> = runtimes
        .map(|r| {
            r.iter()
                .filter(|(_, v)| v.get("runtime_type").and_then(|t| t.as_str()) == Some(RUNTIME_TYPE))
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    if handlers.is_empty() {
        items.push(item(
            "containerd.cri",
            Status::Fail,
            format!("{} registers no CRI runtime with runtime_type = \"{RUNTIME_TYPE}\"", paths.containerd_config.display()),
            "add [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmrt] runtime_type = \"io.containerd.vmrt.v2\" (see README)",
        ));
    } else {
        let names: Vec<&str> = handlers.iter().map(|s| s.as_str()).collect();
        items.push(item("containerd.cri", Status::Ok, format!("CRI runtime handler(s) {} use {RUNTIME_TYPE}", names.join(", ")), ""));
    }
}

/// Finds `name` in the search path.
pub fn which(path: &[PathBuf], name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.iter()
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

fn check_binary(paths: &HostPaths, id: &str, name: &str, version_flag: &str, items: &mut Vec<Item>) {
    match which(&paths.path, name) {
        None => items.push(item(id, Status::Fail, format!("{name} not found on PATH"), "run `make install`")),
        Some(bin) => {
            let version = std::process::Command::new(&bin)
                .arg(version_flag)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "version unknown".into());
            items.push(item(id, Status::Ok, format!("{} ({version})", bin.display()), ""));
        }
    }
}

/// Runs every check against `paths`.
pub fn run(paths: &HostPaths) -> Report {
    let mut items = Vec::new();
    let (flavour, nested) = kvm_flavour(paths);
    let kvm_ok = check_kvm(paths, &mut items);
    let flavour_text = match flavour {
        KvmFlavour::Vmx => "hardware virtualization: Intel VT-x (vmx)",
        KvmFlavour::Svm => "hardware virtualization: AMD-V (svm)",
        KvmFlavour::KvmPvm => "kvm-pvm (/sys/module/kvm_pvm): KVM without hardware virtualization",
        KvmFlavour::None => "no vmx/svm CPU flag and no kvm_pvm module",
    };
    let where_ = if nested { ", nested (the host runs under a hypervisor)" } else { ", bare metal" };
    let pvm_guest = check_guest(paths, &mut items);
    match flavour {
        KvmFlavour::Vmx | KvmFlavour::Svm => items.push(item("kvm.flavour", Status::Ok, format!("{flavour_text}{where_}"), "")),
        KvmFlavour::KvmPvm if pvm_guest.declared => items.push(item("kvm.flavour", Status::Warn, format!("{flavour_text}; the guest kernel is declared PVM-enabled"), "")),
        KvmFlavour::KvmPvm if pvm_guest.built => items.push(item(
            "kvm.flavour",
            Status::Fail,
            format!("{flavour_text}: the guest kernel's .config has CONFIG_PVM_GUEST=y, but the vmrt config does not declare it, so the shim refuses every sandbox"),
            "set `pvm_guest = true` under [hypervisor] in the vmrt config",
        )),
        KvmFlavour::KvmPvm => items.push(item(
            "kvm.flavour",
            Status::Fail,
            format!("{flavour_text}{where_}: {PVM_EXPLANATION}"),
            "use a host with VT-x/AMD-V (bare metal or nested), or a PVM-enabled guest kernel; tests on such hosts run through tests/runner-vm/run",
        )),
        KvmFlavour::None if kvm_ok => items.push(item("kvm.flavour", Status::Warn, flavour_text, "")),
        KvmFlavour::None => items.push(item("kvm.flavour", Status::Fail, flavour_text, "enable VT-x/AMD-V or nested virtualization")),
    }
    check_containerd(paths, &mut items);
    check_binary(paths, "shim", "containerd-shim-vmrt-v2", "-v", &mut items);
    check_binary(paths, "vmm", "vmrt-vmm", "--version", &mut items);
    let ok = items.iter().all(|i| i.status != Status::Fail);
    Report { flavour, nested, items, ok }
}

/// Human-readable report, one line per item plus hints.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for i in &report.items {
        let tag = match i.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("[{tag}] {:<18} {}\n", i.id, i.detail));
        if !i.hint.is_empty() && i.status != Status::Ok {
            out.push_str(&format!("       {:<18} → {}\n", "", i.hint));
        }
    }
    out.push_str(if report.ok {
        "vmrt can run sandboxes on this host\n"
    } else {
        "vmrt cannot run sandboxes on this host (see FAIL lines)\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_config_parsing_reads_set_options_only() {
        let opts = kernel_config_options("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n");
        assert_eq!(opts.get("A").map(String::as_str), Some("y"));
        assert!(!opts.contains_key("B"));
        assert_eq!(opts.get("C").map(String::as_str), Some("\"x\""));
    }

    #[test]
    fn flavour_prefers_kvm_pvm_over_cpu_flags() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cpuinfo"), "flags\t\t: fpu svm hypervisor\n").unwrap();
        fs::create_dir_all(dir.path().join("module/kvm_pvm")).unwrap();
        let mut paths = HostPaths::default();
        paths.cpuinfo = dir.path().join("cpuinfo");
        paths.sys_module = dir.path().join("module");
        assert_eq!(kvm_flavour(&paths), (KvmFlavour::KvmPvm, true));
        fs::remove_dir(dir.path().join("module/kvm_pvm")).unwrap();
        assert_eq!(kvm_flavour(&paths), (KvmFlavour::Svm, true));
    }
}
