//! The vmrt runtime configuration, `/etc/vmrt/config.toml` (TOML, serde),
//! as the shim reads it at Create and `vmrt check` reads it to tell whether
//! the shim would accept it. One parser, so the two never disagree.
//!
//! Where the file comes from, first match wins:
//! 1. the runtime option `ConfigPath` (containerd's `runtimeoptions.v1.Options.config_path`
//!    in `CreateTaskRequest.options`, decoded by the shim), or `vmrt check --config`;
//! 2. the environment variable `VMRT_CONFIG`;
//! 3. the default path [`DEFAULT_CONFIG_PATH`].
//!
//! An explicitly named file (1 or 2) must exist; a missing default file means
//! "all defaults". Unknown keys are rejected. [`Config::validate`] checks every
//! value once (paths exist, sizes in range) and resolves the VMM binary;
//! [`Config::validate_values`] is the part that needs no file system.
//!
//! ```toml
//! [hypervisor]
//! path = "/usr/local/bin/vmrt-vmm"   # default: next to the shim binary, then $PATH
//! kernel = "/usr/share/vmrt/vmlinux"
//! initrd = "/usr/share/vmrt/initramfs.cpio"
//! pvm_guest = false                 # the kernel is PVM-enabled (kvm-pvm hosts)
//! virtio_fs_cache = "auto"          # never | auto | always (Kata's virtio_fs_cache)
//! vcpus = 1
//! memory_mib = 256
//! kernel_params = ""
//! [agent]
//! timeout_ms = 30000    # boot + dial timeout
//! log_level = "info"
//! [runtime]
//! log_level = "info"
//! sandbox_dir = "/run/vmrt/sandboxes"
//! [factory]
//! template = false      # start sandboxes from a VM template instead of booting
//! template_dir = "/run/vmrt/templates"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmrt/config.toml";
/// Environment variable naming the configuration file (tests, manual runs).
pub const CONFIG_ENV: &str = "VMRT_CONFIG";
/// File name of the VMM binary looked up next to the shim and in `$PATH`.
pub const VMM_BINARY: &str = "vmrt-vmm";
/// Most vCPUs a sandbox may ask for.
pub const MAX_VCPUS: u32 = 64;
/// Least guest memory (MiB) a sandbox may ask for: kernel + agent + a container.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most guest memory (MiB) a sandbox may ask for.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// Longest accepted `factory.template_dir`, in bytes: the template VM's hybrid
/// vsock socket, `<template_dir>/<16 hex>.tmp-<pid>-<n>/vsock.sock`, must fit in
/// `sockaddr_un` (107 bytes) with room for a 7-digit pid and a 10-digit counter.
pub const MAX_TEMPLATE_DIR_LEN: usize = 56;

/// Log levels accepted in `log_level` keys.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

/// Errors loading or validating the configuration; every variant names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read vmrt config {path}: {source}")]
    Read {
        /// File that was read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has unknown/mistyped keys.
    #[error("invalid vmrt config {path}: {message}")]
    Parse {
        /// File that was parsed.
        path: PathBuf,
        /// Parser message (line, column, key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid vmrt config: {key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `hypervisor.vcpus`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A file the configuration names does not exist.
    #[error("vmrt config: {key} = {path}: file not found")]
    MissingFile {
        /// Dotted key, e.g. `hypervisor.kernel`.
        key: &'static str,
        /// The missing path.
        path: PathBuf,
    },
    /// The host's `/dev/kvm` is kvm-pvm and the guest kernel is not declared
    /// PVM-enabled: the sandbox would hang in an emulated boot, so Create refuses it.
    #[error("refusing to start a sandbox: {}", vmm::host::PVM_EXPLANATION)]
    PvmHost,
    /// The VMM binary was not configured and not found next to the shim or in `$PATH`.
    #[error(
        "vmrt config: hypervisor.path not set and `vmrt-vmm` not found next to the shim or in PATH"
    )]
    VmmNotFound,
    /// The runtime options in CreateTaskRequest could not be decoded.
    #[error("invalid runtime options {type_url}: {message}")]
    Options {
        /// Any type URL of the options.
        type_url: String,
        /// Decoder message.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[hypervisor]`: the VMM and the guest it boots.
    pub hypervisor: HypervisorConfig,
    /// `[agent]`: the guest agent.
    pub agent: AgentConfig,
    /// `[runtime]`: the shim itself.
    pub runtime: RuntimeConfig,
    /// `[factory]`: VM templates (Kata's `[factory] enable_template`).
    pub factory: FactoryConfig,
}

/// `[hypervisor]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    /// Path of `vmrt-vmm`; `None` = next to the shim binary, then `$PATH`.
    pub path: Option<PathBuf>,
    /// Guest kernel (uncompressed ELF `vmlinux` or bzImage), absolute path.
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as `/init`, absolute path.
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest memory in MiB, [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    pub memory_mib: u32,
    /// Extra kernel command line parameters appended after the shim's own.
    pub kernel_params: String,
    /// The guest kernel is PVM-enabled (`CONFIG_PVM_GUEST=y`). Required on kvm-pvm
    /// hosts, where a stock kernel cannot run (see [`ConfigError::PvmHost`]).
    pub pvm_guest: bool,
    /// How much the guest caches of the shared directory (container rootfs and
    /// bind mounts) served over virtio-fs; Kata's `virtio_fs_cache`.
    pub virtio_fs_cache: VirtioFsCache,
}

/// `hypervisor.virtio_fs_cache`: the virtio-fs share's cache policy, as the
/// VMM's `shares[].cache` takes it (docs/contracts.md "vmrt-vmm").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VirtioFsCache {
    /// No data cache across opens and zero entry/attribute timeouts: every
    /// lookup and stat goes to the VMM, and host-side changes show at once.
    Never,
    /// Close-to-open consistency: data cached while a file is open, entries
    /// and attributes for 1 s (Kata's default). Host-side changes to the
    /// rootfs while the container runs may show up to 1 s late.
    #[default]
    Auto,
    /// Entries, attributes and data kept until the guest drops them: only for
    /// shares nobody changes on the host.
    Always,
}

impl VirtioFsCache {
    /// The name `vm.json` uses: `never`, `auto` or `always`.
    pub fn as_str(self) -> &'static str {
        match self {
            VirtioFsCache::Never => "never",
            VirtioFsCache::Auto => "auto",
            VirtioFsCache::Always => "always",
        }
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            path: None,
            kernel: PathBuf::from("/usr/share/vmrt/vmlinux"),
            initrd: Some(PathBuf::from("/usr/share/vmrt/initramfs.cpio")),
            vcpus: 1,
            memory_mib: 256,
            kernel_params: String::new(),
            pvm_guest: false,
            virtio_fs_cache: VirtioFsCache::default(),
        }
    }
}

/// `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Time in milliseconds from VMM spawn until the agent must answer `Health`
    /// (covers guest boot; the nested TCG runner is slow).
    pub timeout_ms: u64,
    /// Agent log level, passed as `vmrt.log=` on the kernel command line.
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            log_level: "info".into(),
        }
    }
}

/// `[runtime]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Shim log level (written to the bundle's `log` FIFO).
    pub log_level: String,
    /// Directory holding one directory per sandbox (docs/contracts.md).
    pub sandbox_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            sandbox_dir: PathBuf::from("/run/vmrt/sandboxes"),
        }
    }
}

/// `[factory]` table: VM templates. With `template = true` the shim boots one
/// template VM per machine configuration, which the VMM snapshots once the guest
/// agent is up, and starts later sandboxes from that snapshot instead of booting
/// their kernel (Kata's `[factory] enable_template`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactoryConfig {
    /// Start sandboxes from a VM template.
    pub template: bool,
    /// Directory holding one template directory per machine configuration (an
    /// absolute path of at most [`MAX_TEMPLATE_DIR_LEN`] bytes); created if missing.
    pub template_dir: PathBuf,
}

impl Default for FactoryConfig {
    fn default() -> Self {
        Self {
            template: false,
            template_dir: PathBuf::from("/run/vmrt/templates"),
        }
    }
}

/// Which file to load: the explicit option, else `env` (the value of `VMRT_CONFIG`),
/// else the default. Returns the path and whether it was named explicitly.
pub fn resolve_path(option: Option<&Path>, env: Option<&str>) -> (PathBuf, bool) {
    if let Some(p) = option.filter(|p| !p.as_os_str().is_empty()) {
        return (p.to_path_buf(), true);
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return (PathBuf::from(e), true);
    }
    (PathBuf::from(DEFAULT_CONFIG_PATH), false)
}

impl Config {
    /// Parses TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Loads the configuration chosen by [`resolve_path`] (reading `VMRT_CONFIG`
    /// from the environment) without validating it.
    pub fn load(option: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::var(CONFIG_ENV).ok();
        let (path, explicit) = resolve_path(option, env.as_deref());
        Self::load_file(&path, explicit)
    }

    /// Loads `path`; a missing file is an error only if `explicit`.
    pub fn load_file(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Checks that this host can run the configured guest kernel: on a kvm-pvm host
    /// (`kvm_pvm` under `sys_module`, normally [`vmm::host::SYS_MODULE`]) the kernel must
    /// be declared PVM-enabled with `hypervisor.pvm_guest`.
    ///
    /// Errors: [`ConfigError::PvmHost`].
    pub fn check_host(&self, sys_module: &Path) -> Result<(), ConfigError> {
        if vmm::host::is_kvm_pvm(sys_module) && !self.hypervisor.pvm_guest {
            return Err(ConfigError::PvmHost);
        }
        Ok(())
    }

    /// Checks every value and returns the resolved VMM binary path:
    /// [`Config::validate_values`], then the kernel and initrd files, then
    /// [`Config::vmm_path`].
    ///
    /// Errors: [`ConfigError::Invalid`] for out-of-range values,
    /// [`ConfigError::MissingFile`] for a kernel/initrd/VMM path that does not exist,
    /// [`ConfigError::VmmNotFound`] if the VMM cannot be located.
    pub fn validate(&self) -> Result<PathBuf, ConfigError> {
        self.validate_values()?;
        self.check_kernel()?;
        self.check_initrd()?;
        self.vmm_path()
    }

    /// `hypervisor.kernel` is an absolute path to an existing file.
    ///
    /// Errors: [`ConfigError::Invalid`], [`ConfigError::MissingFile`].
    pub fn check_kernel(&self) -> Result<(), ConfigError> {
        check_file("hypervisor.kernel", &self.hypervisor.kernel)
    }

    /// `hypervisor.initrd`, when set, is an absolute path to an existing file.
    ///
    /// Errors: [`ConfigError::Invalid`], [`ConfigError::MissingFile`].
    pub fn check_initrd(&self) -> Result<(), ConfigError> {
        match &self.hypervisor.initrd {
            Some(initrd) => check_file("hypervisor.initrd", initrd),
            None => Ok(()),
        }
    }

    /// Checks the values that need no file system: vCPU and memory ranges,
    /// the kernel parameters, the agent timeout, log levels, that the
    /// sandbox directory is absolute, and that the template directory is
    /// absolute and short enough.
    ///
    /// Errors: [`ConfigError::Invalid`] naming the key.
    pub fn validate_values(&self) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid {
                key: "hypervisor.vcpus",
                message: format!("{} is not in 1..={MAX_VCPUS}", h.vcpus),
            });
        }
        if h.memory_mib < MIN_MEMORY_MIB || h.memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::Invalid {
                key: "hypervisor.memory_mib",
                message: format!(
                    "{} MiB is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    h.memory_mib
                ),
            });
        }
        if h.kernel_params.contains(['\n', '\0']) {
            return Err(ConfigError::Invalid {
                key: "hypervisor.kernel_params",
                message: "contains a newline or NUL".into(),
            });
        }
        if self.agent.timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "agent.timeout_ms",
                message: "must be > 0".into(),
            });
        }
        check_level("agent.log_level", &self.agent.log_level)?;
        check_level("runtime.log_level", &self.runtime.log_level)?;
        if !self.runtime.sandbox_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "runtime.sandbox_dir",
                message: format!(
                    "{} is not an absolute path",
                    self.runtime.sandbox_dir.display()
                ),
            });
        }
        let t = &self.factory.template_dir;
        if !t.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "factory.template_dir",
                message: format!("{} is not an absolute path", t.display()),
            });
        }
        if t.as_os_str().len() > MAX_TEMPLATE_DIR_LEN {
            return Err(ConfigError::Invalid {
                key: "factory.template_dir",
                message: format!(
                    "{} is {} bytes, longer than {MAX_TEMPLATE_DIR_LEN} (the template VM's socket path must fit in sockaddr_un)",
                    t.display(),
                    t.as_os_str().len()
                ),
            });
        }
        Ok(())
    }

    /// The VMM binary: `hypervisor.path`, else `vmrt-vmm` next to the running
    /// executable (the shim), else the first `vmrt-vmm` in `$PATH`.
    ///
    /// Errors: [`ConfigError::MissingFile`] / [`ConfigError::Invalid`] for a
    /// bad `hypervisor.path`, [`ConfigError::VmmNotFound`].
    pub fn vmm_path(&self) -> Result<PathBuf, ConfigError> {
        let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
        let path = std::env::var_os("PATH").unwrap_or_default();
        self.vmm_path_in(exe_dir.as_deref(), &path)
    }

    /// [`Config::vmm_path`] as seen by a shim installed in `shim_dir`, with
    /// `path` as its `$PATH` (a `PATH`-style list): how `vmrt check` finds the
    /// binary the shim will start.
    pub fn vmm_path_in(&self, shim_dir: Option<&Path>, path: &std::ffi::OsStr) -> Result<PathBuf, ConfigError> {
        if let Some(p) = &self.hypervisor.path {
            check_file("hypervisor.path", p)?;
            return Ok(p.clone());
        }
        if let Some(candidate) = shim_dir.map(|d| d.join(VMM_BINARY)).filter(|c| c.is_file()) {
            return Ok(candidate);
        }
        std::env::split_paths(path)
            .map(|d| d.join(VMM_BINARY))
            .find(|c| c.is_file())
            .ok_or(ConfigError::VmmNotFound)
    }
}

fn check_file(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    if !path.is_absolute() {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{} is not an absolute path", path.display()),
        });
    }
    if !path.is_file() {
        return Err(ConfigError::MissingFile {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn check_level(key: &'static str, level: &str) -> Result<(), ConfigError> {
    if LOG_LEVELS.contains(&level) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: format!("log level {level:?} is not one of {LOG_LEVELS:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        let i = d.path().join("initrd");
        let v = d.path().join("vmrt-vmm");
        for f in [&k, &i, &v] {
            std::fs::write(f, b"x").unwrap();
        }
        (d, k, i, v)
    }

    fn valid(k: &Path, i: &Path, v: &Path) -> String {
        format!(
            "[hypervisor]\npath = {v:?}\nkernel = {k:?}\ninitrd = {i:?}\nvcpus = 2\nmemory_mib = 512\nkernel_params = \"foo=1\"\n\
             [agent]\ntimeout_ms = 5000\nlog_level = \"debug\"\n[runtime]\nlog_level = \"warn\"\nsandbox_dir = \"/tmp/sb\"\n"
        )
    }

    #[test]
    fn full_file_parses_and_validates() {
        let (_d, k, i, v) = files();
        let c = Config::parse(&valid(&k, &i, &v), Path::new("x.toml")).unwrap();
        assert_eq!(c.hypervisor.vcpus, 2);
        assert_eq!(c.hypervisor.memory_mib, 512);
        assert_eq!(c.agent.timeout_ms, 5000);
        assert_eq!(c.runtime.sandbox_dir, PathBuf::from("/tmp/sb"));
        assert_eq!(c.validate().unwrap(), v);
        assert_eq!(c.hypervisor.kernel_params, "foo=1");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.hypervisor.vcpus, 1);
        assert_eq!(c.hypervisor.memory_mib, 256);
        assert_eq!(c.agent.timeout_ms, 30_000);
        assert_eq!(c.runtime.sandbox_dir, PathBuf::from("/run/vmrt/sandboxes"));
    }

    #[test]
    fn unknown_key_and_wrong_type_are_rejected_with_the_path() {
        let e = Config::parse("[hypervisor]\nvcpu = 2\n", Path::new("/etc/x.toml")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("/etc/x.toml") && m.contains("vcpu"), "{m}");
        let e = Config::parse("[agent]\ntimeout_ms = \"soon\"\n", Path::new("/etc/x.toml"))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let e = Config::parse("[bogus]\n", Path::new("/etc/x.toml")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn missing_kernel_is_named() {
        let (_d, k, i, v) = files();
        std::fs::remove_file(&k).unwrap();
        let c = Config::parse(&valid(&k, &i, &v), Path::new("x.toml")).unwrap();
        let e = c.validate().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::MissingFile {
                    key: "hypervisor.kernel",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(k.to_str().unwrap()), "{e}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let (_d, k, i, v) = files();
        let base = Config::parse(&valid(&k, &i, &v), Path::new("x.toml")).unwrap();
        let mut c = base.clone();
        c.hypervisor.vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "hypervisor.vcpus",
                ..
            })
        ));
        let mut c = base.clone();
        c.hypervisor.memory_mib = 16;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "hypervisor.memory_mib",
                ..
            })
        ));
        let mut c = base.clone();
        c.agent.timeout_ms = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "agent.timeout_ms",
                ..
            })
        ));
        let mut c = base.clone();
        c.runtime.log_level = "loud".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "runtime.log_level",
                ..
            })
        ));
        let mut c = base.clone();
        c.runtime.sandbox_dir = "relative".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "runtime.sandbox_dir",
                ..
            })
        ));
        let mut c = base.clone();
        c.hypervisor.kernel = "vmlinux".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "hypervisor.kernel",
                ..
            })
        ));
        let mut c = base;
        c.hypervisor.path = Some(PathBuf::from("/nonexistent/vmrt-vmm"));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MissingFile {
                key: "hypervisor.path",
                ..
            })
        ));
    }

    #[test]
    fn path_resolution_order() {
        assert_eq!(
            resolve_path(Some(Path::new("/a")), Some("/b")),
            (PathBuf::from("/a"), true)
        );
        assert_eq!(resolve_path(None, Some("/b")), (PathBuf::from("/b"), true));
        assert_eq!(
            resolve_path(Some(Path::new("")), Some("")),
            (PathBuf::from(DEFAULT_CONFIG_PATH), false)
        );
    }

    #[test]
    fn missing_file_only_fails_when_explicit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.toml");
        assert_eq!(Config::load_file(&p, false).unwrap(), Config::default());
        let e = Config::load_file(&p, true).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
        std::fs::write(&p, "[hypervisor]\nvcpus = 3\n").unwrap();
        assert_eq!(Config::load_file(&p, true).unwrap().hypervisor.vcpus, 3);
    }

    #[test]
    fn vmm_is_found_next_to_the_shim_before_path() {
        let shim_dir = tempfile::tempdir().unwrap();
        let path_dir = tempfile::tempdir().unwrap();
        let c = Config::default();
        let path = std::env::join_paths([path_dir.path()]).unwrap();
        assert!(matches!(c.vmm_path_in(Some(shim_dir.path()), &path), Err(ConfigError::VmmNotFound)));
        std::fs::write(path_dir.path().join(VMM_BINARY), b"x").unwrap();
        assert_eq!(c.vmm_path_in(Some(shim_dir.path()), &path).unwrap(), path_dir.path().join(VMM_BINARY));
        std::fs::write(shim_dir.path().join(VMM_BINARY), b"x").unwrap();
        assert_eq!(c.vmm_path_in(Some(shim_dir.path()), &path).unwrap(), shim_dir.path().join(VMM_BINARY));
    }

    /// On a kvm-pvm host a stock guest kernel is refused with the explanation `vmrt
    /// check` gives; a kernel declared PVM-enabled, or a host without kvm-pvm, passes.
    #[test]
    fn kvm_pvm_host_needs_a_pvm_guest_kernel() {
        let sys = tempfile::tempdir().unwrap();
        let mut c = Config::parse("[hypervisor]\nkernel = \"/k\"\n", Path::new("t")).unwrap();
        assert!(c.check_host(sys.path()).is_ok());
        std::fs::create_dir(sys.path().join("kvm_pvm")).unwrap();
        let e = c.check_host(sys.path()).unwrap_err();
        assert!(matches!(e, ConfigError::PvmHost));
        let m = e.to_string();
        assert!(m.contains("kvm-pvm") && m.contains("pvm_guest = true"), "{m}");
        c = Config::parse(
            "[hypervisor]\nkernel = \"/k\"\npvm_guest = true\n",
            Path::new("t"),
        )
        .unwrap();
        assert!(c.check_host(sys.path()).is_ok());
    }

    #[test]
    fn factory_defaults_to_no_template() {
        let c = Config::parse("", Path::new("t")).unwrap();
        assert!(!c.factory.template);
        assert_eq!(c.factory.template_dir, PathBuf::from("/run/vmrt/templates"));
        assert!(c.validate_values().is_ok());
    }

    #[test]
    fn factory_keys_parse_and_validate() {
        let c = Config::parse(
            "[factory]\ntemplate = true\ntemplate_dir = \"/var/lib/vmrt/t\"\n",
            Path::new("t"),
        )
        .unwrap();
        assert!(c.factory.template);
        assert_eq!(c.factory.template_dir, PathBuf::from("/var/lib/vmrt/t"));
        assert!(c.validate_values().is_ok());
        // Unknown keys and wrong types are rejected, naming the key.
        let e = Config::parse("[factory]\nenable_template = true\n", Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/x.toml") && e.contains("enable_template"), "{e}");
        let e = Config::parse("[factory]\ntemplate = \"yes\"\n", Path::new("t")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        // Relative or too long for the template VM's socket path.
        let mut c = Config::default();
        c.factory.template_dir = "templates".into();
        let e = c.validate_values().unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { key: "factory.template_dir", .. }),
            "{e}"
        );
        c.factory.template_dir = PathBuf::from(format!("/{}", "t".repeat(MAX_TEMPLATE_DIR_LEN)));
        let e = c.validate_values().unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { key: "factory.template_dir", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("sockaddr_un"), "{e}");
        c.factory.template_dir = PathBuf::from(format!("/{}", "t".repeat(MAX_TEMPLATE_DIR_LEN - 1)));
        assert!(c.validate_values().is_ok());
    }

    #[test]
    fn virtio_fs_cache_defaults_to_auto_and_takes_the_three_policies() {
        let c = Config::parse("[hypervisor]\nkernel = \"/k\"\n", Path::new("t")).unwrap();
        assert_eq!(c.hypervisor.virtio_fs_cache, VirtioFsCache::Auto);
        for (name, want) in [
            ("never", VirtioFsCache::Never),
            ("auto", VirtioFsCache::Auto),
            ("always", VirtioFsCache::Always),
        ] {
            let text = format!("[hypervisor]\nvirtio_fs_cache = \"{name}\"\n");
            let c = Config::parse(&text, Path::new("t")).unwrap();
            assert_eq!(c.hypervisor.virtio_fs_cache, want);
            assert_eq!(want.as_str(), name);
        }
        let e = Config::parse("[hypervisor]\nvirtio_fs_cache = \"metadata\"\n", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio_fs_cache") && e.contains("metadata"), "{e}");
    }
}
