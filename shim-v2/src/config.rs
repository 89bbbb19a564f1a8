//! Shim side of the runtime configuration: the file model, loading and
//! validation live in `vmrt-config` (shared with `vmrt check`); here are the
//! parts only the shim needs: the `ConfigPath` runtime option and the guest
//! kernel command line.

use std::path::PathBuf;

use protobuf::well_known_types::any::Any;
pub use vmrt_config::{Config, ConfigError};

/// Guest kernel command line key that starts the agent as a VM template: it
/// asks the VMM for a snapshot once its listeners are up, and after a restore
/// waits for the `Restored` RPC (crate::template).
pub const TEMPLATE_CMDLINE_KEY: &str = "vmrt.template=1";

/// Guest kernel command line: the shim's own parameters (docs/contracts.md
/// "Guest kernel command line"), then [`TEMPLATE_CMDLINE_KEY`] when `template`
/// (the command line of a template VM and of every sandbox restored from it:
/// they must be the same machine), then `hypervisor.kernel_params`.
pub fn kernel_cmdline(config: &Config, template: bool) -> String {
    let mut c = format!(
        "console=ttyS0 quiet vmrt.port={} vmrt.io_port={} vmrt.log_port={} vmrt.share={}:{} vmrt.log={}",
        crate::agent::AGENT_PORT,
        crate::agent::IO_PORT,
        vmrt_protocol::DEFAULT_LOG_PORT,
        crate::sandbox::SHARE_TAG,
        crate::sandbox::GUEST_SHARE_DIR,
        config.agent.log_level
    );
    if template {
        c.push(' ');
        c.push_str(TEMPLATE_CMDLINE_KEY);
    }
    if !config.hypervisor.kernel_params.trim().is_empty() {
        c.push(' ');
        c.push_str(config.hypervisor.kernel_params.trim());
    }
    c
}

/// Full name of containerd's generic runtime options message
/// (`github.com/containerd/containerd/pkg/runtimeoptions/v1`), which CRI sends for a
/// non-runc `runtime_type` with `[...runtimes.vmrt.options] ConfigPath = "..."` and
/// `ctr run --runtime-config-path` sends for non-runc runtimes.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Extracts `config_path` (field 2 of `runtimeoptions.v1.Options`) from the
/// CreateTaskRequest options. Other option types (e.g. `containerd.runc.v1.Options`)
/// carry no config path and give `Ok(None)`.
///
/// Errors: [`ConfigError::Options`] if the options claim to be
/// `runtimeoptions.v1.Options` but are not valid protobuf.
pub fn config_path_from_options(options: Option<&Any>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(any) = options else { return Ok(None) };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS_TYPE {
        return Ok(None);
    }
    let err = |e: protobuf::Error| ConfigError::Options {
        type_url: any.type_url.clone(),
        message: e.to_string(),
    };
    let mut is = protobuf::CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Some(tag) = is.read_raw_tag_or_eof().map_err(err)? {
        if tag == (2 << 3) | 2 {
            path = Some(is.read_string().map_err(err)?);
        } else {
            protobuf::rt::skip_field_for_tag(tag, &mut is).map_err(err)?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_has_the_agent_settings_then_the_extra_params() {
        let mut c = Config::default();
        c.agent.log_level = "debug".into();
        c.hypervisor.kernel_params = " foo=1 ".into();
        let cmdline = kernel_cmdline(&c, false);
        assert!(cmdline.starts_with("console=ttyS0 quiet "), "{cmdline}");
        assert!(cmdline.contains("vmrt.share=vmrtshared:/run/vmrt/shared"), "{cmdline}");
        assert!(cmdline.contains("vmrt.log=debug"), "{cmdline}");
        assert!(cmdline.contains(" vmrt.log_port=1026 "), "{cmdline}");
        assert!(cmdline.ends_with(" foo=1"), "{cmdline}");
        assert!(!cmdline.contains("vmrt.template"), "{cmdline}");
        let template = kernel_cmdline(&c, true);
        assert!(template.ends_with(" vmrt.template=1 foo=1"), "{template}");
        assert_eq!(template.replace(" vmrt.template=1", ""), cmdline);
    }

    fn runtime_options(path: &str) -> Any {
        // runtimeoptions.v1.Options { type_url = 1, config_path = 2 }
        let mut v = Vec::new();
        {
            let mut os = protobuf::CodedOutputStream::vec(&mut v);
            os.write_string(1, "io.containerd.vmrt.v2").unwrap();
            os.write_string(2, path).unwrap();
            os.flush().unwrap();
        }
        Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value: v,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_option_is_decoded() {
        let any = runtime_options("/etc/vmrt/test.toml");
        assert_eq!(
            config_path_from_options(Some(&any)).unwrap(),
            Some(PathBuf::from("/etc/vmrt/test.toml"))
        );
        let mut prefixed = any.clone();
        prefixed.type_url = format!("type.googleapis.com/{RUNTIME_OPTIONS_TYPE}");
        assert!(config_path_from_options(Some(&prefixed)).unwrap().is_some());
        assert_eq!(config_path_from_options(None).unwrap(), None);
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x0a, 0x01, b'x'],
            ..Default::default()
        };
        assert_eq!(config_path_from_options(Some(&runc)).unwrap(), None);
        let garbage = Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value: vec![0x12, 0x50, b'x'],
            ..Default::default()
        };
        assert!(matches!(
            config_path_from_options(Some(&garbage)),
            Err(ConfigError::Options { .. })
        ));
    }
}
