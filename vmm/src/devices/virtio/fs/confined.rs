//! [`ConfinedFs`]: the `FileSystem` the FUSE server runs, a thin layer over
//! `fuse_backend_rs::passthrough::PassthroughFs` that adds the confinement
//! rules the passthrough backend does not enforce by itself (virtio 1.2 §5.11,
//! the guest is untrusted).
//!
//! Added rules:
//! - MKNOD of `S_IFCHR` / `S_IFBLK` → EPERM (the VMM runs as root: a guest
//!   could otherwise create e.g. a node for the host's disk in the share);
//! - LOOKUP of `..` from any inode that is the share root (same device and
//!   inode number) resolves to the root itself, whatever inode number the
//!   guest used;
//! - LOOKUP of a name that does not exist answers, when the share caches
//!   entries (policy timeout > 0), a negative entry (nodeid 0) valid for the
//!   policy's entry timeout instead of ENOENT, so that the guest caches the
//!   miss as it caches a hit (PATH searches and mount-point checks look the
//!   same missing names up repeatedly);
//! - SETUPMAPPING / REMOVEMAPPING (DAX) and IOCTL → ENOSYS, and the DAX
//!   capability is never negotiated at INIT;
//! - SETXATTR / REMOVEXATTR only in the `user.` namespace and of the POSIX
//!   ACLs (`system.posix_acl_access`, `system.posix_acl_default`); any other
//!   name → EPERM. The VMM writes as root: a guest could otherwise give a
//!   host binary file capabilities (`security.capability`), relabel it
//!   (`security.selinux`) or write `trusted.` attributes host services
//!   trust (overlayfs keeps its metadata there). Reading stays allowed, so
//!   the guest sees the capabilities an image's files carry.
//!
//! Everything else is delegated unchanged; the rules the backend already
//! guarantees are listed in the parent module's documentation.

use std::ffi::CStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

/// Inode number as the FUSE protocol carries it (`nodeid`).
pub type Inode = u64;
/// Open file or directory handle as the FUSE protocol carries it (`fh`).
pub type Handle = u64;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Confinement layer over the passthrough backend of one share.
pub struct ConfinedFs {
    inner: PassthroughFs<()>,
    /// `(st_dev, st_ino)` of the share root, to recognise it under any nodeid.
    root_id: (u64, u64),
    /// How long the guest may cache a name found missing; zero: answer ENOENT.
    negative_timeout: Duration,
}

impl ConfinedFs {
    /// Wraps `inner`, whose `root_dir` is `root`; LOOKUP misses are cached by
    /// the guest for `negative_timeout` (zero: not at all, plain ENOENT).
    /// Fails if `root` cannot be stat'ed.
    pub fn new(
        inner: PassthroughFs<()>,
        root: &Path,
        negative_timeout: Duration,
    ) -> io::Result<ConfinedFs> {
        let meta = std::fs::metadata(root)?;
        Ok(ConfinedFs {
            inner,
            root_id: (meta.dev(), meta.ino()),
            negative_timeout,
        })
    }

    /// True if `inode` refers to the share root directory.
    fn is_root(&self, ctx: &Context, inode: Inode) -> io::Result<bool> {
        if inode == ROOT_ID {
            return Ok(true);
        }
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        Ok((st.st_dev, st.st_ino) == self.root_id)
    }
}

/// A LOOKUP reply saying "no such name" that the guest may cache for
/// `timeout` (FUSE protocol >= 7.4: nodeid 0 is a negative entry).
fn negative_entry(timeout: Duration) -> Entry {
    Entry {
        inode: 0,
        generation: 0,
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        attr: unsafe { std::mem::zeroed() },
        attr_flags: 0,
        attr_timeout: Duration::ZERO,
        entry_timeout: timeout,
    }
}

/// Whether the guest may set or remove the extended attribute `name` (see
/// the module documentation): `user.*` and the two POSIX ACL names.
pub fn guest_may_write_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") && name.len() > b"user.".len()
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// The mode bits of MKNOD that name a character or block device.
pub fn is_device_mode(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK)
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        opts.remove(FsOptions::PERFILE_DAX);
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        if name.to_bytes() == b".." && self.is_root(ctx, parent)? {
            // `..` of the share root is the share root.
            return self.inner.lookup(ctx, ROOT_ID, c".");
        }
        match self.inner.lookup(ctx, parent, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !self.negative_timeout.is_zero() => {
                Ok(negative_entry(self.negative_timeout))
            }
            r => r,
        }
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if is_device_mode(mode) {
            log::warn!("virtio-fs: refusing MKNOD of a device node (mode {mode:#o})");
            return Err(errno(libc::EPERM));
        }
        self.inner.mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.inner.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if !guest_may_write_xattr(name.to_bytes()) {
            return Err(errno(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        if !guest_may_write_xattr(name.to_bytes()) {
            return Err(errno(libc::EPERM));
        }
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}
