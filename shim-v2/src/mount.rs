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

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::MntFlags;

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

/// Mounts the rootfs at `target` (created if needed): each mount of `mounts` in order,
/// or a read-write bind mount of `bundle_rootfs` if `mounts` is empty. On failure the
/// mounts already made are undone.
pub async fn mount_rootfs(
    mounts: &[Mount],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), MountError> {
    validate_mounts(mounts)?;
    tokio::fs::create_dir_all(target)
        .await
        .map_err(io_err(format!(
            "create rootfs mount point {}",
            target.display()
        )))?;
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
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, target).await {
            let _ = unmount_all_under(target);
            return Err(MountError::Mount {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: target.to_path_buf(),
                message: e.to_string(),
            });
        }
    }
    Ok(())
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
/// bind mount #i is bind-mounted (recursively for `rbind`, read-only when the
/// options say `ro`) at `host_dir/<i>` inside the share, and the spec's
/// `source` is rewritten to `guest_dir/<i>`, where the guest sees it. Other
/// mounts (proc, tmpfs, ...) are the guest's own and stay as they are.
/// Returns the rewritten `config.json`. The mounts live below the
/// container's share directory, so removing the container unmounts them.
///
/// Errors: [`MountError::Invalid`] naming `mounts[i]` for a malformed spec
/// or a source that is not an absolute path to an existing file or
/// directory; [`MountError::Mount`] / [`MountError::Io`]; on any error the
/// mounts already made are undone.
pub fn share_bind_mounts(spec: &[u8], host_dir: &Path, guest_dir: &str) -> Result<Vec<u8>, MountError> {
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
    let result = (|| {
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
            let target = host_dir.join(index.to_string());
            std::fs::create_dir_all(host_dir).map_err(io_err(format!("create {}", host_dir.display())))?;
            if meta.is_dir() {
                std::fs::create_dir(&target)
            } else {
                std::fs::File::create(&target).map(drop)
            }
            .map_err(io_err(format!("create bind mount point {}", target.display())))?;
            let mut flags = MsFlags::MS_BIND;
            if options.iter().any(|o| o == "rbind") {
                flags |= MsFlags::MS_REC;
            }
            let mount_err = |e: nix::Error| MountError::Mount {
                kind: "bind".into(),
                source_path: source.clone(),
                target: target.clone(),
                message: e.to_string(),
            };
            mount(Some(src), &target, None::<&str>, flags, None::<&str>).map_err(mount_err)?;
            if options.iter().any(|o| o == "ro") {
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(mount_err)?;
            }
            m["source"] = serde_json::Value::String(format!("{guest_dir}/{index}"));
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Never remove_dir_all through a bind mount that failed to go away:
        // that would delete the host's files.
        let _ = unmount_all_under(host_dir).and_then(|()| remove_dir_safely(host_dir));
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
/// repeating for stacked mounts. Errors other than EINVAL/ENOENT (not mounted) are returned.
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    for _ in 0..16 {
        let mounts = mounts_under(dir)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            match nix::mount::umount2(&m, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(source) => return Err(MountError::Unmount { target: m, source }),
            }
        }
    }
    Ok(())
}

/// Removes `dir` recursively after checking that nothing is mounted at or below it.
/// A missing `dir` is fine.
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
        let share = d.path().join("share/mounts");
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]},
                {"destination": "/ro", "source": vol, "options": ["bind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            ]
        });
        let out = share_bind_mounts(&serde_json::to_vec(&spec).unwrap(), &share, "/run/vmrt/shared/c/mounts").unwrap();
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
        let e = share_bind_mounts(&serde_json::to_vec(&bad).unwrap(), &share, "/g").unwrap_err();
        assert!(e.to_string().contains("mounts[1]") && e.to_string().contains("/nonexistent/vmrt-src"), "{e}");
        assert!(mounts_under(&share).unwrap().is_empty());
        assert!(!share.exists());
        assert!(vol.join("in").exists(), "host files survive a failed share");
        // Relative source.
        let rel = serde_json::json!({"mounts": [{"destination": "/a", "type": "bind", "source": "rel/dir"}]});
        let e = share_bind_mounts(&serde_json::to_vec(&rel).unwrap(), &share, "/g").unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
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
        mount_rootfs(&[], &src, &target).await.unwrap();
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
        mount_rootfs(&[ov], &src, &target).await.unwrap();
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
        let target = d.path().join("sb/shared/c/rootfs");
        let bad = m("bind", "/nonexistent/vmrt-test-source", &["rbind"]);
        let e = mount_rootfs(&[bad], d.path(), &target).await.unwrap_err();
        assert!(matches!(e, MountError::Mount { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/vmrt-test-source"),
            "{e}"
        );
        assert!(mounts_under(d.path()).unwrap().is_empty());
    }
}
