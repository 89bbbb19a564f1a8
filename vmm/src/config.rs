//! VM configuration: the JSON file / CLI flags of `vmrt-vmm` (docs/contracts.md,
//! "vmrt-vmm") and their validation into [`VmResources`].
//!
//! [`VmConfig`] is exactly what the user wrote (serde, unknown fields
//! rejected). [`VmResources::from_config`] is the one place where it is
//! checked; everything after it (builder, devices) trusts a `VmResources`.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest memory accepted, in MiB (64 GiB).
pub const MAX_MEMORY_MIB: u64 = 65536;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 32;
/// Longest user command line in bytes. Linux/x86 accepts 2048 bytes
/// (`COMMAND_LINE_SIZE`); the rest is kept for what the VMM appends.
pub const MAX_USER_CMDLINE_LEN: usize = 1536;
/// Longest virtio-fs tag in bytes (virtio 1.2 §5.11.4, `tag[36]`).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Longest Unix socket path in bytes: `sockaddr_un.sun_path` is 108 bytes
/// including the terminating NUL.
pub const MAX_UDS_PATH_LEN: usize = 107;
/// Most virtio-mmio devices: IRQs 5..=23 of the IOAPIC (docs/contracts.md).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// The `vmrt-vmm` JSON configuration (docs/contracts.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=32.
    pub vcpus: u32,
    /// Guest memory in MiB, 64..=65536.
    pub memory_mib: u64,
    /// Kernel image: ELF `vmlinux` (PVH or 64-bit boot protocol) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its own parameters.
    #[serde(default)]
    pub cmdline: String,
    /// Where the 8250 console goes.
    pub serial: SerialConfig,
    /// Optional virtio-vsock device (hybrid vsock over a Unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, one device each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareConfig>,
    /// VM templates (`crate::snapshot`): write one when the guest asks, or
    /// start from one instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotConfig>,
}

/// `snapshot`: `{"mode": "template", "dir": D}` makes the VM a template: when
/// the guest asks (`crate::snapshot::REQUEST_PORT`), the VMM writes the VM's
/// state and memory to the existing, empty directory D and exits 0.
/// `{"mode": "restore", "dir": D}` starts the VM from the template in D
/// instead of booting the kernel; the rest of the configuration must describe
/// the same machine (vCPUs, memory, devices in the same order), which the
/// VMM checks against the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Write a template, or start from one.
    pub mode: SnapshotMode,
    /// The template's directory.
    pub dir: PathBuf,
}

/// `snapshot.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Boot, and write a template when the guest asks.
    Template,
    /// Start from a template.
    Restore,
}

/// Serial console output: `{"type": "file", "path": ...}`, `{"type": "stdout"}`
/// or `{"type": "none"}`. As a CLI flag: `file:PATH`, `stdout`, `none`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SerialConfigRaw", into = "SerialConfigRaw")]
pub enum SerialConfig {
    /// Append the console output to a file (created if missing).
    File {
        /// Output file path.
        path: PathBuf,
    },
    /// Write the console output to the VMM's stdout.
    Stdout,
    /// Discard the console output.
    None,
}

/// `serial.type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SerialKind {
    File,
    Stdout,
    None,
}

/// The JSON shape of `serial` (flat, so that unknown fields are rejected for
/// every type).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialConfigRaw {
    #[serde(rename = "type")]
    kind: SerialKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
}

impl TryFrom<SerialConfigRaw> for SerialConfig {
    type Error = String;

    fn try_from(raw: SerialConfigRaw) -> Result<Self, String> {
        match (raw.kind, raw.path) {
            (SerialKind::File, Some(path)) => Ok(SerialConfig::File { path }),
            (SerialKind::File, None) => Err("serial.path is required with type \"file\"".into()),
            (SerialKind::Stdout, None) => Ok(SerialConfig::Stdout),
            (SerialKind::None, None) => Ok(SerialConfig::None),
            (_, Some(_)) => Err("serial.path is only valid with type \"file\"".into()),
        }
    }
}

impl From<SerialConfig> for SerialConfigRaw {
    fn from(c: SerialConfig) -> Self {
        match c {
            SerialConfig::File { path } => SerialConfigRaw { kind: SerialKind::File, path: Some(path) },
            SerialConfig::Stdout => SerialConfigRaw { kind: SerialKind::Stdout, path: None },
            SerialConfig::None => SerialConfigRaw { kind: SerialKind::None, path: None },
        }
    }
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    /// Parses the `--serial` flag: `stdout`, `none` or `file:PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File { path: PathBuf::from(p) }),
                _ => Err(ConfigError::SerialFlag(s.to_string())),
            },
        }
    }
}

/// virtio-vsock device settings (Firecracker hybrid vsock, docs/contracts.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID, >= 3 (0..=2 are reserved) and below `u32::MAX`.
    pub guest_cid: u64,
    /// Host Unix socket path the VMM listens on.
    pub uds_path: PathBuf,
}

/// Cache policy of a virtio-fs share (maps to `fs::CachePolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// No caching: coherent with changes made on the host (default).
    #[default]
    Never,
    /// Cache with timeouts.
    Auto,
    /// Cache everything; only safe if the host does not change the share.
    Always,
}

/// One virtio-fs share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// Mount tag seen by the guest, 1..=36 bytes, unique.
    pub tag: String,
    /// Host directory to share.
    pub path: PathBuf,
    /// Cache policy, default `never`.
    #[serde(default)]
    pub cache: CacheMode,
}

/// Why a configuration was rejected. Every message names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    ReadFile {
        /// Config file path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The config file is not valid JSON for [`VmConfig`].
    #[error("config file {path}: {source}")]
    Parse {
        /// Config file path.
        path: PathBuf,
        /// Underlying error (names the field and line).
        source: serde_json::Error,
    },
    /// `vcpus` outside 1..=32.
    #[error("vcpus: {0} is out of range 1..={MAX_VCPUS}")]
    Vcpus(u32),
    /// `memory_mib` outside 64..=65536.
    #[error("memory_mib: {0} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    MemoryMib(u64),
    /// `kernel` is missing or unreadable.
    #[error("kernel: cannot read {path}: {reason}")]
    Kernel {
        /// Kernel path as configured.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `initrd` is missing or unreadable.
    #[error("initrd: cannot read {path}: {reason}")]
    Initrd {
        /// Initrd path as configured.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `cmdline` is too long.
    #[error("cmdline: {0} bytes, at most {MAX_USER_CMDLINE_LEN} allowed")]
    CmdlineTooLong(usize),
    /// `cmdline` contains a NUL byte or a non-printable character.
    #[error("cmdline: contains a NUL or control character")]
    CmdlineChars,
    /// `--serial` flag not understood.
    #[error("serial: '{0}' is not one of stdout, none, file:PATH")]
    SerialFlag(String),
    /// `serial.path` is empty.
    #[error("serial.path: must not be empty")]
    SerialPath,
    /// `vsock.guest_cid` reserved or too large.
    #[error("vsock.guest_cid: {0} is reserved or out of range (3..4294967295)")]
    VsockCid(u64),
    /// `vsock.uds_path` empty or too long for `sockaddr_un`.
    #[error("vsock.uds_path: {path} is {len} bytes; must be 1..={MAX_UDS_PATH_LEN} (sockaddr_un)")]
    VsockUdsPath {
        /// Path as configured.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// `shares[i].tag` empty or longer than 36 bytes.
    #[error("shares[{index}].tag: '{tag}' must be 1..={MAX_FS_TAG_LEN} bytes")]
    ShareTag {
        /// Index in `shares`.
        index: usize,
        /// The tag.
        tag: String,
    },
    /// `shares[i].tag` used twice.
    #[error("shares[{index}].tag: '{tag}' is used by another share")]
    ShareTagDuplicate {
        /// Index in `shares`.
        index: usize,
        /// The tag.
        tag: String,
    },
    /// `shares[i].path` is not a directory.
    #[error("shares[{index}].path: {path} is not a directory")]
    SharePath {
        /// Index in `shares`.
        index: usize,
        /// Path as configured.
        path: PathBuf,
    },
    /// More virtio devices than IRQs.
    #[error("shares: {0} virtio devices configured, at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
    /// `snapshot.dir` is not a directory.
    #[error("snapshot.dir: {0} is not a directory")]
    SnapshotDir(PathBuf),
    /// A real-mode payload does not fit below 1 MiB.
    #[error("payload: {len} bytes at {addr:#x} do not fit in the first MiB")]
    Payload {
        /// Load address.
        addr: u64,
        /// Payload length.
        len: usize,
    },
}

impl VmConfig {
    /// Reads and parses a JSON config file. Does not validate: see
    /// [`VmResources::from_config`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::ReadFile { path: path.to_path_buf(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_path_buf(), source },
            other => other,
        })
    }

    /// Parses a JSON config string (unknown fields rejected).
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|source| ConfigError::Parse { path: PathBuf::from("<json>"), source })
    }
}

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootPayload {
    /// A Linux kernel with optional initrd and the user's command line.
    Linux {
        /// Kernel image (ELF vmlinux or bzImage).
        kernel: PathBuf,
        /// Optional initramfs.
        initrd: Option<PathBuf>,
        /// User command line (the VMM appends its own parameters).
        cmdline: String,
    },
    /// Test-only: raw 16-bit real-mode machine code copied to `addr` (below
    /// 1 MiB) and started there with CS = 0, IP = `addr`. Used by the
    /// integration tests to exercise the vCPU exits on the real `/dev/kvm`.
    RealMode {
        /// Machine code.
        bytes: Vec<u8>,
        /// Guest physical load and entry address.
        addr: u64,
    },
}

/// Validated virtio-fs share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareResource {
    /// Tag, 1..=36 bytes, unique.
    pub tag: String,
    /// Existing host directory.
    pub path: PathBuf,
    /// Cache policy.
    pub cache: CacheMode,
}

/// Validated vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockResource {
    /// Guest CID, 3..u32::MAX.
    pub guest_cid: u64,
    /// Host Unix socket path, fits `sockaddr_un`.
    pub uds_path: PathBuf,
}

/// A configuration that passed validation: what the builder consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    vcpus: u8,
    memory_mib: u64,
    boot: BootPayload,
    serial: SerialConfig,
    vsock: Option<VsockResource>,
    shares: Vec<ShareResource>,
    snapshot: Option<SnapshotConfig>,
}

fn check_readable_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    File::open(path).map_err(|e| e.to_string())?;
    Ok(())
}

fn check_vcpus_memory(vcpus: u32, memory_mib: u64) -> Result<(), ConfigError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(ConfigError::Vcpus(vcpus));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ConfigError::MemoryMib(memory_mib));
    }
    Ok(())
}

fn check_serial(serial: &SerialConfig) -> Result<(), ConfigError> {
    if let SerialConfig::File { path } = serial {
        if path.as_os_str().is_empty() {
            return Err(ConfigError::SerialPath);
        }
    }
    Ok(())
}

impl VmResources {
    /// Validates `config`: the one boundary between user input and the VMM.
    ///
    /// Errors: the first [`ConfigError`] found, naming the field.
    pub fn from_config(config: VmConfig) -> Result<Self, ConfigError> {
        check_vcpus_memory(config.vcpus, config.memory_mib)?;
        check_readable_file(&config.kernel)
            .map_err(|reason| ConfigError::Kernel { path: config.kernel.clone(), reason })?;
        if let Some(initrd) = &config.initrd {
            check_readable_file(initrd).map_err(|reason| ConfigError::Initrd { path: initrd.clone(), reason })?;
        }
        if config.cmdline.len() > MAX_USER_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(config.cmdline.len()));
        }
        if config.cmdline.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(ConfigError::CmdlineChars);
        }
        check_serial(&config.serial)?;
        let vsock = match config.vsock {
            None => None,
            Some(v) => {
                if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
                    return Err(ConfigError::VsockCid(v.guest_cid));
                }
                let len = v.uds_path.as_os_str().len();
                if len == 0 || len > MAX_UDS_PATH_LEN {
                    return Err(ConfigError::VsockUdsPath { path: v.uds_path, len });
                }
                Some(VsockResource { guest_cid: v.guest_cid, uds_path: v.uds_path })
            }
        };
        let mut tags = HashSet::new();
        let mut shares = Vec::with_capacity(config.shares.len());
        for (index, s) in config.shares.into_iter().enumerate() {
            if s.tag.is_empty() || s.tag.len() > MAX_FS_TAG_LEN {
                return Err(ConfigError::ShareTag { index, tag: s.tag });
            }
            if !tags.insert(s.tag.clone()) {
                return Err(ConfigError::ShareTagDuplicate { index, tag: s.tag });
            }
            if !s.path.is_dir() {
                return Err(ConfigError::SharePath { index, path: s.path });
            }
            shares.push(ShareResource { tag: s.tag, path: s.path, cache: s.cache });
        }
        let devices = shares.len() + usize::from(vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(s) = &config.snapshot {
            if !s.dir.is_dir() {
                return Err(ConfigError::SnapshotDir(s.dir.clone()));
            }
        }
        Ok(VmResources {
            vcpus: config.vcpus as u8,
            memory_mib: config.memory_mib,
            boot: BootPayload::Linux { kernel: config.kernel, initrd: config.initrd, cmdline: config.cmdline },
            serial: config.serial,
            vsock,
            shares,
            snapshot: config.snapshot,
        })
    }

    /// Test-only resources: one vCPU running `bytes` as real-mode code at
    /// `addr` (`addr + len` must stay below 1 MiB and `addr` >= 0x1000), no
    /// virtio devices.
    pub fn real_mode(bytes: Vec<u8>, addr: u64, memory_mib: u64, serial: SerialConfig) -> Result<Self, ConfigError> {
        check_vcpus_memory(1, memory_mib)?;
        check_serial(&serial)?;
        let end = addr.checked_add(bytes.len() as u64);
        if addr < 0x1000 || end.is_none_or(|e| e > 0x10_0000) {
            return Err(ConfigError::Payload { addr, len: bytes.len() });
        }
        Ok(VmResources {
            vcpus: 1,
            memory_mib,
            boot: BootPayload::RealMode { bytes, addr },
            serial,
            vsock: None,
            shares: Vec::new(),
            snapshot: None,
        })
    }

    /// Test-only: the same resources with a template or restore setting
    /// (`dir` must be a directory). Errors: [`ConfigError::SnapshotDir`].
    pub fn with_snapshot(mut self, snapshot: SnapshotConfig) -> Result<Self, ConfigError> {
        if !snapshot.dir.is_dir() {
            return Err(ConfigError::SnapshotDir(snapshot.dir));
        }
        self.snapshot = Some(snapshot);
        Ok(self)
    }

    /// Test-only: the same real-mode resources with `vcpus` vCPUs (1..=32).
    /// vCPU 0 runs the payload; the others wait for INIT/SIPI in KVM, as
    /// application processors do. Errors: [`ConfigError::Vcpus`].
    pub fn with_vcpus(mut self, vcpus: u32) -> Result<Self, ConfigError> {
        check_vcpus_memory(vcpus, self.memory_mib)?;
        self.vcpus = vcpus as u8;
        Ok(self)
    }

    /// Number of vCPUs (1..=32).
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }
    /// Guest memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
    /// What to boot.
    pub fn boot(&self) -> &BootPayload {
        &self.boot
    }
    /// Serial console destination.
    pub fn serial(&self) -> &SerialConfig {
        &self.serial
    }
    /// vsock device, if any.
    pub fn vsock(&self) -> Option<&VsockResource> {
        self.vsock.as_ref()
    }
    /// virtio-fs shares.
    pub fn shares(&self) -> &[ShareResource] {
        &self.shares
    }
    /// Template or restore setting, if any.
    pub fn snapshot(&self) -> Option<&SnapshotConfig> {
        self.snapshot.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
            std::fs::write(dir.path().join("initrd"), b"initrd").unwrap();
            std::fs::create_dir(dir.path().join("share")).unwrap();
            Fixture { dir }
        }
        fn p(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn config(&self) -> VmConfig {
            VmConfig {
                vcpus: 2,
                memory_mib: 256,
                kernel: self.p("vmlinux"),
                initrd: Some(self.p("initrd")),
                cmdline: "console=ttyS0".into(),
                serial: SerialConfig::None,
                vsock: Some(VsockConfig { guest_cid: 3, uds_path: self.p("v.sock") }),
                shares: vec![ShareConfig { tag: "vmrtshared".into(), path: self.p("share"), cache: CacheMode::Never }],
                snapshot: None,
            }
        }
    }

    fn err(c: VmConfig) -> ConfigError {
        VmResources::from_config(c).unwrap_err()
    }

    #[test]
    fn contract_json_parses_and_validates() {
        let f = Fixture::new();
        let json = format!(
            r#"{{"vcpus": 1, "memory_mib": 256, "kernel": "{k}", "initrd": "{i}",
               "cmdline": "console=ttyS0 vmrt.log=info",
               "serial": {{"type": "file", "path": "{d}/console.log"}},
               "vsock": {{"guest_cid": 3, "uds_path": "{d}/vsock.sock"}},
               "shares": [{{"tag": "vmrtshared", "path": "{d}/share", "cache": "never"}}]}}"#,
            k = f.p("vmlinux").display(),
            i = f.p("initrd").display(),
            d = f.dir.path().display()
        );
        let c = VmConfig::from_json(&json).unwrap();
        assert_eq!(c.serial, SerialConfig::File { path: f.p("console.log") });
        let r = VmResources::from_config(c).unwrap();
        assert_eq!(r.vcpus(), 1);
        assert_eq!(r.memory_bytes(), 256 << 20);
        assert_eq!(r.vsock().unwrap().guest_cid, 3);
        assert_eq!(r.shares()[0].cache, CacheMode::Never);
    }

    #[test]
    fn optional_fields_default() {
        let c = VmConfig::from_json(
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none"},
                "shares":[{"tag":"t","path":"/"}]}"#,
        )
        .unwrap();
        assert_eq!(c.initrd, None);
        assert_eq!(c.vsock, None);
        assert_eq!(c.cmdline, "");
        assert_eq!(c.shares[0].cache, CacheMode::Never);
        let c: ShareConfig = serde_json::from_str(r#"{"tag":"t","path":"/","cache":"always"}"#).unwrap();
        assert_eq!(c.cache, CacheMode::Always);
    }

    #[test]
    fn unknown_fields_rejected_everywhere() {
        for json in [
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none"},"bogus":1}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"stdout","x":1}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none"},"vsock":{"guest_cid":3,"uds_path":"/s","y":2}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none"},"shares":[{"tag":"t","path":"/","z":0}]}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"pipe"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"file"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none","path":"/x"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","serial":{"type":"none"},"shares":[{"tag":"t","path":"/","cache":"sometimes"}]}"#,
        ] {
            let e = VmConfig::from_json(json).unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{json}: {e}");
        }
    }

    #[test]
    fn serial_round_trips() {
        for s in [SerialConfig::Stdout, SerialConfig::None, SerialConfig::File { path: "/c.log".into() }] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<SerialConfig>(&json).unwrap(), s, "{json}");
        }
        assert_eq!(serde_json::to_string(&SerialConfig::Stdout).unwrap(), r#"{"type":"stdout"}"#);
    }

    #[test]
    fn serial_flag() {
        assert_eq!("stdout".parse::<SerialConfig>().unwrap(), SerialConfig::Stdout);
        assert_eq!("none".parse::<SerialConfig>().unwrap(), SerialConfig::None);
        assert_eq!(
            "file:/tmp/x".parse::<SerialConfig>().unwrap(),
            SerialConfig::File { path: "/tmp/x".into() }
        );
        for bad in ["file:", "tty", ""] {
            assert!(matches!(bad.parse::<SerialConfig>(), Err(ConfigError::SerialFlag(_))));
        }
    }

    #[test]
    fn each_validation_error() {
        let f = Fixture::new();
        let mut c = f.config();
        c.vcpus = 0;
        assert!(matches!(err(c), ConfigError::Vcpus(0)));
        let mut c = f.config();
        c.vcpus = 33;
        assert!(matches!(err(c), ConfigError::Vcpus(33)));
        let mut c = f.config();
        c.memory_mib = 63;
        assert!(matches!(err(c), ConfigError::MemoryMib(63)));
        let mut c = f.config();
        c.memory_mib = 65537;
        assert!(matches!(err(c), ConfigError::MemoryMib(65537)));
        let mut c = f.config();
        c.kernel = f.p("missing");
        let e = err(c);
        assert!(matches!(e, ConfigError::Kernel { .. }));
        assert!(e.to_string().starts_with("kernel: "), "{e}");
        let mut c = f.config();
        c.kernel = f.p("share");
        assert!(matches!(err(c), ConfigError::Kernel { .. }));
        let mut c = f.config();
        c.initrd = Some(f.p("missing"));
        assert!(matches!(err(c), ConfigError::Initrd { .. }));
        let mut c = f.config();
        c.cmdline = "a".repeat(MAX_USER_CMDLINE_LEN + 1);
        assert!(matches!(err(c), ConfigError::CmdlineTooLong(_)));
        let mut c = f.config();
        c.cmdline = "a\nb".into();
        assert!(matches!(err(c), ConfigError::CmdlineChars));
        let mut c = f.config();
        c.serial = SerialConfig::File { path: PathBuf::new() };
        assert!(matches!(err(c), ConfigError::SerialPath));
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let mut c = f.config();
            c.vsock.as_mut().unwrap().guest_cid = cid;
            assert!(matches!(err(c), ConfigError::VsockCid(x) if x == cid));
        }
        let mut c = f.config();
        c.vsock.as_mut().unwrap().uds_path = PathBuf::from(format!("/{}", "s".repeat(MAX_UDS_PATH_LEN)));
        assert!(matches!(err(c), ConfigError::VsockUdsPath { len: 108, .. }));
        let mut c = f.config();
        c.vsock.as_mut().unwrap().uds_path = PathBuf::new();
        assert!(matches!(err(c), ConfigError::VsockUdsPath { len: 0, .. }));
        let mut c = f.config();
        c.shares[0].tag = String::new();
        assert!(matches!(err(c), ConfigError::ShareTag { index: 0, .. }));
        let mut c = f.config();
        c.shares[0].tag = "t".repeat(37);
        assert!(matches!(err(c), ConfigError::ShareTag { .. }));
        let mut c = f.config();
        c.shares.push(c.shares[0].clone());
        assert!(matches!(err(c), ConfigError::ShareTagDuplicate { index: 1, .. }));
        let mut c = f.config();
        c.shares[0].path = f.p("vmlinux");
        assert!(matches!(err(c), ConfigError::SharePath { index: 0, .. }));
        let mut c = f.config();
        c.shares = (0..MAX_VIRTIO_DEVICES)
            .map(|i| ShareConfig { tag: format!("t{i}"), path: f.p("share"), cache: CacheMode::Auto })
            .collect();
        assert!(matches!(err(c), ConfigError::TooManyDevices(20)));
    }

    #[test]
    fn limits_accepted() {
        let f = Fixture::new();
        let mut c = f.config();
        c.vcpus = 32;
        c.memory_mib = 65536;
        c.cmdline = "a".repeat(MAX_USER_CMDLINE_LEN);
        c.shares[0].tag = "t".repeat(36);
        c.vsock.as_mut().unwrap().uds_path = PathBuf::from(format!("/{}", "s".repeat(MAX_UDS_PATH_LEN - 1)));
        VmResources::from_config(c).unwrap();
    }

    #[test]
    fn real_mode_payload_bounds() {
        VmResources::real_mode(vec![0xf4], 0x1000, 64, SerialConfig::None).unwrap();
        assert!(matches!(
            VmResources::real_mode(vec![0; 16], 0xffff8, 64, SerialConfig::None),
            Err(ConfigError::Payload { .. })
        ));
        assert!(matches!(
            VmResources::real_mode(vec![0xf4], 0, 64, SerialConfig::None),
            Err(ConfigError::Payload { .. })
        ));
        assert!(matches!(VmResources::real_mode(vec![0xf4], 0x1000, 1, SerialConfig::None), Err(ConfigError::MemoryMib(1))));
    }
}
