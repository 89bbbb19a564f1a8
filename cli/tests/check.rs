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
        self.check_with(wrap, true, &[])
    }

    /// Runs `vmrt check --json` (under `wrap`), with `--config` when
    /// `explicit_config`, with `env` added, a procfs of the fixture's own
    /// (`proc/`, no containerd unless a test puts one there) and `bin/` of
    /// the fixture first on PATH.
    fn check_with(&self, wrap: &[&str], explicit_config: bool, env: &[(&str, String)]) -> (bool, Value) {
        let bin = env!("CARGO_BIN_EXE_vmrt");
        let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
        args.extend([bin.to_string(), "check".into(), "--json".into()]);
        if explicit_config {
            args.extend(["--config".into(), self.path("vmrt.toml").display().to_string()]);
        }
        args.extend(["--containerd-config".into(), self.path("containerd.toml").display().to_string()]);
        fs::create_dir_all(self.path("proc")).unwrap();
        args.extend(["--proc-dir".into(), self.path("proc").display().to_string()]);
        let path = format!("{}:{}", self.path("bin").display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]).env("PATH", path).env_remove("VMRT_CONFIG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
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
    // Declared and built: the flavour item passes.
    let cfg = fs::read_to_string(f.path("vmrt.toml")).unwrap();
    fs::write(f.path("vmrt.toml"), cfg + "pvm_guest = true\n").unwrap();
    let (_, report) = f.check(&[]);
    assert_eq!(item(&report, "kvm.flavour")["status"], "ok", "{}", item(&report, "kvm.flavour"));
}

/// `pvm_guest = true` for a kernel whose .config lacks CONFIG_PVM_GUEST=y: the
/// shim would boot it and hang, so the check fails and says why.
#[test]
fn kvm_pvm_host_with_declared_but_stock_kernel_fails() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host is not kvm-pvm");
        return;
    }
    let f = Fixture::new(ALL_OPTIONS, true);
    let cfg = fs::read_to_string(f.path("vmrt.toml")).unwrap();
    fs::write(f.path("vmrt.toml"), cfg + "pvm_guest = true\n").unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let flavour = item(&report, "kvm.flavour");
    assert_eq!(flavour["status"], "fail", "{flavour}");
    assert!(flavour["detail"].as_str().unwrap().contains("no CONFIG_PVM_GUEST=y"), "{flavour}");
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

/// Writes an executable shell script `bin/<name>` that prints `version`.
fn fake_binary(f: &Fixture, name: &str, version: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(f.path("bin")).unwrap();
    let p = f.path("bin").join(name);
    fs::write(&p, format!("#!/bin/sh\necho '{version}'\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn every_kvm_capability_is_its_own_item() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let (_, report) = f.check(&[]);
    for (_, name) in vmrt_cli::check::REQUIRED_CAPS {
        let cap = item(&report, &format!("kvm.cap.{name}"));
        // This host's /dev/kvm runs vmrt-vmm's integration tests, so it has them all.
        assert_eq!(cap["status"], "ok", "{cap}");
    }
    let dev = item(&report, "kvm.device");
    assert!(dev["detail"].as_str().unwrap().contains(" root:"), "mode and owner shown: {dev}");
}

/// The config the shim refuses (an unknown key) is refused by the check with
/// the shim's own message: both use vmrt-config.
#[test]
fn config_the_shim_refuses_fails_with_the_shims_message() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let cfg = fs::read_to_string(f.path("vmrt.toml")).unwrap();
    fs::write(f.path("vmrt.toml"), cfg.clone() + "vcpu = 2\n").unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let c = item(&report, "config");
    assert_eq!(c["status"], "fail");
    let expected = vmrt_config::Config::load_file(&f.path("vmrt.toml"), true).unwrap_err().to_string();
    assert!(c["detail"].as_str().unwrap().starts_with(&expected), "{c} vs {expected}");
    assert!(expected.contains("vcpu"), "{expected}");
    // Out of range: refused by validation, naming the key.
    fs::write(f.path("vmrt.toml"), cfg + "memory_mib = 16\n").unwrap();
    let (_, report) = f.check(&[]);
    let c = item(&report, "config");
    assert_eq!(c["status"], "fail");
    assert!(c["detail"].as_str().unwrap().contains("hypervisor.memory_mib"), "{c}");
}

#[test]
fn unreadable_config_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fs::remove_file(f.path("vmrt.toml")).unwrap();
    fs::create_dir(f.path("vmrt.toml")).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let c = item(&report, "config");
    assert_eq!(c["status"], "fail");
    assert!(c["detail"].as_str().unwrap().contains("cannot read vmrt config"), "{c}");
}

/// Without --config the check reads what the shim reads: VMRT_CONFIG.
#[test]
fn config_comes_from_vmrt_config_like_the_shim() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let (_, report) = f.check_with(&[], false, &[("VMRT_CONFIG", f.path("vmrt.toml").display().to_string())]);
    let c = item(&report, "config");
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("VMRT_CONFIG"), "{c}");
    assert_eq!(item(&report, "kernel")["status"], "ok");
    // A named file that does not exist is an error (the shim fails Create too).
    let (_, report) = f.check_with(&[], false, &[("VMRT_CONFIG", f.path("none.toml").display().to_string())]);
    assert_eq!(item(&report, "config")["status"], "fail");
}

#[test]
fn missing_initrd_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fs::remove_file(f.path("initramfs.cpio")).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let i = item(&report, "initrd");
    assert_eq!(i["status"], "fail");
    assert!(i["detail"].as_str().unwrap().contains("initramfs.cpio"), "{i}");
}

#[test]
fn kernel_without_its_config_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fs::remove_file(f.path("vmlinux.config")).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let o = item(&report, "kernel.options");
    assert_eq!(o["status"], "fail");
    assert!(o["detail"].as_str().unwrap().contains("no kernel .config"), "{o}");
}

#[test]
fn shim_and_vmm_are_found_and_their_versions_shown() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let shim = fake_binary(&f, "containerd-shim-vmrt-v2", "shim 9.9");
    // PATH: the fixture's bin/ and the system directories only.
    let path = [("PATH", format!("{}:/usr/bin:/bin", f.path("bin").display()))];
    let (_, report) = f.check_with(&[], true, &path);
    let s = item(&report, "shim");
    assert_eq!(s["status"], "ok", "{s}");
    assert!(s["detail"].as_str().unwrap().contains(&format!("{} (shim 9.9)", shim.display())), "{s}");
    // No vmrt-vmm next to the shim, none on PATH, no hypervisor.path.
    let v = item(&report, "vmm");
    assert_eq!(v["status"], "fail", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("`vmrt-vmm` not found"), "{v}");
    // Next to the shim: found there, as the shim would.
    let vmm = fake_binary(&f, "vmrt-vmm", "vmm 9.9");
    let (_, report) = f.check_with(&[], true, &path);
    let v = item(&report, "vmm");
    assert_eq!(v["status"], "ok", "{v}");
    assert!(v["detail"].as_str().unwrap().contains(&format!("{} (vmm 9.9)", vmm.display())), "{v}");
}

#[test]
fn vmm_named_by_the_config_must_exist() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fake_binary(&f, "vmrt-vmm", "vmm 9.9");
    let cfg = fs::read_to_string(f.path("vmrt.toml")).unwrap();
    let cfg = cfg.replace("[hypervisor]\n", &format!("[hypervisor]\npath = \"{}\"\n", f.path("nowhere/vmrt-vmm").display()));
    fs::write(f.path("vmrt.toml"), cfg).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let v = item(&report, "vmm");
    assert_eq!(v["status"], "fail", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("hypervisor.path"), "{v}");
}

#[test]
fn shim_missing_from_a_running_containerds_path_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    // The shim is on our PATH, but a running containerd has another PATH.
    fake_binary(&f, "containerd-shim-vmrt-v2", "shim 9.9");
    let pid = f.path("proc/4242");
    fs::create_dir_all(&pid).unwrap();
    fs::write(pid.join("comm"), "containerd\n").unwrap();
    fs::write(pid.join("environ"), format!("HOME=/root\0PATH={}\0", f.path("empty").display())).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let s = item(&report, "shim");
    assert_eq!(s["status"], "fail", "{s}");
    assert!(s["detail"].as_str().unwrap().contains("containerd (pid 4242)"), "{s}");
}

/// With containerd running, the shim reads containerd's VMRT_CONFIG, so the
/// check does too (and names it), not its own.
#[test]
fn config_comes_from_the_running_containerds_environment() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let pid = f.path("proc/777");
    fs::create_dir_all(&pid).unwrap();
    fs::write(pid.join("comm"), "containerd\n").unwrap();
    fs::write(pid.join("environ"), format!("PATH=/usr/bin\0VMRT_CONFIG={}\0", f.path("vmrt.toml").display())).unwrap();
    let (_, report) = f.check_with(&[], false, &[("VMRT_CONFIG", f.path("other.toml").display().to_string())]);
    let c = item(&report, "config");
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("VMRT_CONFIG of containerd (pid 777)"), "{c}");
}

#[test]
fn missing_imported_containerd_file_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    let cfg = fs::read_to_string(f.path("containerd.toml")).unwrap();
    fs::write(f.path("containerd.toml"), format!("imports = [\"{}\"]\n{cfg}", f.path("nope.toml").display())).unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let c = item(&report, "containerd.cri");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("nope.toml"), "{c}");
}

#[test]
fn unparseable_containerd_config_fails() {
    let f = Fixture::new(ALL_OPTIONS, true);
    fs::write(f.path("containerd.toml"), "version = 2\n[plugins\n").unwrap();
    let (ok, report) = f.check(&[]);
    assert!(!ok);
    let c = item(&report, "containerd.cri");
    assert_eq!(c["status"], "fail");
    assert!(c["detail"].as_str().unwrap().contains("containerd.toml"), "{c}");
}

/// containerd config versions 1 (`plugins.cri`) and 3 (containerd 2.x), and a
/// handler registered in an imported drop-in file, all count.
#[test]
fn containerd_config_versions_and_imports_are_understood() {
    let f = Fixture::new(ALL_OPTIONS, false);
    for text in [
        "version = 1\n[plugins.cri.containerd.runtimes.vmrt]\nruntime_type = \"io.containerd.vmrt.v2\"\n",
        "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kata-like]\nruntime_type = \"io.containerd.vmrt.v2\"\n",
    ] {
        fs::write(f.path("containerd.toml"), text).unwrap();
        let (_, report) = f.check(&[]);
        assert_eq!(item(&report, "containerd.cri")["status"], "ok", "{text}: {}", item(&report, "containerd.cri"));
    }
    fs::create_dir(f.path("conf.d")).unwrap();
    fs::write(
        f.path("conf.d/50-vmrt.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmrt]\nruntime_type = \"io.containerd.vmrt.v2\"\n",
    )
    .unwrap();
    fs::write(f.path("containerd.toml"), "version = 2\nimports = [\"conf.d/*.toml\"]\n").unwrap();
    let (_, report) = f.check(&[]);
    let c = item(&report, "containerd.cri");
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("50-vmrt.toml"), "{c}");
}
