//! Container rootfs mounts on the host (containerd shim v2 API `CreateTaskRequest.rootfs`)
//! and their safe removal.
//!
//! containerd hands the shim the snapshot as a list of mounts (usually one `overlay`
//! mount, or a `bind` mount for the native snapshotter). The shim mounts them at
//! `<sandbox>/shared/<container_id>/rootfs`, inside the virtio-fs share root, so the
//! guest sees the rootfs at `/run/vmrt/shared/<container_id>/rootfs`. When containerd
//! passes no mounts, the bundle's `rootfs` directory (OCI `root.path`) is bind-mounted.
//!
//! Removal never follows into a mount: [`remove_dir_safely`] refuses to delete a
//! directory that still has something mounted below it (deleting it would delete the
//! container's snapshot contents).
//!
//! Everything below `shared/` is writable by the guest through virtio-fs while the
//! VM runs, and the guest is hostile: it may plant symlinks where the shim is about
//! to mount or unmount. So mount points are created and opened one path component
//! at a time from a trusted directory (the sandbox directory, which the guest never
//! sees) with `O_NOFOLLOW`, checked with `fstat`, and mounted and unmounted through
//! `/proc/self/fd/<n>` of the opened descriptor, never through a path a symlink
//! could redirect.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::fcntl::OFlag;
use nix::mount::MntFlags;
use nix::sys::stat::Mode;

/// Mount types accepted in `CreateTaskRequest.rootfs`.
pub const SUPPORTED_TYPES: &[&str] = &["overlay", "bind", "rbind", "none"];

/// Errors of mounting or unmounting a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount in the request is malformed or of an unsupported type.
    #[error("invalid rootfs mount #{index} (type {kind:?}, source {source_path:?}): {message}")]
    Invalid {
        /// Position in the list.
        index: usize,
        /// Mount type as given.
        kind: String,
        /// Source as given.
        source_path: String,
        /// What is wrong.
        message: String,
    },
    /// The mount system call failed.
    #[error("mount {kind} {source_path} on {target}: {message}")]
    Mount {
        /// Mount type.
        kind: String,
        /// Mount source.
        source_path: String,
        /// Mount target.
        target: PathBuf,
        /// Error text.
        message: String,
    },
    /// Unmounting failed.
    #[error("unmount {target}: {source}")]
    Unmount {
        /// Mount point.
        target: PathBuf,
        /// errno.
        source: nix::Error,
    },
    /// A directory could not be removed because something is still mounted below it.
    #[error("refusing to remove {dir}: still mounted below it: {mounts:?}")]
    StillMounted {
        /// Directory that was to be removed.
        dir: PathBuf,
        /// Mount points still present.
        mounts: Vec<PathBuf>,
    },
    /// A path below the trusted directory is not a plain directory or file
    /// (a symlink, or another file type): somebody (the guest) put it there.
    #[error("refusing {path}: {message}")]
    Unsafe {
        /// The path as the shim meant it.
        path: PathBuf,
        /// What was found.
        message: String,
    },
    /// File system error (mkdir, read mountinfo, remove).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MountError {
    let context = context.into();
    move |source| MountError::Io { context, source }
}

/// Checks the mount list containerd sent: supported type, non-empty absolute source
/// (except for overlay, whose source is a label), no NUL in any field.
pub fn validate_mounts(mounts: &[Mount]) -> Result<(), MountError> {
    for (index, m) in mounts.iter().enumerate() {
        let invalid = |message: String| MountError::Invalid {
            index,
            kind: m.type_.clone(),
            source_path: m.source.clone(),
            message,
        };
        if !SUPPORTED_TYPES.contains(&m.type_.as_str()) {
            return Err(invalid(format!(
                "unsupported mount type, expected one of {SUPPORTED_TYPES:?}"
            )));
        }
        if m.type_ != "overlay" && !Path::new(&m.source).is_absolute() {
            return Err(invalid("source is not an absolute path".into()));
        }
        if m.type_ == "overlay" && !m.options.iter().any(|o| o.starts_with("lowerdir=")) {
            return Err(invalid("overlay mount without lowerdir option".into()));
        }
        if m.source.contains('\0') || m.options.iter().any(|o| o.contains('\0')) {
            return Err(invalid("NUL byte in source or options".into()));
        }
    }
    Ok(())
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(2)-family call and
    // is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The `/proc/self/fd/<n>` path of `fd`: mounting or unmounting there acts on
/// exactly the file the descriptor holds, whatever happens to its path.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens the directory `rel` below the trusted directory `base`, one
/// component at a time, never following a symlink (`O_NOFOLLOW` +
/// `O_DIRECTORY`), creating missing directories (mode 0755) when `create`.
/// `rel` must be relative without `..`. Returns an `O_PATH` descriptor.
///
/// Errors: [`MountError::Unsafe`] for a symlink or non-directory on the way,
/// [`MountError::Io`] otherwise (`NotFound` when a component is missing and
/// `create` is false).
fn open_dir_beneath(base: &Path, rel: &Path, create: bool) -> Result<OwnedFd, MountError> {
    let path = base.join(rel);
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut cur = owned(
        nix::fcntl::open(base, flags, Mode::empty())
            .map_err(|e| io_err(format!("open {}", base.display()))(e.into()))?,
    );
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(MountError::Unsafe { path, message: format!("path component {c:?}") });
        };
        if create {
            match nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::Error::EEXIST) => {}
                Err(e) => return Err(io_err(format!("mkdir {}", path.display()))(e.into())),
            }
        }
        let next = nix::fcntl::openat(Some(cur.as_raw_fd()), name, flags | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(|e| match e {
                nix::Error::ENOTDIR | nix::Error::ELOOP => MountError::Unsafe {
                    path: path.clone(),
                    message: format!("{name:?} is not a directory (a symlink?)"),
                },
                e => io_err(format!("open {}", path.display()))(e.into()),
            })?;
        cur = owned(next);
    }
    Ok(cur)
}

/// Mounts the rootfs at `base/rel` (created if needed, see
/// [`open_dir_beneath`]; `base` is trusted, the rest may be guest-writable):
/// each mount of `mounts` in order, or a read-write bind mount of
/// `bundle_rootfs` if `mounts` is empty. On failure the mounts already made
/// are undone.
pub async fn mount_rootfs(
    mounts: &[Mount],
    bundle_rootfs: &Path,
    base: &Path,
    rel: &Path,
) -> Result<(), MountError> {
    validate_mounts(mounts)?;
    let target = base.join(rel);
    let dir = {
        let (base, rel) = (base.to_path_buf(), rel.to_path_buf());
        tokio::task::spawn_blocking(move || open_dir_beneath(&base, &rel, true))
            .await
            .map_err(|e| io_err("create rootfs mount point")(std::io::Error::other(e.to_string())))??
    };
    let fallback;
    let list: &[Mount] = if mounts.is_empty() {
        fallback = [Mount {
            type_: "bind".into(),
            source: bundle_rootfs.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }];
        &fallback
    } else {
        mounts
    };
    for m in list {
        // Mounted through the descriptor: the path cannot be redirected. A
        // read-only bind is made read-only here, on the new mount itself (a
        // remount through the descriptor would address the directory under it).
        let ro_bind = m.type_ != "overlay" && m.options.iter().any(|o| o == "ro");
        let mut m2 = m.clone();
        if ro_bind {
            m2.options.retain(|o| o != "ro");
        }
        let r = match containerd_shim::asynchronous::util::mount_rootfs(&m2, fd_path(&dir)).await {
            Ok(()) if ro_bind => make_read_only(base, rel, m.options.iter().any(|o| o == "rbind")),
            Ok(()) => Ok(()),
            Err(e) => Err(MountError::Mount {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: target.clone(),
                message: e.to_string(),
            }),
        };
        if let Err(e) = r {
            let _ = unmount_all_beneath(base, rel);
            return Err(e);
        }
    }
    Ok(())
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount at `base/rel` read-only, with every mount below it when
/// `recursive` (an `rbind`): mount_setattr(2) with `AT_RECURSIVE` where the
/// kernel has it (5.12+), else a bind remount of the top mount only. The
/// mount is reached through a fresh [`open_dir_beneath`]-style walk, whose
/// last step enters the new mount.
fn make_read_only(base: &Path, rel: &Path, recursive: bool) -> Result<(), MountError> {
    let top = open_beneath_any(base, rel)?;
    let attr = MountAttr { attr_set: 0x1 /* MOUNT_ATTR_RDONLY */, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags = libc::AT_EMPTY_PATH | if recursive { 0x8000 /* AT_RECURSIVE */ } else { 0 };
    // SAFETY: mount_setattr(fd, "", flags, &attr, size) reads `attr`, a live
    // struct of the given size; the path is a valid empty C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            top.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(io_err(format!("make {} read-only", base.join(rel).display()))(err));
    }
    log::warn!("mount_setattr(2) unavailable: only the top mount of {} is read-only", base.join(rel).display());
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        &fd_path(&top),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| io_err(format!("remount {} read-only", base.join(rel).display()))(e.into()))
}

/// Opens `base/rel` (a directory or a regular file, possibly a mount point,
/// whose mount it then enters) without following a symlink on the way.
fn open_beneath_any(base: &Path, rel: &Path) -> Result<OwnedFd, MountError> {
    let Some(name) = rel.file_name() else {
        return open_dir_beneath(base, rel, false);
    };
    let parent = open_dir_beneath(base, rel.parent().unwrap_or(Path::new("")), false)?;
    let fd = nix::fcntl::openat(
        Some(parent.as_raw_fd()),
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(format!("open {}", base.join(rel).display()))(e.into()))?;
    let fd = owned(fd);
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| io_err(format!("stat {}", base.join(rel).display()))(e.into()))?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFDIR && kind != libc::S_IFREG {
        return Err(MountError::Unsafe {
            path: base.join(rel),
            message: format!("not a directory or regular file (mode {:o})", st.st_mode),
        });
    }
    Ok(fd)
}

/// Whether an OCI mount (`config.json` `mounts[]`) is a bind mount: type
/// `bind`, or options naming `bind`/`rbind` (runc's convention).
fn is_bind(m: &serde_json::Value) -> bool {
    m.get("type").and_then(|t| t.as_str()) == Some("bind")
        || m.get("options")
            .and_then(|o| o.as_array())
            .is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind" | "rbind"))))
}

/// Makes the host sources of the OCI spec's bind mounts visible to the guest
/// (OCI runtime spec 1.1 `mounts`, as Kata does for volumes): the source of
/// bind mount #i is bind-mounted (recursively for `rbind`; read-only, with
/// every submount, when the options say `ro` or `rro`) at `base/rel/<i>`,
/// and the spec's `source` is rewritten to `guest_dir/<i>`, where the guest
/// sees it. Other mounts (proc, tmpfs, ...) are the guest's own and stay as
/// they are. Returns the rewritten `config.json`. `base` is trusted; `rel`
/// may be guest-writable, so mount points are made with `O_NOFOLLOW` and
/// `O_EXCL` and mounted through their descriptors (module documentation).
/// The mounts live below the container's share directory, so removing the
/// container unmounts them.
///
/// Errors: [`MountError::Invalid`] naming `mounts[i]` for a malformed spec
/// or a source that is not an absolute path to an existing file or
/// directory; [`MountError::Unsafe`] when something already sits where a
/// mount point must be made; [`MountError::Mount`] / [`MountError::Io`]; on
/// any error the mounts already made are undone.
pub fn share_bind_mounts(spec: &[u8], base: &Path, rel: &Path, guest_dir: &str) -> Result<Vec<u8>, MountError> {
    use nix::mount::{mount, MsFlags};
    let invalid = |index: usize, source: &str, message: String| MountError::Invalid {
        index,
        kind: "bind".into(),
        source_path: source.into(),
        message: format!("OCI spec mounts[{index}]: {message}"),
    };
    let mut doc: serde_json::Value = serde_json::from_slice(spec)
        .map_err(|e| invalid(0, "", format!("config.json is not JSON: {e}")))?;
    let Some(mounts) = doc.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(spec.to_vec());
    };
    if !mounts.iter().any(is_bind) {
        return Ok(spec.to_vec());
    }
    let result = (|| {
        let dir = open_dir_beneath(base, rel, true)?;
        for (index, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let source = m.get("source").and_then(|s| s.as_str()).unwrap_or_default().to_string();
            let src = Path::new(&source);
            if !src.is_absolute() || source.contains('\0') {
                return Err(invalid(index, &source, "bind source is not an absolute path".into()));
            }
            let meta = std::fs::metadata(src)
                .map_err(|e| invalid(index, &source, format!("bind source: {e}")))?;
            let options: Vec<String> = m
                .get("options")
                .and_then(|o| o.as_array())
                .map(|o| o.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let name = index.to_string();
            let target = base.join(rel).join(&name);
            let exists = |e: nix::Error| match e {
                nix::Error::EEXIST => MountError::Unsafe { path: target.clone(), message: "already exists".into() },
                e => io_err(format!("create bind mount point {}", target.display()))(e.into()),
            };
            // A fresh mount point, opened so that nothing can be swapped in.
            let point = if meta.is_dir() {
                nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name.as_str(), Mode::from_bits_truncate(0o755))
                    .map_err(exists)?;
                let fd = nix::fcntl::openat(
                    Some(dir.as_raw_fd()),
                    name.as_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|_| MountError::Unsafe { path: target.clone(), message: "replaced after mkdir".into() })?;
                owned(fd)
            } else {
                owned(
                    nix::fcntl::openat(
                        Some(dir.as_raw_fd()),
                        name.as_str(),
                        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map_err(exists)?,
                )
            };
            let mut flags = MsFlags::MS_BIND;
            let recursive = options.iter().any(|o| o == "rbind");
            if recursive {
                flags |= MsFlags::MS_REC;
            }
            mount(Some(src), &fd_path(&point), None::<&str>, flags, None::<&str>).map_err(|e| MountError::Mount {
                kind: "bind".into(),
                source_path: source.clone(),
                target: target.clone(),
                message: e.to_string(),
            })?;
            if options.iter().any(|o| o == "ro" || o == "rro") {
                make_read_only(base, &rel.join(&name), recursive || options.iter().any(|o| o == "rro"))?;
            }
            m["source"] = serde_json::Value::String(format!("{guest_dir}/{index}"));
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Unmount only; the caller removes the container's directory (never
        // remove_dir_all through a path the guest could have redirected).
        let _ = unmount_all_beneath(base, rel);
        return Err(e);
    }
    serde_json::to_vec(&doc).map_err(|e| invalid(0, "", format!("re-encode config.json: {e}")))
}

/// Decodes the octal escapes (`\040` = space, `\011`, `\012`, `\134`) that
/// /proc/self/mountinfo uses in paths. Malformed escapes are kept verbatim.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (field 5 of each /proc/self/mountinfo line) at or below `dir`,
/// deepest first. Lines with fewer than 5 fields are skipped.
pub fn parse_mountinfo_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Mount points at or below `dir` in this process's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read /proc/self/mountinfo"))?;
    Ok(parse_mountinfo_under(&text, dir))
}

/// Lazily unmounts (MNT_DETACH) everything mounted at or below `dir`, deepest first,
/// repeating for stacked mounts; `dir` itself is trusted (see [`unmount_all_beneath`]).
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    unmount_all_beneath(dir, Path::new(""))
}

/// Lazily unmounts everything mounted at or below `base/rel`, deepest first,
/// repeating for stacked mounts. `base` is trusted; below it every mount
/// point (from /proc/self/mountinfo) is reached with [`open_beneath_any`] and
/// unmounted through its descriptor, so a symlink the guest planted cannot
/// make the shim unmount anything else. Errors other than EINVAL/ENOENT (not
/// mounted) are returned, as is [`MountError::Unsafe`].
pub fn unmount_all_beneath(base: &Path, rel: &Path) -> Result<(), MountError> {
    let dir = base.join(rel);
    for _ in 0..16 {
        let mounts = mounts_under(&dir)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let Ok(below) = m.strip_prefix(base) else { continue };
            let fd = match open_beneath_any(base, below) {
                Ok(fd) => fd,
                Err(MountError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match nix::mount::umount2(&fd_path(&fd), MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(source) => return Err(MountError::Unmount { target: m, source }),
            }
        }
    }
    Ok(())
}

/// Removes `dir` recursively after checking that nothing is mounted at or below it.
/// A missing `dir` is fine. Only the last component of `dir` may be writable by the
/// guest (a symlink there is removed, not followed); its parents must be trusted.
pub fn remove_dir_safely(dir: &Path) -> Result<(), MountError> {
    let mounts = mounts_under(dir)?;
    if !mounts.is_empty() {
        return Err(MountError::StillMounted {
            dir: dir.to_path_buf(),
            mounts,
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's bind mounts are shared into the guest: each source is
    /// mounted under the share (read-only when asked) and the spec points at
    /// the guest path; other mounts are untouched; a bad source fails naming
    /// the mount and leaves nothing mounted.
    #[test]
    fn spec_bind_mounts_are_shared_and_rewritten() {
        if !is_root() {
            eprintln!("skipped: needs root (mount)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("in"), "host data").unwrap();
        let file = d.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 x\n").unwrap();
        let base = d.path().join("sb");
        std::fs::create_dir(&base).unwrap();
        let rel = Path::new("shared/c/mounts");
        let share = base.join(rel);
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]},
                {"destination": "/ro", "source": vol, "options": ["bind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            ]
        });
        let out = share_bind_mounts(&serde_json::to_vec(&spec).unwrap(), &base, rel, "/run/vmrt/shared/c/mounts").unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let m = out["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], "/run/vmrt/shared/c/mounts/1");
        assert_eq!(m[2]["source"], "/run/vmrt/shared/c/mounts/2");
        assert_eq!(m[3]["source"], "/run/vmrt/shared/c/mounts/3");
        assert_eq!(m[1]["options"], serde_json::json!(["rbind", "rw"]), "options kept for the guest");
        assert_eq!(std::fs::read_to_string(share.join("1/in")).unwrap(), "host data");
        std::fs::write(share.join("1/out"), "guest data").unwrap();
        assert_eq!(std::fs::read_to_string(vol.join("out")).unwrap(), "guest data", "rw bind reaches the host");
        let e = std::fs::write(share.join("2/x"), "no").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "ro bind is read-only");
        assert_eq!(std::fs::read_to_string(share.join("3")).unwrap(), "127.0.0.1 x\n");
        assert_eq!(mounts_under(&share).unwrap().len(), 3);
        unmount_all_under(&share).unwrap();
        remove_dir_safely(&share).unwrap();
        assert!(vol.join("in").exists() && vol.join("out").exists(), "host files survive the cleanup");

        // A missing source: an error naming mounts[1], and nothing left mounted.
        let bad = serde_json::json!({"mounts": [
            {"destination": "/a", "type": "bind", "source": vol, "options": ["rbind"]},
            {"destination": "/b", "type": "bind", "source": "/nonexistent/vmrt-src", "options": ["rbind"]},
        ]});
        let e = share_bind_mounts(&serde_json::to_vec(&bad).unwrap(), &base, rel, "/g").unwrap_err();
        assert!(e.to_string().contains("mounts[1]") && e.to_string().contains("/nonexistent/vmrt-src"), "{e}");
        assert!(mounts_under(&base).unwrap().is_empty());
        remove_dir_safely(&share).unwrap();
        assert!(vol.join("in").exists(), "host files survive a failed share");
        // Relative source.
        let rel_src = serde_json::json!({"mounts": [{"destination": "/a", "type": "bind", "source": "rel/dir"}]});
        let e = share_bind_mounts(&serde_json::to_vec(&rel_src).unwrap(), &base, rel, "/g").unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
    }

    /// What the guest can plant under the share (it writes there while the VM
    /// runs) never makes the shim mount, create or unmount outside it: a
    /// symlinked container directory, a symlink or a file where a mount point
    /// is to be made, and a symlink swapped in above a mount before teardown.
    #[test]
    fn guest_planted_symlinks_cannot_redirect_mounts() {
        if !is_root() {
            eprintln!("skipped: needs root (mount)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("sb");
        let outside = d.path().join("outside");
        let vol = d.path().join("vol");
        for p in [&base.join("shared"), &outside, &vol] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(outside.join("precious"), "keep").unwrap();
        std::fs::write(vol.join("v"), "volume").unwrap();
        let file = d.path().join("hosts");
        std::fs::write(&file, "h").unwrap();
        let spec = |src: &Path| {
            serde_json::to_vec(&serde_json::json!({"mounts": [
                {"destination": "/a", "type": "bind", "source": src, "options": ["rbind"]}]}))
            .unwrap()
        };
        // 1. shared/c1 -> outside: refused, nothing created or mounted outside.
        std::os::unix::fs::symlink(&outside, base.join("shared/c1")).unwrap();
        let e = share_bind_mounts(&spec(&vol), &base, Path::new("shared/c1/mounts"), "/g").unwrap_err();
        assert!(matches!(e, MountError::Unsafe { .. }), "{e}");
        assert!(!outside.join("mounts").exists());
        let e = block_on(mount_rootfs(&[], &vol, &base, Path::new("shared/c1/rootfs"))).unwrap_err();
        assert!(matches!(e, MountError::Unsafe { .. }), "{e}");
        assert!(!outside.join("rootfs").exists());
        // 2. mounts/0 already a symlink (to a file outside): no truncation, no mount.
        std::fs::create_dir_all(base.join("shared/c2/mounts")).unwrap();
        std::os::unix::fs::symlink(outside.join("precious"), base.join("shared/c2/mounts/0")).unwrap();
        let e = share_bind_mounts(&spec(&file), &base, Path::new("shared/c2/mounts"), "/g").unwrap_err();
        assert!(matches!(e, MountError::Unsafe { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep");
        // 3. A real mount, then the guest swaps its parent for a symlink to a
        //    directory that holds a mount of its own: teardown unmounts neither
        //    through the symlink, and the moved mount is still found below the base.
        share_bind_mounts(&spec(&vol), &base, Path::new("shared/c3/mounts"), "/g").unwrap();
        let victim = outside.join("mnt");
        std::fs::create_dir_all(victim.join("0")).unwrap();
        nix::mount::mount(Some(&vol), &victim.join("0"), None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).unwrap();
        std::fs::rename(base.join("shared/c3/mounts"), base.join("shared/c3/moved")).unwrap();
        std::os::unix::fs::symlink(&victim, base.join("shared/c3/mounts")).unwrap();
        unmount_all_beneath(&base, Path::new("shared/c3")).unwrap();
        assert!(mounts_under(&base).unwrap().is_empty(), "the moved mount was unmounted where it is");
        assert_eq!(mounts_under(&victim).unwrap(), vec![victim.join("0")], "the mount outside was left alone");
        nix::mount::umount2(&victim.join("0"), MntFlags::MNT_DETACH).unwrap();
        assert_eq!(std::fs::read_to_string(vol.join("v")).unwrap(), "volume");
    }

    /// Runs a future to completion on a fresh current-thread runtime.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    fn m(t: &str, s: &str, o: &[&str]) -> Mount {
        Mount {
            type_: t.into(),
            source: s.into(),
            options: o.iter().map(|x| x.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn mount_list_validation() {
        validate_mounts(&[]).unwrap();
        validate_mounts(&[m(
            "overlay",
            "overlay",
            &["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"],
        )])
        .unwrap();
        validate_mounts(&[m("bind", "/snap/1/fs", &["rbind", "ro"])]).unwrap();
        let e =
            validate_mounts(&[m("bind", "/a", &["rbind"]), m("nfs", "srv:/x", &[])]).unwrap_err();
        assert!(matches!(e, MountError::Invalid { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("nfs"), "{e}");
        assert!(validate_mounts(&[m("bind", "relative", &[])]).is_err());
        assert!(validate_mounts(&[m("overlay", "overlay", &["upperdir=/u"])]).is_err());
        assert!(validate_mounts(&[m("bind", "/a\0b", &[])]).is_err());
    }

    #[test]
    fn mountinfo_parsing_filters_sorts_and_unescapes() {
        let text = "22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n\
                    40 22 0:40 / /run/vmrt/sb/a/shared/c1/rootfs rw - overlay overlay rw,lowerdir=/x\n\
                    41 40 0:41 / /run/vmrt/sb/a/shared/c1/rootfs/proc rw - proc proc rw\n\
                    42 22 0:42 / /run/vmrt/sb/a\\040b/x rw - tmpfs tmpfs rw\n\
                    43 22 0:43 / /run/vmrt/sb/ab rw - tmpfs tmpfs rw\n\
                    short line\n";
        let under = parse_mountinfo_under(text, Path::new("/run/vmrt/sb/a"));
        assert_eq!(
            under,
            vec![
                PathBuf::from("/run/vmrt/sb/a/shared/c1/rootfs/proc"),
                PathBuf::from("/run/vmrt/sb/a/shared/c1/rootfs"),
            ]
        );
        let spaced = parse_mountinfo_under(text, Path::new("/run/vmrt/sb/a b"));
        assert_eq!(spaced, vec![PathBuf::from("/run/vmrt/sb/a b/x")]);
        assert_eq!(unescape_mountinfo("a\\134b\\9"), "a\\b\\9");
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Real bind and overlay mounts in a temp dir (needs root, skipped otherwise).
    #[tokio::test]
    async fn bind_and_overlay_mounts_are_made_and_removed() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("bundle-rootfs");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hello"), b"world").unwrap();

        // No mounts: the bundle rootfs is bind-mounted.
        let target = d.path().join("sb/shared/c1/rootfs");
        std::fs::create_dir(d.path().join("sb")).unwrap();
        mount_rootfs(&[], &src, &d.path().join("sb"), Path::new("shared/c1/rootfs")).await.unwrap();
        assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"world");
        assert_eq!(
            mounts_under(&d.path().join("sb")).unwrap(),
            vec![target.clone()]
        );
        // Removal refuses while mounted and must not touch the source.
        let e = remove_dir_safely(&d.path().join("sb")).unwrap_err();
        assert!(matches!(e, MountError::StillMounted { .. }), "{e}");
        assert!(src.join("hello").exists());
        unmount_all_under(&d.path().join("sb")).unwrap();
        remove_dir_safely(&d.path().join("sb")).unwrap();
        assert!(src.join("hello").exists());
        assert!(!d.path().join("sb").exists());

        // Overlay as containerd's overlayfs snapshotter sends it.
        let (lower, upper, work) = (d.path().join("l"), d.path().join("u"), d.path().join("w"));
        for p in [&lower, &upper, &work] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(lower.join("base"), b"1").unwrap();
        let ov = m(
            "overlay",
            "overlay",
            &[
                &format!("lowerdir={}", lower.display()),
                &format!("upperdir={}", upper.display()),
                &format!("workdir={}", work.display()),
            ],
        );
        let target = d.path().join("sb2/shared/c2/rootfs");
        std::fs::create_dir(d.path().join("sb2")).unwrap();
        mount_rootfs(&[ov], &src, &d.path().join("sb2"), Path::new("shared/c2/rootfs")).await.unwrap();
        std::fs::write(target.join("new"), b"2").unwrap();
        assert!(upper.join("new").exists());
        assert!(target.join("base").exists());
        unmount_all_under(&d.path().join("sb2")).unwrap();
        assert!(mounts_under(&d.path().join("sb2")).unwrap().is_empty());
        remove_dir_safely(&d.path().join("sb2")).unwrap();
        assert!(upper.join("new").exists());
    }

    #[tokio::test]
    async fn failed_mount_is_reported_and_leaves_nothing_mounted() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let bad = m("bind", "/nonexistent/vmrt-test-source", &["rbind"]);
        let e = mount_rootfs(&[bad], d.path(), d.path(), Path::new("sb/shared/c/rootfs")).await.unwrap_err();
        assert!(matches!(e, MountError::Mount { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/vmrt-test-source"),
            "{e}"
        );
        assert!(mounts_under(d.path()).unwrap().is_empty());
    }
}
