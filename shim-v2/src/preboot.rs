//! Booting the sandbox's VM as soon as the serving shim runs, before containerd's
//! Create arrives.
//!
//! containerd 1.6 runs `containerd-shim-vmrt-v2 ... start`, which spawns the serving
//! shim and waits for it to listen; containerd then reads the address, connects and
//! sends CreateTask (containerd shim v2 API). The VM needs nothing of the CreateTask
//! request but the runtime options' `ConfigPath`, which containerd also writes to
//! `start`'s stdin, and the container id, which `start` gets as `-id`. So `start`
//! hands the config path to the serving shim ([`PREBOOT_CONFIG_ENV`]) and the serving
//! shim boots the VM while containerd does its part. Create then takes the sandbox
//! if it was booted for the same id and config path ([`Preboot::fits`]); otherwise the
//! pre-booted sandbox is torn down and Create boots one itself.
//!
//! A pre-boot that fails keeps its error for Create, so a missing kernel or a bad
//! configuration still fails Create with the same message. A sandbox nobody claims is
//! torn down when the shim exits ([`Preboot::discard`]).

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{config_path_from_options, Config},
    errors::{Error, Result},
    sandbox::{CancelBoot, Sandbox},
    task::BUNDLE_SANDBOX_FILE,
};

/// Environment variable through which `start` tells the serving shim to pre-boot:
/// the `ConfigPath` of the runtime options, or empty for the default configuration
/// (`VMRT_CONFIG`, else `/etc/vmrt/config.toml`). Unset: no pre-boot.
pub const PREBOOT_CONFIG_ENV: &str = "VMRT_SHIM_PREBOOT_CONFIG";

/// The [`PREBOOT_CONFIG_ENV`] value for the runtime options `start` read from its
/// stdin, or `None` (no pre-boot) when the options are malformed: Create reports
/// that, and no VM should boot for it.
pub fn start_env(options: &[Any]) -> Option<String> {
    match config_path_from_options(options.first()) {
        Ok(p) => Some(p.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()),
        Err(e) => {
            log::warn!("start: {e}; the VM boots at Create");
            None
        }
    }
}

/// Boots the sandbox of container `id` from the configuration at `config_path`
/// (`None`: the default one): loads and validates it, checks the host, starts the VM
/// and waits for the agent ([`start_recorded`]).
///
/// Errors: [`Error::Config`] for a configuration or host problem, [`Error::Sandbox`]
/// when the VM does not come up (with the console tail) or the boot was cancelled.
pub async fn boot_sandbox(
    id: &str,
    config_path: Option<&Path>,
    bundle: &Path,
    cancel: CancelBoot,
) -> Result<Sandbox> {
    let config = Config::load(config_path)?;
    let vmm = config.validate()?;
    config.check_host(Path::new(vmm::host::SYS_MODULE))?;
    start_recorded(id, &config, &vmm, bundle, cancel).await
}

/// [`Sandbox::start`], with the sandbox directory recorded in the bundle
/// ([`BUNDLE_SANDBOX_FILE`]) before the directory or the VMM exists, so that `delete`
/// after a shim crash at any point of the boot finds what to clean up, also when the
/// configuration put the sandbox outside the default `sandbox_dir`. A failed start
/// has removed everything it made, and the record goes with it.
pub(crate) async fn start_recorded(
    id: &str,
    config: &Config,
    vmm: &Path,
    bundle: &Path,
    cancel: CancelBoot,
) -> Result<Sandbox> {
    let record = bundle.join(BUNDLE_SANDBOX_FILE);
    let dir = Sandbox::dir_for(config, id);
    if let Err(e) = std::fs::write(&record, dir.as_os_str().as_encoded_bytes()) {
        log::warn!("sandbox {id}: record {}: {e}", record.display());
    }
    match Sandbox::start(id, config, vmm, cancel).await {
        Ok(sandbox) => Ok(sandbox),
        Err(e) => {
            let _ = std::fs::remove_file(&record);
            Err(e.into())
        }
    }
}

/// A sandbox booting (or booted) ahead of Create.
pub struct Preboot {
    id: String,
    config_path: Option<PathBuf>,
    bundle: PathBuf,
    cancel: watch::Sender<bool>,
    boot: JoinHandle<Result<Sandbox>>,
}

impl Preboot {
    /// Starts booting the sandbox of container `id` in a task of its own
    /// ([`boot_sandbox`]).
    pub fn spawn(id: &str, config_path: Option<PathBuf>, bundle: &Path) -> Preboot {
        log::info!(
            "sandbox {id}: booting at shim start (config {})",
            config_path
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "default".into())
        );
        let (id2, path2, bundle2) = (id.to_string(), config_path.clone(), bundle.to_path_buf());
        Preboot::spawn_with(id, config_path, bundle, move |cancel| async move {
            boot_sandbox(&id2, path2.as_deref(), &bundle2, cancel).await
        })
    }

    /// [`Preboot::spawn`] with the boot given as `boot(cancel)`.
    pub(crate) fn spawn_with<F, Fut>(id: &str, config_path: Option<PathBuf>, bundle: &Path, boot: F) -> Preboot
    where
        F: FnOnce(CancelBoot) -> Fut,
        Fut: std::future::Future<Output = Result<Sandbox>> + Send + 'static,
    {
        let (cancel, rx) = watch::channel(false);
        Preboot {
            id: id.into(),
            config_path,
            bundle: bundle.to_path_buf(),
            cancel,
            boot: tokio::spawn(boot(rx)),
        }
    }

    /// The pre-boot `start` asked for through [`PREBOOT_CONFIG_ENV`], if any.
    pub fn from_env(id: &str, bundle: &Path) -> Option<Preboot> {
        let path = std::env::var_os(PREBOOT_CONFIG_ENV)?;
        if !vmrt_protocol::stream::is_valid_id(id) {
            log::warn!("container id {id:?} is not valid; the VM boots at Create (which refuses it)");
            return None;
        }
        let path = (!path.is_empty()).then(|| PathBuf::from(path));
        Some(Preboot::spawn(id, path, bundle))
    }

    /// Whether a Create of container `id` with the options' `config_path` can use
    /// this sandbox.
    pub fn fits(&self, id: &str, config_path: Option<&Path>) -> bool {
        self.id == id && self.config_path.as_deref() == config_path
    }

    /// Waits for the boot and returns the sandbox, or the boot's error.
    pub async fn claim(self) -> Result<Sandbox> {
        self.boot
            .await
            .map_err(|e| Error::Internal(format!("sandbox {} boot task: {e}", self.id)))?
    }

    /// Calls the boot off, or tears the booted sandbox down, and removes its record
    /// from the bundle.
    pub async fn discard(self) {
        let _ = self.cancel.send(true);
        let (id, bundle) = (self.id.clone(), self.bundle.clone());
        match self.claim().await {
            Ok(sandbox) => {
                log::info!("sandbox {id}: booted at shim start but not used; tearing it down");
                match sandbox.shutdown().await {
                    // Kept otherwise: `delete` cleans up what the record names.
                    Ok(()) => {
                        let _ = std::fs::remove_file(bundle.join(BUNDLE_SANDBOX_FILE));
                    }
                    Err(e) => log::error!("sandbox {id}: teardown: {e}"),
                }
            }
            Err(e) => log::info!("sandbox {id}: boot at shim start not used: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::fake_vmm;
    use std::time::Duration;

    #[test]
    fn start_env_carries_the_config_path_or_nothing() {
        assert_eq!(start_env(&[]), Some(String::new()));
        let mut v = Vec::new();
        {
            let mut os = protobuf::CodedOutputStream::vec(&mut v);
            os.write_string(2, "/etc/vmrt/a.toml").unwrap();
            os.flush().unwrap();
        }
        let opts = Any {
            type_url: crate::config::RUNTIME_OPTIONS_TYPE.into(),
            value: v,
            ..Default::default()
        };
        assert_eq!(start_env(&[opts.clone()]), Some("/etc/vmrt/a.toml".into()));
        // Malformed options: no pre-boot (Create reports them).
        let bad = Any {
            value: vec![0x12, 0x50],
            ..opts
        };
        assert_eq!(start_env(&[bad]), None);
    }

    #[tokio::test]
    async fn fits_only_the_same_id_and_config_path() {
        let bundle = tempfile::tempdir().unwrap();
        let p = Preboot::spawn_with("c1", Some("/a.toml".into()), bundle.path(), |_| async {
            Err(Error::Internal("no VM in this test".into()))
        });
        assert!(p.fits("c1", Some(Path::new("/a.toml"))));
        assert!(!p.fits("c2", Some(Path::new("/a.toml"))));
        assert!(!p.fits("c1", None));
        assert!(!p.fits("c1", Some(Path::new("/b.toml"))));
        // A failed boot hands its error to Create.
        let e = p.claim().await.err().unwrap();
        assert!(e.to_string().contains("no VM in this test"), "{e}");
    }

    /// Discarding a sandbox still waiting for its agent cancels the boot: the VMM
    /// is killed and reaped, the sandbox directory and the bundle's record are gone.
    #[tokio::test]
    async fn discard_while_booting_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let fake = fake_vmm::install(d.path(), fake_vmm::SLEEPS);
        let bundle = d.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let mut c = Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 30_000;
        let started = std::time::Instant::now();
        let p = Preboot::spawn_with("pb1", None, &bundle, {
            let (c, fake) = (c.clone(), fake.clone());
            move |cancel| async move { Ok(Sandbox::start("pb1", &c, &fake, cancel).await?) }
        });
        let pid_file = d.path().join("fake.pid");
        while !pid_file.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p.discard().await;
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        assert!(!c.runtime.sandbox_dir.join("pb1").exists());
        assert!(!bundle.join(BUNDLE_SANDBOX_FILE).exists());
        fake_vmm::assert_gone(&pid_file);
    }
}
