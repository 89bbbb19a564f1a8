//! Agent settings read from the guest kernel command line (`/proc/cmdline`).
//!
//! Keys (see docs/contracts.md, "Guest kernel command line read by the agent"):
//!
//! | key                      | value                                  | default |
//! |--------------------------|----------------------------------------|---------|
//! | `vmrt.port=`             | vsock port of the ttrpc API, 1..2^32-2  | 1024    |
//! | `vmrt.io_port=`          | vsock port of the stdio streams         | 1025    |
//! | `vmrt.log=`              | `error`, `warn`, `info`, `debug`, `trace` | `info` |
//! | `vmrt.share=<tag>:<dir>` | virtio-fs tag and absolute guest mount point (repeatable) | none |
//! | `vmrt.debug_console`     | bare, or `=1/0/true/false/yes/no/on/off` | false  |
//! | `vmrt.log_port=`         | host vsock port (CID 2) that also receives the log lines | none |
//! | `vmrt.template`          | bare, or `=1/0/true/false/yes/no/on/off`: boot as a VM template (see `crate::template`) | false |
//!
//! Parsing never fails as a whole: a malformed value is reported as a
//! [`ConfigError`] and the default is kept, so the agent always starts (and
//! logs what it ignored). Unknown `vmrt.*` keys are reported too (as
//! warnings); keys of other prefixes belong to the kernel and are skipped.

use std::path::{Component, Path, PathBuf};

use vmrt_protocol::{DEFAULT_API_PORT, DEFAULT_IO_PORT};

/// Longest virtio-fs tag, in bytes (virtio 1.2 §5.11.4: `tag` is 36 bytes).
pub const MAX_SHARE_TAG_LEN: usize = 36;

/// One `vmrt.share=<tag>:<dir>`: a virtio-fs device to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-fs tag of the device (the `source` of `mount -t virtiofs`).
    pub tag: String,
    /// Absolute guest directory to mount it on (created if missing).
    pub mount_point: PathBuf,
}

/// Effective agent settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// vsock port of the ttrpc agent API (`vmrt.port`).
    pub api_port: u32,
    /// vsock port of the stdio stream listener (`vmrt.io_port`).
    pub io_port: u32,
    /// Log level (`vmrt.log`).
    pub log_level: log::LevelFilter,
    /// virtio-fs shares to mount, in command line order (`vmrt.share`).
    pub shares: Vec<Share>,
    /// Debug console requested (`vmrt.debug_console`).
    pub debug_console: bool,
    /// Host vsock port the agent sends its log lines to (`vmrt.log_port`):
    /// a guest-initiated connection, which the VMM's hybrid vsock forwards to
    /// `<uds>_<port>` on the host. While it is up the console gets only
    /// warnings and errors.
    pub log_port: Option<u32>,
    /// Boot as a VM template (`vmrt.template`): the agent defers the
    /// virtio-fs shares and the log port to the `Restored` RPC, asks the VMM
    /// for a snapshot once its listeners are up (as PID 1), and refuses every
    /// container and process call until `Restored` succeeded.
    pub template: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            api_port: DEFAULT_API_PORT,
            io_port: DEFAULT_IO_PORT,
            log_level: log::LevelFilter::Info,
            shares: Vec::new(),
            debug_console: false,
            log_port: None,
            template: false,
        }
    }
}

/// A problem found in the command line. The setting concerned keeps its
/// default (or, for a share, the share is skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A `vmrt.*` key this agent does not know (a warning).
    #[error("unknown kernel command line key {0:?} ignored")]
    UnknownKey(String),
    /// A key that needs a value was given without `=value`.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A port is not a number in 1..=4294967294 (`VMADDR_PORT_ANY` excluded).
    #[error("{key}={value:?}: not a vsock port (1..=4294967294); using default {default}")]
    BadPort {
        /// `vmrt.port` or `vmrt.io_port`.
        key: &'static str,
        /// The value given.
        value: String,
        /// The port used instead.
        default: u32,
    },
    /// `vmrt.log_port` is not a vsock port.
    #[error("vmrt.log_port={0:?}: not a vsock port (1..=4294967294); logging to the console only")]
    BadLogPort(String),
    /// API and I/O ports are the same.
    #[error("vmrt.port and vmrt.io_port are both {0}; using defaults {DEFAULT_API_PORT} and {DEFAULT_IO_PORT}")]
    SamePorts(u32),
    /// `vmrt.log` is not a level name.
    #[error("vmrt.log={0:?}: expected error, warn, info, debug or trace; using info")]
    BadLogLevel(String),
    /// A boolean key (`vmrt.debug_console`, `vmrt.template`) has a value
    /// that is not a boolean; the key keeps its default (false).
    #[error("{key}={value:?}: expected 1, 0, true, false, yes, no, on or off")]
    BadBool {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// `vmrt.share` value is malformed.
    #[error("vmrt.share={value:?} skipped: {reason}")]
    BadShare {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ConfigError {
    /// Whether this is only a warning (unknown key) rather than a malformed
    /// value.
    pub fn is_warning(&self) -> bool {
        matches!(self, ConfigError::UnknownKey(_))
    }
}

/// Settings parsed from a command line plus the problems found on the way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Effective settings (defaults where a value was bad or missing).
    pub settings: Settings,
    /// Problems, in command line order.
    pub problems: Vec<ConfigError>,
}

/// Splits a kernel command line into parameters: whitespace separated,
/// double quotes group (and are removed), as the kernel's `next_arg` does.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_token = false;
    for ch in cmdline.chars() {
        match ch {
            '"' => {
                in_quotes = !in_quotes;
                has_token = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_token {
                    out.push(std::mem::take(&mut cur));
                    has_token = false;
                }
            }
            c => {
                cur.push(c);
                has_token = true;
            }
        }
    }
    if has_token {
        out.push(cur);
    }
    out
}

fn parse_port(key: &'static str, value: &str, default: u32) -> Result<u32, ConfigError> {
    match value.parse::<u32>() {
        Ok(p) if p != 0 && p != u32::MAX => Ok(p),
        _ => Err(ConfigError::BadPort {
            key,
            value: value.to_string(),
            default,
        }),
    }
}

fn parse_level(value: &str) -> Result<log::LevelFilter, ConfigError> {
    match value {
        "error" => Ok(log::LevelFilter::Error),
        "warn" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        other => Err(ConfigError::BadLogLevel(other.to_string())),
    }
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(ConfigError::BadBool {
            key,
            value: other.to_string(),
        }),
    }
}

fn parse_share(value: &str) -> Result<Share, ConfigError> {
    let bad = |reason| ConfigError::BadShare {
        value: value.to_string(),
        reason,
    };
    let (tag, dir) = value
        .split_once(':')
        .ok_or_else(|| bad("expected <tag>:<dir>"))?;
    if tag.is_empty() || tag.len() > MAX_SHARE_TAG_LEN {
        return Err(bad("tag must be 1..=36 bytes"));
    }
    if !tag.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(bad("tag must be printable ASCII without ':'"));
    }
    let path = Path::new(dir);
    if !path.is_absolute() {
        return Err(bad("mount point must be an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("mount point must not contain '.' or '..'"));
    }
    if path.parent().is_none() {
        return Err(bad("mount point must not be /"));
    }
    Ok(Share {
        tag: tag.to_string(),
        mount_point: path.to_path_buf(),
    })
}

/// Parses the settings from a kernel command line string (the contents of
/// `/proc/cmdline`). Never fails: see [`Parsed::problems`].
pub fn parse_cmdline(cmdline: &str) -> Parsed {
    let mut s = Settings::default();
    let mut problems = Vec::new();
    for param in split_cmdline(cmdline) {
        if param == "--" {
            // Everything after "--" is for init's argv, not kernel params,
            // but the kernel still shows it; keep reading vmrt.* keys.
            continue;
        }
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param.as_str(), None),
        };
        if !key.starts_with("vmrt.") {
            continue;
        }
        let result = match (key, value) {
            ("vmrt.port", Some(v)) => {
                parse_port("vmrt.port", v, DEFAULT_API_PORT).map(|p| s.api_port = p)
            }
            ("vmrt.io_port", Some(v)) => {
                parse_port("vmrt.io_port", v, DEFAULT_IO_PORT).map(|p| s.io_port = p)
            }
            ("vmrt.log", Some(v)) => parse_level(v).map(|l| s.log_level = l),
            ("vmrt.share", Some(v)) => parse_share(v).and_then(|share| {
                if s.shares.iter().any(|x| x.mount_point == share.mount_point) {
                    Err(ConfigError::BadShare {
                        value: v.to_string(),
                        reason: "mount point already used by an earlier vmrt.share",
                    })
                } else {
                    s.shares.push(share);
                    Ok(())
                }
            }),
            ("vmrt.debug_console", None) => {
                s.debug_console = true;
                Ok(())
            }
            ("vmrt.debug_console", Some(v)) => {
                parse_bool("vmrt.debug_console", v).map(|b| s.debug_console = b)
            }
            ("vmrt.template", None) => {
                s.template = true;
                Ok(())
            }
            ("vmrt.template", Some(v)) => parse_bool("vmrt.template", v).map(|b| s.template = b),
            ("vmrt.log_port", Some(v)) => match v.parse::<u32>() {
                Ok(p) if p != 0 && p != u32::MAX => {
                    s.log_port = Some(p);
                    Ok(())
                }
                _ => Err(ConfigError::BadLogPort(v.to_string())),
            },
            ("vmrt.log_port", None) => Err(ConfigError::MissingValue("vmrt.log_port")),
            ("vmrt.port", None) => Err(ConfigError::MissingValue("vmrt.port")),
            ("vmrt.io_port", None) => Err(ConfigError::MissingValue("vmrt.io_port")),
            ("vmrt.log", None) => Err(ConfigError::MissingValue("vmrt.log")),
            ("vmrt.share", None) => Err(ConfigError::MissingValue("vmrt.share")),
            (other, _) => Err(ConfigError::UnknownKey(other.to_string())),
        };
        if let Err(e) = result {
            problems.push(e);
        }
    }
    if s.api_port == s.io_port {
        problems.push(ConfigError::SamePorts(s.api_port));
        s.api_port = DEFAULT_API_PORT;
        s.io_port = DEFAULT_IO_PORT;
    }
    Parsed {
        settings: s,
        problems,
    }
}

/// Reads and parses `/proc/cmdline`. If it cannot be read the defaults are
/// returned with the read error in `Err` (to be logged).
pub fn from_proc_cmdline() -> (Parsed, Option<std::io::Error>) {
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(s) => (parse_cmdline(&s), None),
        Err(e) => (Parsed::default(), Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_no_vmrt_keys() {
        let p = parse_cmdline("console=ttyS0 reboot=k panic=-1 quiet\n");
        assert_eq!(p.settings, Settings::default());
        assert!(p.problems.is_empty());
        assert_eq!(p.settings.api_port, 1024);
        assert_eq!(p.settings.io_port, 1025);
    }

    #[test]
    fn all_keys() {
        let p = parse_cmdline(
            "console=ttyS0 vmrt.port=2000 vmrt.io_port=2001 vmrt.log=debug \
             vmrt.share=vmrtshared:/run/vmrt/shared vmrt.share=t2:/mnt/x \
             vmrt.debug_console virtio_mmio.device=4K@0xd0000000:5\n",
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.settings.api_port, 2000);
        assert_eq!(p.settings.io_port, 2001);
        assert_eq!(p.settings.log_level, log::LevelFilter::Debug);
        assert!(p.settings.debug_console);
        assert_eq!(
            p.settings.shares,
            vec![
                Share {
                    tag: "vmrtshared".into(),
                    mount_point: "/run/vmrt/shared".into()
                },
                Share {
                    tag: "t2".into(),
                    mount_point: "/mnt/x".into()
                },
            ]
        );
    }

    #[test]
    fn debug_console_values() {
        assert!(!parse_cmdline("vmrt.debug_console=0").settings.debug_console);
        assert!(
            parse_cmdline("vmrt.debug_console=on")
                .settings
                .debug_console
        );
        let p = parse_cmdline("vmrt.debug_console=maybe");
        assert!(!p.settings.debug_console);
        assert_eq!(
            p.problems,
            vec![ConfigError::BadBool {
                key: "vmrt.debug_console",
                value: "maybe".into()
            }]
        );
    }

    #[test]
    fn template_values() {
        assert!(!parse_cmdline("console=ttyS0").settings.template);
        let p = parse_cmdline("vmrt.template");
        assert!(p.settings.template);
        assert!(p.problems.is_empty());
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("on", true),
            ("0", false),
            ("false", false),
            ("no", false),
            ("off", false),
        ] {
            let p = parse_cmdline(&format!("vmrt.template={v}"));
            assert_eq!(p.settings.template, want, "{v}");
            assert!(p.problems.is_empty(), "{v}: {:?}", p.problems);
        }
        // The last occurrence wins, as for the other keys.
        assert!(
            !parse_cmdline("vmrt.template vmrt.template=0")
                .settings
                .template
        );
        // A bad value keeps the default and names the key.
        let p = parse_cmdline("vmrt.template=2 vmrt.template=");
        assert!(!p.settings.template);
        assert_eq!(
            p.problems,
            vec![
                ConfigError::BadBool {
                    key: "vmrt.template",
                    value: "2".into()
                },
                ConfigError::BadBool {
                    key: "vmrt.template",
                    value: "".into()
                },
            ]
        );
        assert!(p.problems[0].to_string().starts_with("vmrt.template=\"2\""));
        // Independent of vmrt.debug_console.
        let p = parse_cmdline("vmrt.template=on vmrt.debug_console=off");
        assert!(p.settings.template && !p.settings.debug_console);
    }

    #[test]
    fn malformed_values_keep_defaults() {
        let p = parse_cmdline(
            "vmrt.port=abc vmrt.io_port=0 vmrt.log=loud vmrt.share=nocolon \
             vmrt.share=t:relative vmrt.share=:/x vmrt.share=t:/a/../b vmrt.share=t:/ vmrt.port",
        );
        assert_eq!(p.settings, Settings::default());
        assert_eq!(p.problems.len(), 9, "{:?}", p.problems);
        assert!(p.problems.iter().all(|e| !e.is_warning()));
        assert_eq!(
            p.problems[0],
            ConfigError::BadPort {
                key: "vmrt.port",
                value: "abc".into(),
                default: 1024
            }
        );
        assert_eq!(p.problems[2], ConfigError::BadLogLevel("loud".into()));
        assert_eq!(p.problems[8], ConfigError::MissingValue("vmrt.port"));
        // Messages name the key and the value.
        let msg = p.problems[1].to_string();
        assert!(
            msg.contains("vmrt.io_port") && msg.contains("\"0\""),
            "{msg}"
        );
    }

    #[test]
    fn port_limits() {
        assert_eq!(
            parse_cmdline("vmrt.port=4294967294").settings.api_port,
            4294967294
        );
        let p = parse_cmdline("vmrt.port=4294967295");
        assert_eq!(p.settings.api_port, 1024);
        assert_eq!(p.problems.len(), 1);
        let p = parse_cmdline("vmrt.port=4294967296 vmrt.io_port=-1");
        assert_eq!(p.problems.len(), 2);
    }

    #[test]
    fn same_ports_fall_back() {
        let p = parse_cmdline("vmrt.port=5000 vmrt.io_port=5000");
        assert_eq!(p.settings.api_port, 1024);
        assert_eq!(p.settings.io_port, 1025);
        assert_eq!(p.problems, vec![ConfigError::SamePorts(5000)]);
        // Setting the API port to the default I/O port also collides.
        let p = parse_cmdline("vmrt.port=1025");
        assert_eq!(p.problems, vec![ConfigError::SamePorts(1025)]);
    }

    #[test]
    fn unknown_vmrt_key_is_a_warning_and_others_are_ignored() {
        let p = parse_cmdline("vmrt.bogus=1 foo.bar=2 vmrtx=3 vmrt.log=warn");
        assert_eq!(p.settings.log_level, log::LevelFilter::Warn);
        assert_eq!(
            p.problems,
            vec![ConfigError::UnknownKey("vmrt.bogus".into())]
        );
        assert!(p.problems[0].is_warning());
    }

    #[test]
    fn duplicate_share_mount_point_skipped() {
        let p = parse_cmdline("vmrt.share=a:/m vmrt.share=b:/m");
        assert_eq!(p.settings.shares.len(), 1);
        assert_eq!(p.settings.shares[0].tag, "a");
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn share_tag_limits() {
        let ok = format!("vmrt.share={}:/m", "t".repeat(36));
        assert_eq!(parse_cmdline(&ok).settings.shares.len(), 1);
        let long = format!("vmrt.share={}:/m", "t".repeat(37));
        let p = parse_cmdline(&long);
        assert!(p.settings.shares.is_empty());
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn quotes_and_garbage() {
        assert_eq!(
            split_cmdline(" a \"b c\"  d=\"e f\" \"\" \n"),
            vec!["a", "b c", "d=e f", ""]
        );
        let p = parse_cmdline("vmrt.share=\"t:/with space\" \u{0}\u{ff} vmrt.log=\u{1F600}");
        assert_eq!(
            p.settings.shares[0].mount_point,
            PathBuf::from("/with space")
        );
        assert_eq!(p.problems.len(), 1);
        // Arbitrary bytes never panic.
        let junk: String = (0u32..2000)
            .filter_map(|i| char::from_u32((i * 7919) % 0x3000))
            .collect();
        let _ = parse_cmdline(&junk);
    }

    #[test]
    fn log_port_is_optional_and_checked() {
        assert_eq!(parse_cmdline("quiet").settings.log_port, None);
        let p = parse_cmdline("vmrt.log_port=1026");
        assert_eq!(p.settings.log_port, Some(1026));
        assert!(p.problems.is_empty());
        for bad in [
            "vmrt.log_port=0",
            "vmrt.log_port=x",
            "vmrt.log_port=4294967295",
            "vmrt.log_port",
        ] {
            let p = parse_cmdline(bad);
            assert_eq!(p.settings.log_port, None, "{bad}");
            assert_eq!(p.problems.len(), 1, "{bad}");
        }
    }
}
