//! Shim lifecycle (containerd runtime v2 shim protocol): the `start`, `delete` and
//! serve actions, built on the `containerd-shim` crate's [`Shim`] trait.
//!
//! The crate's own `run()` speaks only what containerd ≥ 2.0 expects (a JSON/bootstrap
//! reply to `start` and the `containerd.task.v3.Task` service name). containerd 1.6
//! reads the `start` reply as a plain socket address and calls
//! `containerd.task.v2.Task`, so [`run`] drives the same [`Shim`] implementation with a
//! bootstrap that prints the plain address (which containerd 2.x also accepts, as task
//! API v2) and registers the task service under both service names (the v3 service is a
//! renamed copy of v2 with identical messages).

use std::{
    collections::HashMap,
    io::Read,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::{publisher::RemotePublisher, spawn, ExitSignal, Shim},
    protos::{
        protobuf::{well_known_types::any::Any, Message},
        shim_async::create_task,
        ttrpc::asynchronous::{transport::Listener, Server},
    },
    util::timestamp,
    Config as ShimConfig, DeleteResponse, Error, Flags, StartOpts,
};
use tokio::io::AsyncWriteExt;

use crate::{
    config::Config,
    preboot::{self, Preboot},
    sandbox,
    task::{TaskService, BUNDLE_SANDBOX_FILE},
};

/// containerd runtime name of vmrt.
pub const RUNTIME_ID: &str = "io.containerd.vmrt.v2";
/// Task service names registered (containerd 1.6/1.7 use v2, 2.x may use v3).
const TASK_SERVICES: &[&str] = &["containerd.task.v2.Task", "containerd.task.v3.Task"];
/// Environment variable containerd passes with its ttrpc address.
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";
/// Exit status `delete` reports for a task whose shim is gone (SIGKILL).
const KILLED_EXIT_STATUS: u32 = 128 + 9;

/// The shim instance.
pub struct Service {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
    task: Mutex<Option<TaskService>>,
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
            task: Mutex::new(None),
        }
    }

    /// Spawns the serving shim (same binary, `-socket` flag) and returns its address.
    /// The grouping key is the container id: one shim (and one VM) per container.
    /// The serving shim boots the VM at once from the runtime options' config path
    /// (crate::preboot).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let preboot = preboot::start_env(&opts.extensions);
        let vars = match &preboot {
            Some(path) => vec![(preboot::PREBOOT_CONFIG_ENV, path.as_str())],
            None => {
                // The serving shim inherits this process's environment, which is
                // containerd's: a stray value there must not make it pre-boot.
                // `start` is short-lived and reads no other variable meanwhile.
                std::env::remove_var(preboot::PREBOOT_CONFIG_ENV);
                Vec::new()
            }
        };
        let address = spawn(opts, &grouping, vars).await?;
        std::fs::write(self.bundle.join("address"), &address)
            .map_err(|e| Error::Other(format!("write address file: {e}")))?;
        Ok(address)
    }

    /// Cleanup after a crashed shim: kill the VMM named by the sandbox's pid file,
    /// unmount, remove the sandbox directory; report the task as SIGKILLed.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let dir = sandbox_dir_for(&self.bundle, &self.id);
        log::info!("delete: cleaning up sandbox {}", dir.display());
        sandbox::cleanup_after_crash(&dir)
            .await
            .map_err(|e| Error::Other(format!("cleanup of {}: {e}", dir.display())))?;
        let _ = std::fs::remove_file(self.bundle.join(BUNDLE_SANDBOX_FILE));
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED_EXIT_STATUS,
            exited_at: Some(timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        let task = self.task.lock().unwrap().clone();
        if let Some(t) = task {
            t.teardown_all().await;
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let t = TaskService::new(&self.namespace, publisher, self.exit.clone());
        *self.task.lock().unwrap() = Some(t.clone());
        t
    }
}

/// The sandbox directory of container `id`: recorded in the bundle at Create, else
/// `<sandbox_dir>/<id>` from the configuration in effect (`VMRT_CONFIG` or default).
pub fn sandbox_dir_for(bundle: &Path, id: &str) -> PathBuf {
    if let Ok(s) = std::fs::read_to_string(bundle.join(BUNDLE_SANDBOX_FILE)) {
        let p = PathBuf::from(s.trim());
        if p.is_absolute() && p.file_name().is_some_and(|n| n == id) {
            return p;
        }
    }
    let base = Config::load(None)
        .map(|c| c.runtime.sandbox_dir)
        .unwrap_or_else(|_| Config::default().runtime.sandbox_dir);
    base.join(id)
}

/// Reads the runtime options containerd writes to the `start` action's stdin (an Any).
fn read_start_options() -> Vec<Any> {
    let mut input = Vec::new();
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Vec::new();
    }
    let _ = std::io::stdin()
        .lock()
        .take(10 << 20)
        .read_to_end(&mut input);
    match Any::parse_from_bytes(&input) {
        Ok(a) if !a.type_url.is_empty() => vec![a],
        _ => Vec::new(),
    }
}

/// Shim entry point (call from the tokio main). Dispatches on the action argument:
/// `start`, `delete`, or serve (no action, `-socket` given).
pub async fn run() -> Result<(), Error> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..])?;
    if flags.version {
        println!(
            "containerd-shim-vmrt-v2 {} ({RUNTIME_ID})",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    let mut shim_config = ShimConfig::default();
    let mut shim = Service::new(RUNTIME_ID, &flags, &mut shim_config).await;
    match flags.action.as_str() {
        "start" => {
            let opts = StartOpts {
                id: flags.id.clone(),
                publish_binary: flags.publish_binary.clone(),
                address: flags.address.clone(),
                ttrpc_address: std::env::var(TTRPC_ADDRESS).unwrap_or_default(),
                namespace: flags.namespace.clone(),
                debug: flags.debug,
                extensions: read_start_options(),
                ..Default::default()
            };
            if opts.ttrpc_address.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{TTRPC_ADDRESS} is not set"
                )));
            }
            let address = shim.start_shim(opts).await?;
            let mut out = tokio::io::stdout();
            out.write_all(address.as_bytes())
                .await
                .map_err(|e| Error::Other(format!("write address: {e}")))?;
            out.flush()
                .await
                .map_err(|e| Error::Other(format!("flush stdout: {e}")))?;
            Ok(())
        }
        "delete" => {
            let r = shim.delete_shim().await?;
            let mut out = tokio::io::stdout();
            out.write_all(&r.write_to_bytes()?)
                .await
                .map_err(|e| Error::Other(format!("write delete response: {e}")))?;
            out.flush()
                .await
                .map_err(|e| Error::Other(format!("flush stdout: {e}")))?;
            Ok(())
        }
        "" => serve(shim, &flags).await,
        other => Err(Error::InvalidArgument(format!("unknown action {other:?}"))),
    }
}

/// Serves the task service on `-socket` until Shutdown, then tears everything down.
async fn serve(mut shim: Service, flags: &Flags) -> Result<(), Error> {
    if flags.socket.is_empty() {
        return Err(Error::InvalidArgument(
            "shim socket (-socket) cannot be empty".into(),
        ));
    }
    // Own session: containerd's process group signals must not reach the shim.
    let _ = nix::unistd::setsid();
    let level = Config::load(None)
        .map(|c| c.runtime.log_level)
        .unwrap_or_else(|_| "info".into());
    containerd_shim::logger::init(flags.debug, &level, &flags.namespace, &flags.id)?;
    log::info!(
        "containerd-shim-vmrt-v2 {} serving {} for {}",
        env!("CARGO_PKG_VERSION"),
        flags.socket,
        flags.id
    );

    let ttrpc_address = std::env::var(TTRPC_ADDRESS)?;
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let service = shim.create_task_service(publisher).await;
    let task: Arc<dyn containerd_shim::Task + Send + Sync> = Arc::new(service.clone());
    let mut services = HashMap::new();
    for name in TASK_SERVICES {
        for (_, svc) in create_task(task.clone()) {
            services.insert(name.to_string(), svc);
        }
    }
    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    if let Some(parent) = Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|e| Error::Other(format!("bind {path}: {e}")))?
        }
        Err(e) => return Err(Error::Other(format!("bind {path}: {e}"))),
    };
    let listener =
        Listener::try_from(listener).map_err(|e| Error::Other(format!("ttrpc listener: {e}")))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    // Boot the VM while containerd waits for `start` and connects (crate::preboot).
    // Not before: a serving shim that fails to come up must not leave a VM behind.
    // Not later: containerd sends Create only after `start` returns, below.
    if let Some(p) = Preboot::from_env(&flags.id, &shim.bundle) {
        service.set_preboot(p).await;
    }
    // Tell `start` we are up: its copy of our stdout ends when stdout is closed.
    // SAFETY: dup2 of valid descriptors; stderr is /dev/null from `spawn`.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => log::info!("SIGTERM ignored; waiting for Shutdown"),
                _ = int.recv() => log::info!("SIGINT ignored; waiting for Shutdown"),
            }
        }
    });
    shim.wait().await;
    log::info!("shutting down");
    // containerd may keep its connection open; do not wait for it forever.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_dir_from_bundle_file_or_default() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(BUNDLE_SANDBOX_FILE), "/tmp/sbx/c9\n").unwrap();
        assert_eq!(
            sandbox_dir_for(d.path(), "c9"),
            PathBuf::from("/tmp/sbx/c9")
        );
        // A file naming another container is ignored (never delete someone else's dir).
        assert_ne!(
            sandbox_dir_for(d.path(), "c8"),
            PathBuf::from("/tmp/sbx/c9")
        );
        assert!(sandbox_dir_for(d.path(), "c8").ends_with("c8"));
    }

    /// A shim that dies while its VM boots (VMM running, agent not answering yet)
    /// has already recorded the sandbox directory in the bundle, so `delete` finds
    /// and cleans up a sandbox the configuration put outside the default place.
    #[tokio::test]
    async fn delete_after_a_crash_during_the_boot_finds_the_sandbox() {
        let d = tempfile::tempdir().unwrap();
        let fake = crate::sandbox::fake_vmm::install(d.path(), crate::sandbox::fake_vmm::SLEEPS);
        let bundle = d.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let mut c = crate::config::Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 30_000;
        let sb = c.runtime.sandbox_dir.join("c2");
        assert_ne!(sandbox_dir_for(&bundle, "c2"), sb, "the default must differ");
        let boot = tokio::spawn({
            let (c, bundle) = (c.clone(), bundle.clone());
            let cancel = tokio::sync::watch::channel(false).1;
            async move { preboot::start_recorded("c2", &c, &fake, &bundle, cancel).await }
        });
        // The VMM runs and the shim knows its pid; the agent never answers.
        let vmm_pid = sb.join("vmm.pid");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&vmm_pid).is_ok_and(|p| !p.is_empty()) {
            assert!(std::time::Instant::now() < deadline, "no VMM started");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The shim "crashes": its boot stops where it is and nothing tears down.
        boot.abort();
        assert!(boot.await.unwrap_err().is_cancelled());
        assert!(sb.exists());

        assert_eq!(sandbox_dir_for(&bundle, "c2"), sb);
        let flags = Flags {
            id: "c2".into(),
            namespace: "default".into(),
            bundle: bundle.to_string_lossy().into(),
            ..Default::default()
        };
        let mut shim = Service::new(RUNTIME_ID, &flags, &mut ShimConfig::default()).await;
        let r = shim.delete_shim().await.unwrap();
        assert_eq!(r.exit_status, 137);
        assert!(!sb.exists());
        assert!(!bundle.join(BUNDLE_SANDBOX_FILE).exists());
        // The VMM was killed; the boot's own waiter task reaps it.
        let pid_file = d.path().join("fake.pid");
        let pid = nix::unistd::Pid::from_raw(
            std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while nix::sys::signal::kill(pid, None).is_ok() {
            assert!(std::time::Instant::now() < deadline, "VMM {pid} still exists");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// A failed boot leaves no record behind.
    #[tokio::test]
    async fn a_failed_boot_removes_its_record() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let mut c = crate::config::Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        let missing = d.path().join("no-such-vmm");
        let cancel = tokio::sync::watch::channel(false).1;
        let e = preboot::start_recorded("c3", &c, &missing, &bundle, cancel)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("no-such-vmm"), "{e}");
        assert!(!bundle.join(BUNDLE_SANDBOX_FILE).exists());
        assert!(!c.runtime.sandbox_dir.join("c3").exists());
    }

    #[tokio::test]
    async fn delete_after_crash_kills_vmm_unmounts_and_reports_137() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("bundle");
        let sb = d.path().join("sandboxes/c1");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(sb.join("shared/c1/rootfs")).unwrap();
        let src = d.path().join("snapshot");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("keep"), b"1").unwrap();
        nix::mount::mount(
            Some(&src),
            &sb.join("shared/c1/rootfs"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        // A stand-in VMM (sleep) in its own process group, holding the sandbox's VMM
        // lock the way the shim hands it to vmrt-vmm.
        let lock = crate::sandbox::VmmLock::acquire(&sb).unwrap();
        let mut child = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        // SAFETY: the hook only calls fcntl(2).
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut child, lock.inherit()) };
        let mut child = child.arg("60").spawn().unwrap();
        drop(lock);
        std::fs::write(sb.join("vmm.pid"), child.id().to_string()).unwrap();
        std::fs::write(
            bundle.join(BUNDLE_SANDBOX_FILE),
            sb.to_string_lossy().as_bytes(),
        )
        .unwrap();

        let flags = Flags {
            id: "c1".into(),
            namespace: "default".into(),
            bundle: bundle.to_string_lossy().into(),
            ..Default::default()
        };
        let mut shim = Service::new(RUNTIME_ID, &flags, &mut ShimConfig::default()).await;
        let r = shim.delete_shim().await.unwrap();
        assert_eq!(r.exit_status, 137);
        assert!(r.exited_at.seconds > 0);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(!sb.exists());
        assert!(src.join("keep").exists());
        assert!(!bundle.join(BUNDLE_SANDBOX_FILE).exists());
    }
}
