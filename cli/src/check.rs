//! `vmrt check`: whether this host can run vmrt sandboxes, and why not.
//!
//! Every probe reads from paths held in [`HostPaths`] so tests can point them
//! at crafted files; [`run`] turns the findings into a [`Report`] whose items
//! each say what was found and, when it is a problem, what to do.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vmrt_config::Config;

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
    /// procfs, normally `/proc`: where the running containerd's `PATH` is read.
    pub proc: PathBuf,
    /// The vmrt runtime configuration named explicitly (`--config`); `None`
    /// means what the shim would read: `VMRT_CONFIG` (below), else
    /// [`vmrt_config::DEFAULT_CONFIG_PATH`], whose absence means all defaults.
    pub vmrt_config: Option<PathBuf>,
    /// The value of `VMRT_CONFIG` (normally from the environment).
    pub vmrt_config_env: Option<String>,
    /// containerd configuration (TOML), normally `/etc/containerd/config.toml`.
    pub containerd_config: PathBuf,
    /// Directories searched for the shim and VMM binaries when no running
    /// containerd tells its own `PATH` (normally `$PATH`).
    pub path: Vec<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: vmm::host::SYS_MODULE.into(),
            proc: "/proc".into(),
            vmrt_config: None,
            vmrt_config_env: std::env::var(vmrt_config::CONFIG_ENV).ok(),
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

/// `crw-rw---- root:kvm`-style description of a file's mode and owner.
fn mode_and_owner(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    let bits: String = (0..9)
        .map(|i| {
            let set = mode & (0o400 >> i) != 0;
            if !set {
                '-'
            } else {
                ['r', 'w', 'x'][i % 3]
            }
        })
        .collect();
    let user = nix::unistd::User::from_uid(meta.uid().into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| meta.uid().to_string());
    let group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| meta.gid().to_string());
    format!("c{bits} {user}:{group}")
}

/// Checks `/dev/kvm` (presence, mode and owner, read-write access, API
/// version) and then each capability of [`REQUIRED_CAPS`] as its own item
/// `kvm.cap.<KVM_CAP_NAME>`.
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
    let perms = mode_and_owner(&meta);
    let file = match fs::OpenOptions::new().read(true).write(true).open(&paths.kvm) {
        Ok(f) => f,
        Err(e) => {
            items.push(item(
                "kvm.device",
                Status::Fail,
                format!("{} ({perms}) cannot be opened read-write by uid {}: {e}", paths.kvm.display(), nix::unistd::geteuid()),
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
        items.push(item("kvm.api", Status::Fail, format!("KVM API version {api}, vmrt needs 12"), "upgrade the host kernel"));
        return false;
    }
    items.push(item("kvm.device", Status::Ok, format!("{} ({perms}) opens read-write, KVM API version {api}", paths.kvm.display()), ""));
    let mut all = true;
    for (cap, name) in REQUIRED_CAPS {
        let id = format!("kvm.cap.{name}");
        if kvm.check_extension(*cap) {
            items.push(item(&id, Status::Ok, "present", ""));
        } else {
            all = false;
            items.push(item(&id, Status::Fail, format!("{name} is not available; vmrt-vmm needs it"), "upgrade the host kernel"));
        }
    }
    all
}

/// KVM capabilities the VMM needs (the VMM's own list), with their KVM_CAP_* names.
pub use vmm::builder::REQUIRED_CAPS;

/// What the configured guest kernel says about PVM.
#[derive(Debug, Default, Clone, Copy)]
struct PvmGuest {
    /// `pvm_guest = true` in the vmrt config: what the shim goes by.
    declared: bool,
    /// `CONFIG_PVM_GUEST=y` in the kernel's `.config`.
    built: bool,
}

/// Reads the vmrt config exactly as the shim does (same file choice, same
/// parser, same validation; `VMRT_CONFIG` from a running containerd's
/// environment, which the shim inherits) and returns it, or `None` when the shim would
/// refuse it; the `config` item says which file and why.
fn check_config(paths: &HostPaths, containerd: Option<&RunningContainerd>, items: &mut Vec<Item>) -> Option<Config> {
    // The shim inherits containerd's environment: with a containerd running,
    // its VMRT_CONFIG counts, not ours.
    let (env, env_source) = match containerd {
        Some(c) => (c.vmrt_config.clone(), format!("VMRT_CONFIG of containerd (pid {})", c.pid)),
        None => (paths.vmrt_config_env.clone(), "VMRT_CONFIG".to_string()),
    };
    let (path, explicit) = vmrt_config::resolve_path(paths.vmrt_config.as_deref(), env.as_deref());
    let source = match (explicit, paths.vmrt_config.is_some()) {
        (true, true) => "--config".to_string(),
        (true, false) => env_source,
        (false, _) => "default path".to_string(),
    };
    let config = match Config::load_file(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            items.push(item("config", Status::Fail, format!("{e} ({source})"), "fix the file; the shim refuses every Create with this same error"));
            return None;
        }
    };
    if let Err(e) = config.validate_values() {
        items.push(item("config", Status::Fail, format!("{} ({source}): {e}", path.display()), "the shim refuses every Create with this same error"));
        return None;
    }
    let what = if path.exists() { "parses and validates" } else { "does not exist: the shim uses its defaults" };
    items.push(item("config", Status::Ok, format!("{} ({source}) {what}", path.display()), ""));
    Some(config)
}

/// Checks the configured guest kernel and initrd; returns what they say about PVM.
fn check_guest(config: &Config, items: &mut Vec<Item>) -> PvmGuest {
    let mut pvm = PvmGuest { declared: config.hypervisor.pvm_guest, built: false };
    let kernel = &config.hypervisor.kernel;
    let usable = config.check_kernel().map_err(|e| e.to_string()).and_then(|()| {
        readable(kernel).map_err(|e| format!("hypervisor.kernel = {}: {e}", kernel.display()))
    });
    match usable {
        Err(e) => items.push(item("kernel", Status::Fail, e, "build it with `make kernel` and `make install`")),
        Ok(()) => {
            items.push(item("kernel", Status::Ok, format!("{} is readable", kernel.display()), ""));
            pvm.built = check_kernel_options(kernel, items);
        }
    }
    match &config.hypervisor.initrd {
        None => items.push(item(
            "initrd",
            Status::Fail,
            "hypervisor.initrd is not set: the guest would have no agent",
            "set hypervisor.initrd to the initramfs whose /init is vmrt-agent",
        )),
        Some(initrd) => match config.check_initrd().map_err(|e| e.to_string()).and_then(|()| {
            readable(initrd).map_err(|e| format!("hypervisor.initrd = {}: {e}", initrd.display()))
        }) {
            Err(e) => items.push(item("initrd", Status::Fail, e, "build it with `make rootfs` and `make install`")),
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

/// Where each containerd config version keeps the CRI runtimes: version 1
/// (`plugins.cri`), version 2 (`plugins."io.containerd.grpc.v1.cri"`, containerd
/// 1.x) and version 3 (`plugins."io.containerd.cri.v1.runtime"`, containerd 2.x).
const CRI_RUNTIME_TABLES: &[&str] = &["cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"];

/// The CRI runtime handlers of one parsed containerd config whose
/// `runtime_type` is [`RUNTIME_TYPE`].
pub fn vmrt_cri_handlers(config: &toml::Value) -> Vec<String> {
    let mut handlers = Vec::new();
    for plugin in CRI_RUNTIME_TABLES {
        let runtimes = config
            .get("plugins")
            .and_then(|p| p.get(*plugin))
            .and_then(|c| c.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.as_table());
        for (name, runtime) in runtimes.into_iter().flatten() {
            if runtime.get("runtime_type").and_then(|t| t.as_str()) == Some(RUNTIME_TYPE) {
                handlers.push(name.clone());
            }
        }
    }
    handlers
}

/// The files a containerd config's `imports` names, resolved as containerd
/// does: relative paths against the importing file's directory, glob
/// patterns expanded, in order.
fn containerd_imports(config: &toml::Value, file: &Path) -> Vec<PathBuf> {
    let base = file.parent().unwrap_or(Path::new("/"));
    let patterns = config.get("imports").and_then(|i| i.as_array()).cloned().unwrap_or_default();
    let mut files = Vec::new();
    for p in patterns.iter().filter_map(|p| p.as_str()) {
        let p = if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        // A plain path must exist (containerd refuses to start otherwise); a
        // pattern may match nothing.
        if !p.to_string_lossy().contains(['*', '?', '[']) {
            files.push(p);
            continue;
        }
        match glob::glob(&p.to_string_lossy()) {
            Ok(matches) => files.extend(matches.flatten()),
            Err(_) => files.push(p),
        }
    }
    files
}

/// Checks that containerd's config (with its `imports`) maps a CRI runtime
/// handler to `io.containerd.vmrt.v2`, so a Kubernetes RuntimeClass can name it.
fn check_containerd(paths: &HostPaths, items: &mut Vec<Item>) {
    let mut todo = vec![paths.containerd_config.clone()];
    let mut seen = Vec::new();
    let mut handlers = Vec::new();
    while let Some(file) = todo.pop() {
        if seen.contains(&file) || seen.len() > 64 {
            continue;
        }
        seen.push(file.clone());
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                items.push(item(
                    "containerd.cri",
                    Status::Fail,
                    format!("{}: {e}", file.display()),
                    "register the runtime as shown in the README (runtime_type = \"io.containerd.vmrt.v2\")",
                ));
                return;
            }
        };
        let value: toml::Value = match toml::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string().trim().replace('\n', " ");
                items.push(item("containerd.cri", Status::Fail, format!("{}: {msg}", file.display()), "containerd itself will not start with this file"));
                return;
            }
        };
        handlers.extend(vmrt_cri_handlers(&value));
        let mut imports = containerd_imports(&value, &file);
        imports.reverse();
        todo.extend(imports);
    }
    let files: Vec<String> = seen.iter().map(|f| f.display().to_string()).collect();
    if handlers.is_empty() {
        items.push(item(
            "containerd.cri",
            Status::Fail,
            format!("{} registers no CRI runtime with runtime_type = \"{RUNTIME_TYPE}\"", files.join(" + ")),
            "add [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmrt] runtime_type = \"io.containerd.vmrt.v2\" (see README)",
        ));
    } else {
        items.push(item("containerd.cri", Status::Ok, format!("CRI runtime handler(s) {} use {RUNTIME_TYPE} ({})", handlers.join(", "), files.join(" + ")), ""));
    }
}

/// What the shim inherits from a running containerd.
#[derive(Debug, Clone)]
pub struct RunningContainerd {
    /// Its pid.
    pub pid: u32,
    /// Its `PATH`: where it finds `containerd-shim-vmrt-v2` for
    /// `ctr run --runtime io.containerd.vmrt.v2` (and for CRI).
    pub path: Vec<PathBuf>,
    /// Its `VMRT_CONFIG`, which the shim then reads.
    pub vmrt_config: Option<String>,
}

/// The first process (lowest pid) whose `comm` is `containerd`, with what
/// its `environ` says; `None` when none runs or its environment cannot be read.
pub fn running_containerd(proc: &Path) -> Option<RunningContainerd> {
    let mut pids: Vec<u32> = fs::read_dir(proc).ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    pids.into_iter().find_map(|pid| {
        let dir = proc.join(pid.to_string());
        if fs::read_to_string(dir.join("comm")).ok()?.trim_end() != "containerd" {
            return None;
        }
        let environ = fs::read(dir.join("environ")).ok()?;
        let var = |name: &[u8]| environ.split(|b| *b == 0).find_map(|v| v.strip_prefix(name)).map(<[u8]>::to_vec);
        use std::os::unix::ffi::OsStrExt;
        let path = var(b"PATH=")?;
        Some(RunningContainerd {
            pid,
            path: std::env::split_paths(std::ffi::OsStr::from_bytes(&path)).collect(),
            vmrt_config: var(b"VMRT_CONFIG=").map(|v| String::from_utf8_lossy(&v).into_owned()),
        })
    })
}

/// Finds `name` in the search path.
pub fn which(path: &[PathBuf], name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.iter()
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// First line of `bin flag`'s stdout, or "version unknown".
fn version_of(bin: &Path, flag: &str) -> String {
    std::process::Command::new(bin)
        .arg(flag)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "version unknown".into())
}

/// Checks the shim on the `PATH` containerd uses, and the VMM binary the shim
/// would start (`hypervisor.path`, else next to the shim, else that `PATH`).
fn check_binaries(paths: &HostPaths, containerd: Option<&RunningContainerd>, config: Option<&Config>, items: &mut Vec<Item>) {
    let (path, whose) = match containerd {
        Some(c) => (c.path.clone(), format!("the PATH of containerd (pid {})", c.pid)),
        None => (paths.path.clone(), "this PATH (no running containerd found)".to_string()),
    };
    let shim = which(&path, SHIM_BINARY);
    match &shim {
        None => items.push(item("shim", Status::Fail, format!("{SHIM_BINARY} not found on {whose}"), "run `make install`, or put the shim in a directory on containerd's PATH")),
        Some(bin) => items.push(item("shim", Status::Ok, format!("{} ({}), on {whose}", bin.display(), version_of(bin, "-v")), "")),
    }
    let Some(config) = config else {
        items.push(item("vmm", Status::Fail, "not looked up: the vmrt config is refused (see `config`)", ""));
        return;
    };
    let shim_dir = shim.as_deref().and_then(Path::parent);
    let search = std::env::join_paths(&path).unwrap_or_default();
    match config.vmm_path_in(shim_dir, &search) {
        Ok(bin) => items.push(item("vmm", Status::Ok, format!("{} ({})", bin.display(), version_of(&bin, "--version")), "")),
        Err(e) => items.push(item("vmm", Status::Fail, e.to_string(), "run `make install`, or set hypervisor.path")),
    }
}

/// The shim binary containerd derives from `io.containerd.vmrt.v2`.
pub const SHIM_BINARY: &str = "containerd-shim-vmrt-v2";

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
    let containerd = running_containerd(&paths.proc);
    let config = check_config(paths, containerd.as_ref(), &mut items);
    let pvm_guest = config.as_ref().map(|c| check_guest(c, &mut items)).unwrap_or_default();
    match flavour {
        KvmFlavour::Vmx | KvmFlavour::Svm => items.push(item("kvm.flavour", Status::Ok, format!("{flavour_text}{where_}"), "")),
        KvmFlavour::KvmPvm if pvm_guest.declared && pvm_guest.built => items.push(item(
            "kvm.flavour",
            Status::Ok,
            format!("{flavour_text}; the guest kernel is PVM-enabled (CONFIG_PVM_GUEST=y) and declared so"),
            "",
        )),
        KvmFlavour::KvmPvm if pvm_guest.declared => items.push(item(
            "kvm.flavour",
            Status::Fail,
            format!("{flavour_text}: the vmrt config declares the guest kernel PVM-enabled (pvm_guest = true), but its .config has no CONFIG_PVM_GUEST=y: {PVM_EXPLANATION}"),
            "install a guest kernel built with CONFIG_PVM_GUEST=y and its .config beside it",
        )),
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
    check_binaries(paths, containerd.as_ref(), config.as_ref(), &mut items);
    let ok = items.iter().all(|i| i.status != Status::Fail);
    Report { flavour, nested, items, ok }
}

/// Human-readable report, one line per item plus hints.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let width = report.items.iter().map(|i| i.id.len()).max().unwrap_or(0);
    for i in &report.items {
        let tag = match i.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("[{tag}] {:<width$} {}\n", i.id, i.detail));
        if !i.hint.is_empty() && i.status != Status::Ok {
            out.push_str(&format!("       {:<width$} → {}\n", "", i.hint));
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
