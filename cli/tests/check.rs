//! `vmrt check` run as a user would, against crafted configs and this host's
//! real /dev/kvm.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A vmrt config whose kernel has `options` in its `.config`, an initrd,
    /// and a containerd config that registers the handler when `cri` is true.
    fn new(options: &[&str], cri: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("vmlinux"), b"\x7fELF").unwrap();
        let config: String = options.iter().map(|o| format!("CONFIG_{o}=y\n")).collect();
        fs::write(p.join("vmlinux.config"), config).unwrap();
        fs::write(p.join("initramfs.cpio"), b"070701").unwrap();
        fs::write(
            p.join("vmrt.toml"),
            format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                p.join("vmlinux").display(),
                p.join("initramfs.cpio").display()
            ),
        )
        .unwrap();
        let runtime = if cri { "io.containerd.vmrt.v2" } else { "io.containerd.runc.v2" };
        fs::write(
            p.join("containerd.toml"),
            format!("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmrt]\nruntime_type = \"{runtime}\"\n"),
        )
        .unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn check(&self, wrap: &[&str]) -> (bool, Value) {
        let bin = env!("CARGO_BIN_EXE_vmrt");
        let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
        args.extend([bin.to_string(), "check".into(), "--json".into()]);
        args.extend(["--config".into(), self.path("vmrt.toml").display().to_string()]);
        args.extend(["--containerd-config".into(), self.path("containerd.toml").display().to_string()]);
        let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(out.status.success(), report["ok"].as_bool().unwrap(), "exit status must match report.ok");
        (out.status.success(), report)
    }
}

fn item<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["items"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap_or_else(|| panic!("no item {id} in {report}"))
}

const ALL_OPTIONS: &[&str] = vmrt_cli::check::REQUIRED_KERNEL_OPTIONS;

#[test]
fn complete_guest_config_passes_its_items() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let (_, report) = f.check(&[]);
    for id in ["config", "kernel", "kernel.options", "initrd", "containerd.cri"] {
        assert_eq!(item(&report, id)["status"], "ok", "{id}: {}", item(&report, id));
    }
}

#[test]
fn kvm_pvm_host_is_reported_and_fails() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host is not kvm-pvm");
        return;
    }
    let f = Fixture::new(ALL_OPTIONS, true);
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    assert_eq!(report["flavour"], "kvm-pvm");
    let flavour = item(&report, "kvm.flavour");
    assert_eq!(flavour["status"], "fail");
    let detail = flavour["detail"].as_str().unwrap();
    for word in ["XRSTOR", "INT3", "POPCNT", "CLAC", "CONFIG_PVM_GUEST"] {
        assert!(detail.contains(word), "{word} missing from {detail}");
    }
}

/// A PVM kernel that the vmrt config does not declare: the shim would refuse it, so
/// `vmrt check` must fail too and say which key to set.
#[test]
fn kvm_pvm_host_with_undeclared_pvm_kernel_fails_naming_the_key() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host is not kvm-pvm");
        return;
    }
    let mut options = ALL_OPTIONS.to_vec();
    options.push("PVM_GUEST");
    let f = Fixture::new(&options, true);
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let flavour = item(&report, "kvm.flavour");
    assert_eq!(flavour["status"], "fail", "{flavour}");
    assert!(flavour["hint"].as_str().unwrap().contains("pvm_guest = true"), "{flavour}");
    // Declared: a warning only.
    let cfg = fs::read_to_string(f.path("vmrt.toml")).unwrap();
    fs::write(f.path("vmrt.toml"), cfg + "pvm_guest = true\n").unwrap();
    let (_, report) = f.check(&[]);
    assert_eq!(item(&report, "kvm.flavour")["status"], "warn");
}

#[test]
fn missing_kernel_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fs::remove_file(f.path("vmlinux")).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let kernel = item(&report, "kernel");
    assert_eq!(kernel["status"], "fail");
    assert!(kernel["detail"].as_str().unwrap().contains("vmlinux"));
}

#[test]
fn kernel_without_vsock_fails_naming_the_option() {
    let opts: Vec<&str> = ALL_OPTIONS.iter().copied().filter(|o| *o != "VIRTIO_VSOCKETS").collect();
    let f = Fixture::new(&opts, true);
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let options = item(&report, "kernel.options");
    assert_eq!(options["status"], "fail");
    assert!(options["detail"].as_str().unwrap().contains("CONFIG_VIRTIO_VSOCKETS"));
}

#[test]
fn unreadable_kvm_device_fails() {
    // /dev/kvm is root-only on the hosts we run on; check it as `nobody`.
    let f = Fixture::new(ALL_OPTIONS, true);
    for name in ["vmrt.toml", "containerd.toml", "vmlinux", "vmlinux.config", "initramfs.cpio", ""] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if name.is_empty() { 0o755 } else { 0o644 };
        fs::set_permissions(f.path(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    let (ok, report) = f.check(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
    assert!(!ok);
    let kvm = item(&report, "kvm.device");
    assert_eq!(kvm["status"], "fail");
    assert!(kvm["detail"].as_str().unwrap().contains("cannot be opened"), "{kvm}");
}

#[test]
fn containerd_without_handler_fails() {
    let f = Fixture::new(ALL_OPTIONS, false);
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let cri = item(&report, "containerd.cri");
    assert_eq!(cri["status"], "fail");
    assert!(cri["detail"].as_str().unwrap().contains("io.containerd.vmrt.v2"));
}
