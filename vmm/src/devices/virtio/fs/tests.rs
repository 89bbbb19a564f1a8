//! Unit tests of the virtio-fs device: raw FUSE requests in mock virtqueues
//! (`virtio_queue::mock::MockSplitQueue`) over a real temporary directory as
//! the share, checking replies and host-visible effects.

use std::ffi::CString;
use std::mem::size_of;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, Direntplus, EntryOut, FsOptions, GetattrIn, GetxattrIn, GetxattrOut,
    InHeader, InitIn, InitOut, LinkIn, MkdirIn, MknodIn, OpenIn, OpenOut, OutHeader, ReadIn,
    ReleaseIn, RenameIn, SetattrIn, SetxattrIn, WriteIn, WriteOut, FsyncIn, ROOT_ID,
};
use fuse_backend_rs::api::server::Server;
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::confined::ConfinedFs;
use super::queue::{process_queue, QueueOutcome};
use super::*;

// FUSE opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const REMOVEXATTR: u32 = 24;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const CREATE: u32 = 35;
const READDIRPLUS: u32 = 44;
const SETUPMAPPING: u32 = 48;
// SETATTR valid bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_SIZE: u32 = 1 << 3;

const RING_SIZE: u16 = 64;
const REQ_ADDR: u64 = 0x10_0000;
const REPLY_ADDR: u64 = 0x40_0000;
const REPLY_CAP: u32 = 0x11_0000;
const MEM_SIZE: usize = 0x80_0000;

/// One reply read back from the used ring and guest memory.
#[derive(Debug)]
struct Reply {
    used_len: u32,
    header: OutHeader,
    payload: Vec<u8>,
}

impl Reply {
    /// The payload of a successful reply; panics (fails the test) on an error reply.
    fn ok(&self) -> &[u8] {
        assert_eq!(
            self.header.error, 0,
            "expected success, got errno {}",
            -self.header.error
        );
        &self.payload
    }

    /// The errno of an error reply (0 on success).
    fn errno(&self) -> i32 {
        -self.header.error
    }

    fn obj<T: ByteValued + Default>(&self) -> T {
        let p = self.ok();
        assert!(
            p.len() >= size_of::<T>(),
            "reply payload too short: {}",
            p.len()
        );
        let mut t = T::default();
        t.as_mut_slice().copy_from_slice(&p[..size_of::<T>()]);
        t
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// A FUSE server over a temporary share, fed through mock virtqueues.
struct Harness {
    mem: GuestMemoryMmap,
    server: Server<ConfinedFs>,
    dir: tempfile::TempDir,
    root: PathBuf,
    unique: u64,
}

impl Harness {
    /// A share in a fresh temporary directory, FUSE_INIT already done.
    fn new() -> Harness {
        let mut h = Harness::uninit();
        h.init();
        h
    }

    fn uninit() -> Harness {
        Harness::with_policy(CachePolicy::Never)
    }

    fn with_policy(cache: CachePolicy) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("vmrt-virtiofs-test")
            .tempdir()
            .unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let root = std::fs::canonicalize(&share).unwrap();
        let server = build_server(&root, cache).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Harness {
            mem,
            server,
            dir,
            root,
            unique: 0,
        }
    }

    /// A host path outside the share (sibling of it).
    fn outside(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Puts `descs` (addr, len, device-writable) as one chain in a fresh
    /// queue, processes it and returns the outcome and the used ring entries.
    fn submit(&self, descs: &[(u64, u32, bool)]) -> (QueueOutcome, Vec<(u32, u32)>) {
        self.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(0))
            .unwrap();
        let mock = MockSplitQueue::new(&self.mem, RING_SIZE);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_queue(&mut queue, &self.mem, &self.server);
        (outcome, self.used_entries(&mock))
    }

    fn used_entries(&self, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let used = mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let id: u32 = self.mem.read_obj(used.unchecked_add(4 + 8 * i)).unwrap();
                let len: u32 = self.mem.read_obj(used.unchecked_add(8 + 8 * i)).unwrap();
                (id, len)
            })
            .collect()
    }

    /// Sends raw request bytes (header included) and reads the reply.
    fn raw(&self, request: &[u8], reply_cap: u32) -> (QueueOutcome, Reply) {
        self.mem
            .write_slice(request, GuestAddress(REQ_ADDR))
            .unwrap();
        self.mem
            .write_slice(&vec![0xa5u8; reply_cap as usize], GuestAddress(REPLY_ADDR))
            .unwrap();
        // Header and body in separate readable descriptors, reply split after
        // the out header, as the Linux driver does.
        let mut descs = Vec::new();
        let hdr = request.len().min(size_of::<InHeader>()) as u32;
        descs.push((REQ_ADDR, hdr, false));
        if request.len() as u32 > hdr {
            descs.push((REQ_ADDR + u64::from(hdr), request.len() as u32 - hdr, false));
        }
        if reply_cap > 16 {
            descs.push((REPLY_ADDR, 16, true));
            descs.push((REPLY_ADDR + 16, reply_cap - 16, true));
        } else if reply_cap > 0 {
            descs.push((REPLY_ADDR, reply_cap, true));
        }
        let (outcome, used) = self.submit(&descs);
        assert_eq!(used.len(), 1, "exactly one used entry per chain");
        assert_eq!(used[0].0, 0, "used entry names the chain head");
        let used_len = used[0].1;
        assert!(
            used_len <= reply_cap,
            "used len {used_len} beyond writable room"
        );
        let mut header = OutHeader::default();
        let mut payload = Vec::new();
        if used_len as usize >= size_of::<OutHeader>() {
            self.mem
                .read_slice(header.as_mut_slice(), GuestAddress(REPLY_ADDR))
                .unwrap();
            assert_eq!(header.len, used_len, "out header len matches used len");
            payload = vec![0u8; used_len as usize - size_of::<OutHeader>()];
            self.mem
                .read_slice(&mut payload, GuestAddress(REPLY_ADDR + 16))
                .unwrap();
        }
        (
            outcome,
            Reply {
                used_len,
                header,
                payload,
            },
        )
    }

    fn header(&mut self, opcode: u32, nodeid: u64, body_len: usize) -> InHeader {
        self.unique += 1;
        InHeader {
            len: (size_of::<InHeader>() + body_len) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        }
    }

    /// Sends one well-formed request and returns its reply; checks that the
    /// reply names the request and that nothing panicked.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        let h = self.header(opcode, nodeid, body.len());
        let req = concat(&[h.as_slice(), body]);
        let (outcome, reply) = self.raw(&req, REPLY_CAP);
        assert_eq!(outcome.panics, 0);
        assert_eq!(outcome.completed, 1);
        if reply.used_len > 0 {
            assert_eq!(reply.header.unique, h.unique, "reply names the request");
        }
        reply
    }

    fn init(&mut self) -> InitOut {
        self.init_offering(FsOptions::empty())
    }

    /// FUSE_INIT offering the usual driver flags plus `extra`.
    fn init_offering(&mut self, extra: FsOptions) -> InitOut {
        let flags = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::MAX_PAGES
            | extra;
        let init = InitIn {
            major: 7,
            minor: 33,
            max_readahead: 0x2_0000,
            flags: flags.bits() as u32,
        };
        self.call(INIT, 0, init.as_slice()).obj::<InitOut>()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let r = self.call(LOOKUP, parent, &cstr(name));
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn getattr(&mut self, node: u64) -> Result<AttrOut, i32> {
        let r = self.call(GETATTR, node, GetattrIn::default().as_slice());
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<OpenOut, i32> {
        let arg = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let r = self.call(OPEN, node, arg.as_slice());
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let arg = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let r = self.call(READ, node, arg.as_slice());
        match r.errno() {
            0 => Ok(r.payload),
            e => Err(e),
        }
    }

    fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let arg = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let r = self.call(WRITE, node, &concat(&[arg.as_slice(), data]));
        match r.errno() {
            0 => Ok(r.obj::<WriteOut>().size),
            e => Err(e),
        }
    }

    fn release(&mut self, opcode: u32, node: u64, fh: u64) -> i32 {
        let arg = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(opcode, node, arg.as_slice()).errno()
    }

    fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, OpenOut), i32> {
        let arg = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0o022,
            fuse_flags: 0,
        };
        let r = self.call(CREATE, parent, &concat(&[arg.as_slice(), &cstr(name)]));
        if r.errno() != 0 {
            return Err(r.errno());
        }
        let p = r.ok();
        let mut e = EntryOut::default();
        e.as_mut_slice()
            .copy_from_slice(&p[..size_of::<EntryOut>()]);
        let mut o = OpenOut::default();
        o.as_mut_slice().copy_from_slice(
            &p[size_of::<EntryOut>()..size_of::<EntryOut>() + size_of::<OpenOut>()],
        );
        Ok((e, o))
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let arg = MkdirIn { mode, umask: 0 };
        let r = self.call(MKDIR, parent, &concat(&[arg.as_slice(), &cstr(name)]));
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let arg = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let r = self.call(MKNOD, parent, &concat(&[arg.as_slice(), &cstr(name)]));
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        let r = self.call(SYMLINK, parent, &concat(&[&cstr(name), &cstr(target)]));
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        let r = self.call(READLINK, node, &[]);
        match r.errno() {
            0 => Ok(r.payload),
            e => Err(e),
        }
    }

    fn link(&mut self, old: u64, newparent: u64, name: &str) -> Result<EntryOut, i32> {
        let arg = LinkIn { oldnodeid: old };
        let r = self.call(LINK, newparent, &concat(&[arg.as_slice(), &cstr(name)]));
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn setattr(&mut self, node: u64, arg: SetattrIn) -> Result<AttrOut, i32> {
        let r = self.call(SETATTR, node, arg.as_slice());
        match r.errno() {
            0 => Ok(r.obj()),
            e => Err(e),
        }
    }

    fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> i32 {
        let arg = SetxattrIn {
            size: value.len() as u32,
            flags: 0,
        };
        self.call(
            SETXATTR,
            node,
            &concat(&[arg.as_slice(), &cstr(name), value]),
        )
        .errno()
    }

    fn readdir(&mut self, opcode: u32, node: u64) -> Vec<(String, u64)> {
        let fh = {
            let r = self.call(OPENDIR, node, OpenIn::default().as_slice());
            r.obj::<OpenOut>().fh
        };
        let names = self.readdir_handle(opcode, node, fh);
        assert_eq!(self.release(RELEASEDIR, node, fh), 0);
        names
    }

    /// Every entry of directory `node` read with READDIR or READDIRPLUS
    /// requests of 4 KiB on handle `fh` (0 after a zero-message opendir), sorted.
    fn readdir_handle(&mut self, opcode: u32, node: u64, fh: u64) -> Vec<(String, u64)> {
        let mut names = Vec::new();
        let mut offset = 0u64;
        loop {
            let arg = ReadIn {
                fh,
                offset,
                size: 4096,
                ..Default::default()
            };
            let r = self.call(opcode, node, arg.as_slice());
            let p = r.ok().to_vec();
            if p.is_empty() {
                break;
            }
            let mut pos = 0;
            while pos < p.len() {
                let (dirent_at, nodeid) = if opcode == READDIRPLUS {
                    let mut d = Direntplus::default();
                    d.as_mut_slice()
                        .copy_from_slice(&p[pos..pos + size_of::<Direntplus>()]);
                    (pos + size_of::<EntryOut>(), d.entry_out.nodeid)
                } else {
                    (pos, 0)
                };
                let mut d = Dirent::default();
                d.as_mut_slice()
                    .copy_from_slice(&p[dirent_at..dirent_at + size_of::<Dirent>()]);
                let name_at = dirent_at + size_of::<Dirent>();
                let name = &p[name_at..name_at + d.namelen as usize];
                names.push((String::from_utf8(name.to_vec()).unwrap(), nodeid));
                offset = d.off;
                let rec = name_at + d.namelen as usize - pos;
                pos += (rec + 7) & !7;
            }
        }
        names.sort();
        names
    }
}

fn host_xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    let p = CString::new(probe.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings and a 1-byte value buffer.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.vmrt.probe".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    std::fs::remove_file(&probe).unwrap();
    rc == 0
}

// ---------------------------------------------------------------- device

#[test]
fn fs_device_config_space_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new("vmrtshared", dir.path(), CachePolicy::Never).unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes().len(), 2, "hiprio + 1 request queue");
    assert_eq!(fs.features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..10], b"vmrtshared");
    assert!(cfg[10..36].iter().all(|&b| b == 0), "tag is NUL-padded");
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
    // Partial and out-of-range reads.
    let mut four = [0xffu8; 4];
    fs.read_config(36, &mut four);
    assert_eq!(four, 1u32.to_le_bytes());
    let mut past = [0xffu8; 8];
    fs.read_config(38, &mut past);
    assert_eq!(past, [0, 0, 0, 0, 0, 0, 0, 0]);
    fs.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 8]);
    assert_eq!(fs.shared_dir(), std::fs::canonicalize(dir.path()).unwrap());
}

#[test]
fn fs_device_rejects_bad_tag_and_dir() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Fs::new("", dir.path(), CachePolicy::Never),
        Err(Error::InvalidTag(_))
    ));
    assert!(matches!(
        Fs::new(&"x".repeat(37), dir.path(), CachePolicy::Never),
        Err(Error::InvalidTag(_))
    ));
    assert!(matches!(
        Fs::new("a\0b", dir.path(), CachePolicy::Never),
        Err(Error::InvalidTag(_))
    ));
    // 36 bytes is the maximum and fills the field without a NUL.
    let fs = Fs::new(&"t".repeat(36), dir.path(), CachePolicy::Auto).unwrap();
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert!(cfg[..36].iter().all(|&b| b == b't'));
    assert!(matches!(
        Fs::new("t", &dir.path().join("missing"), CachePolicy::Never),
        Err(Error::SharedDir { .. })
    ));
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Fs::new("t", &file, CachePolicy::Never),
        Err(Error::NotADirectory(_))
    ));
}

#[test]
fn fs_cache_policy_serde() {
    #[derive(serde::Deserialize)]
    struct Share {
        #[serde(default)]
        cache: CachePolicy,
    }
    for (s, p) in [
        ("never", CachePolicy::Never),
        ("auto", CachePolicy::Auto),
        ("always", CachePolicy::Always),
    ] {
        let v: Share = serde_json::from_str(&format!("{{\"cache\":\"{s}\"}}")).unwrap();
        assert_eq!(v.cache, p);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{s}\""));
    }
    let v: Share = serde_json::from_str("{}").unwrap();
    assert_eq!(v.cache, CachePolicy::Never, "default is never");
    assert!(serde_json::from_str::<Share>("{\"cache\":\"Never\"}").is_err());
    assert!(serde_json::from_str::<Share>("{\"cache\":\"sometimes\"}").is_err());
}

/// Activation spawns the worker; a request queued and notified through the
/// queue eventfd is answered and the irqfd fires. Reset stops the worker.
#[test]
fn fs_device_worker_serves_request_queue() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), b"hi").unwrap();
    let mut fs = Fs::new("t", dir.path(), CachePolicy::Never).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), RING_SIZE);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x8000), RING_SIZE);
    let queues = vec![
        hiprio.create_queue::<Queue>().unwrap(),
        request.create_queue::<Queue>().unwrap(),
    ];
    let evts = vec![
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let kick = evts[1].try_clone().unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    fs.activate(ActivateContext {
        mem: mem.clone(),
        queues,
        queue_evts: evts,
        interrupt: Arc::clone(&interrupt),
        acked_features: VIRTIO_F_VERSION_1,
    })
    .unwrap();

    let init = InitIn {
        major: 7,
        minor: 33,
        max_readahead: 0,
        flags: 0,
    };
    let h = InHeader {
        len: (size_of::<InHeader>() + size_of::<InitIn>()) as u32,
        opcode: INIT,
        unique: 77,
        ..Default::default()
    };
    let req = concat(&[h.as_slice(), init.as_slice()]);
    mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(
            REQ_ADDR,
            req.len() as u32,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            REPLY_ADDR,
            4096,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    request.add_desc_chains(&descs, 0).unwrap();
    kick.write(1).unwrap();

    let mut fired = false;
    for _ in 0..500 {
        if irq.read().is_ok() {
            fired = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fired, "irqfd signalled after the request was served");
    assert_eq!(interrupt.status() & super::super::VIRTIO_MMIO_INT_VRING, 1);
    let used = request.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
    assert_eq!(idx, 1);
    let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
    let out: OutHeader = mem.read_obj(GuestAddress(REPLY_ADDR)).unwrap();
    assert_eq!(out.unique, 77);
    assert_eq!(out.error, 0);
    assert_eq!(out.len, len);
    let init_out: InitOut = mem.read_obj(GuestAddress(REPLY_ADDR + 16)).unwrap();
    assert_eq!(init_out.major, 7);

    assert!(fs.reset(), "device can be reset");
    assert!(fs.worker.is_none(), "worker stopped on reset");
}

// ---------------------------------------------------------------- protocol

#[test]
fn fs_init_negotiates_7_x_without_dax() {
    let mut h = Harness::uninit();
    let out = h.init();
    assert_eq!(out.major, 7);
    assert!(out.minor >= 27, "minor {}", out.minor);
    assert!(out.max_write >= 4096);
    let flags = granted(&out);
    assert!(!flags.contains(FsOptions::PERFILE_DAX));
    assert!(flags.contains(FsOptions::DO_READDIRPLUS));
    // A future major version gets the server's version back to retry.
    let init = InitIn {
        major: 8,
        minor: 0,
        max_readahead: 0,
        flags: 0,
    };
    let r = h.call(INIT, 0, init.as_slice());
    assert_eq!(r.obj::<InitOut>().major, 7);
    // An ancient major version is refused.
    let init = InitIn { major: 6, ..init };
    assert_eq!(h.call(INIT, 0, init.as_slice()).errno(), libc::EPROTO);
}

#[test]
fn fs_lookup_and_getattr() {
    let mut h = Harness::new();
    std::fs::write(h.root.join("file"), b"hello").unwrap();
    std::fs::create_dir(h.root.join("dir")).unwrap();
    let e = h.lookup(ROOT_ID, "file").unwrap();
    assert_ne!(e.nodeid, ROOT_ID);
    assert_eq!(e.attr.size, 5);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(
        e.attr.ino,
        std::fs::metadata(h.root.join("file")).unwrap().ino()
    );
    // Cache policy never: no entry/attribute caching.
    assert_eq!((e.entry_valid, e.attr_valid), (0, 0));
    let a = h.getattr(e.nodeid).unwrap();
    assert_eq!(a.attr.size, 5);
    let d = h.lookup(ROOT_ID, "dir").unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(h.lookup(ROOT_ID, "missing").unwrap_err(), libc::ENOENT);
    let root = h.getattr(ROOT_ID).unwrap();
    assert_eq!(root.attr.ino, std::fs::metadata(&h.root).unwrap().ino());
    // Host-side changes are visible at once.
    std::fs::write(h.root.join("file"), b"hello world").unwrap();
    assert_eq!(h.getattr(e.nodeid).unwrap().attr.size, 11);
}

#[test]
fn fs_cache_policy_timeouts() {
    let mut h = Harness::with_policy(CachePolicy::Always);
    h.init();
    std::fs::write(h.root.join("f"), b"x").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(e.entry_valid, 86_400);
    let o = h.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_ne!(o.open_flags & 2, 0, "FOPEN_KEEP_CACHE with cache=always");
    let mut h = Harness::new();
    std::fs::write(h.root.join("f"), b"x").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    let o = h.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_ne!(o.open_flags & 1, 0, "FOPEN_DIRECT_IO with cache=never");
}

#[test]
fn fs_missing_names_are_negative_entries_when_caching() {
    for (cache, secs) in [(CachePolicy::Auto, 1), (CachePolicy::Always, 86_400)] {
        let mut h = Harness::with_policy(cache);
        h.init();
        let miss = h.lookup(ROOT_ID, "missing").expect("a negative entry, not ENOENT");
        assert_eq!(miss.nodeid, 0, "{cache:?}: nodeid 0 is the negative entry");
        assert_eq!((miss.entry_valid, miss.entry_valid_nsec), (secs, 0), "{cache:?}");
        assert_eq!(miss.attr_valid, 0, "{cache:?}");
        // The server itself caches nothing: once the name exists it is found.
        std::fs::write(h.root.join("missing"), b"now here").unwrap();
        let hit = h.lookup(ROOT_ID, "missing").unwrap();
        assert_ne!(hit.nodeid, 0, "{cache:?}");
        assert_eq!(hit.attr.size, 8);
        // Other errors stay errors.
        std::fs::write(h.root.join("file"), b"x").unwrap();
        let f = h.lookup(ROOT_ID, "file").unwrap();
        assert_eq!(h.lookup(f.nodeid, "below-a-file").unwrap_err(), libc::ENOTDIR, "{cache:?}");
    }
    // Without caching a miss is ENOENT (fs_lookup_and_getattr).
}

#[test]
fn fs_open_read_write_release() {
    let mut h = Harness::new();
    std::fs::write(h.root.join("data"), b"0123456789").unwrap();
    let e = h.lookup(ROOT_ID, "data").unwrap();
    let o = h.open(e.nodeid, libc::O_RDWR).unwrap();
    assert_eq!(h.read(e.nodeid, o.fh, 2, 4).unwrap(), b"2345");
    assert_eq!(
        h.read(e.nodeid, o.fh, 8, 100).unwrap(),
        b"89",
        "short read at EOF"
    );
    assert_eq!(h.write(e.nodeid, o.fh, 10, b"abc").unwrap(), 3);
    assert_eq!(
        std::fs::read(h.root.join("data")).unwrap(),
        b"0123456789abc"
    );
    // A large write spanning many guest pages.
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(h.write(e.nodeid, o.fh, 0, &big).unwrap(), big.len() as u32);
    assert_eq!(h.read(e.nodeid, o.fh, 0, big.len() as u32).unwrap(), big);
    assert_eq!(h.release(RELEASE, e.nodeid, o.fh), 0);
    // The handle is gone after release.
    assert_eq!(h.read(e.nodeid, o.fh, 0, 1).unwrap_err(), libc::EBADF);
    // Read-only open cannot write.
    let o = h.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(h.write(e.nodeid, o.fh, 0, b"x").unwrap_err(), libc::EBADF);
    // Opening a directory with OPEN fails like open(2) with O_RDWR.
    let d = h.mkdir(ROOT_ID, "d", 0o755).unwrap();
    assert_eq!(h.open(d.nodeid, libc::O_RDWR).unwrap_err(), libc::EISDIR);
}

#[test]
fn fs_readdir_and_readdirplus() {
    let mut h = Harness::new();
    for i in 0..40 {
        std::fs::write(
            h.root.join(format!("file-with-a-longish-name-{i:02}")),
            b"x",
        )
        .unwrap();
    }
    std::fs::create_dir(h.root.join("sub")).unwrap();
    let names = h.readdir(READDIR, ROOT_ID);
    let mut expected: Vec<String> = (0..40)
        .map(|i| format!("file-with-a-longish-name-{i:02}"))
        .collect();
    expected.push("sub".into());
    expected.sort();
    let got: Vec<String> = names
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != "." && n != "..")
        .collect();
    assert_eq!(got, expected, "all entries across several READDIR calls");

    let plus = h.readdir(READDIRPLUS, ROOT_ID);
    let sub = plus.iter().find(|(n, _)| n == "sub").unwrap();
    assert_ne!(sub.1, 0, "READDIRPLUS returns a looked-up node");
    let via_lookup = h.lookup(ROOT_ID, "sub").unwrap();
    assert_eq!(via_lookup.nodeid, sub.1);
    let got: Vec<String> = plus
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != "." && n != "..")
        .collect();
    assert_eq!(got, expected);
}

/// The capabilities an INIT reply grants (`flags` and `flags2`).
fn granted(out: &InitOut) -> FsOptions {
    FsOptions::from_bits_truncate(u64::from(out.flags) | (u64::from(out.flags2) << 32))
}

/// FUSE_INIT that also offers zero-message opendir, as Linux >= 5.1 does.
fn init_offering_no_opendir(h: &mut Harness) -> FsOptions {
    granted(&h.init_offering(FsOptions::ZERO_MESSAGE_OPENDIR))
}

#[test]
fn fs_zero_message_opendir_with_caching_lists_without_a_handle() {
    for cache in [CachePolicy::Auto, CachePolicy::Always] {
        let mut h = Harness::with_policy(cache);
        let flags = init_offering_no_opendir(&mut h);
        assert!(flags.contains(FsOptions::ZERO_MESSAGE_OPENDIR), "{cache:?}: {flags:?}");
        for i in 0..40 {
            std::fs::write(h.root.join(format!("file-with-a-longish-name-{i:02}")), b"x").unwrap();
        }
        let d = h.mkdir(ROOT_ID, "sub", 0o755).unwrap();
        std::fs::write(h.root.join("sub/inner"), b"y").unwrap();
        // The driver then treats OPENDIR's ENOSYS as success and stops sending it.
        let r = h.call(OPENDIR, ROOT_ID, OpenIn::default().as_slice());
        assert_eq!(r.errno(), libc::ENOSYS, "{cache:?}");
        // READDIR with handle 0, continued across several requests by offset.
        let names: Vec<String> = h
            .readdir_handle(READDIR, ROOT_ID, 0)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "." && n != "..")
            .collect();
        let mut expected: Vec<String> =
            (0..40).map(|i| format!("file-with-a-longish-name-{i:02}")).collect();
        expected.push("sub".into());
        assert_eq!(names, expected, "{cache:?}");
        let plus = h.readdir_handle(READDIRPLUS, d.nodeid, 0);
        let inner = plus.iter().find(|(n, _)| n == "inner").unwrap();
        assert_ne!(inner.1, 0, "READDIRPLUS looks the entry up");
        // FSYNCDIR on handle 0 is served too.
        let arg = FsyncIn::default();
        assert_eq!(h.call(FSYNCDIR, d.nodeid, arg.as_slice()).errno(), 0, "{cache:?}");
        // Handle 0 names no directory the guest could not reach by node.
        let file = h.lookup(ROOT_ID, "file-with-a-longish-name-00").unwrap();
        let arg = ReadIn { fh: 0, size: 4096, ..Default::default() };
        assert_ne!(h.call(READDIR, file.nodeid, arg.as_slice()).errno(), 0, "READDIR of a file");
    }
}

#[test]
fn fs_without_caching_directories_are_opened_per_open() {
    let mut h = Harness::uninit();
    let flags = init_offering_no_opendir(&mut h);
    assert!(!flags.contains(FsOptions::ZERO_MESSAGE_OPENDIR), "{flags:?}");
    std::fs::write(h.root.join("a"), b"x").unwrap();
    let names: Vec<String> = h.readdir(READDIR, ROOT_ID).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"a".to_string()), "{names:?}");
}

#[test]
fn fs_create_mkdir_unlink_rmdir_rename() {
    let mut h = Harness::new();
    let (e, o) = h
        .create(ROOT_ID, "new", 0o640, libc::O_CREAT | libc::O_RDWR)
        .unwrap();
    assert_eq!(h.write(e.nodeid, o.fh, 0, b"created").unwrap(), 7);
    let meta = std::fs::metadata(h.root.join("new")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640 & !0o022);
    assert_eq!(std::fs::read(h.root.join("new")).unwrap(), b"created");
    assert_eq!(h.release(RELEASE, e.nodeid, o.fh), 0);
    assert_eq!(
        h.create(
            ROOT_ID,
            "new",
            0o644,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR
        )
        .unwrap_err(),
        libc::EEXIST
    );

    let d = h.mkdir(ROOT_ID, "dir", 0o750).unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert!(h.root.join("dir").is_dir());
    assert_eq!(
        std::fs::metadata(h.root.join("dir"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    assert_eq!(h.mkdir(ROOT_ID, "dir", 0o755).unwrap_err(), libc::EEXIST);

    // RENAME file into dir.
    let arg = RenameIn { newdir: d.nodeid };
    let r = h.call(
        RENAME,
        ROOT_ID,
        &concat(&[arg.as_slice(), &cstr("new"), &cstr("moved")]),
    );
    assert_eq!(r.errno(), 0);
    assert!(!h.root.join("new").exists());
    assert_eq!(std::fs::read(h.root.join("dir/moved")).unwrap(), b"created");

    assert_eq!(
        h.call(RMDIR, ROOT_ID, &cstr("dir")).errno(),
        libc::ENOTEMPTY
    );
    assert_eq!(h.call(UNLINK, d.nodeid, &cstr("moved")).errno(), 0);
    assert!(!h.root.join("dir/moved").exists());
    assert_eq!(
        h.call(UNLINK, d.nodeid, &cstr("moved")).errno(),
        libc::ENOENT
    );
    assert_eq!(h.call(RMDIR, ROOT_ID, &cstr("dir")).errno(), 0);
    assert!(!h.root.join("dir").exists());

    // Files created on the host appear to the guest, and the reverse.
    std::fs::write(h.root.join("from-host"), b"h").unwrap();
    assert!(h.lookup(ROOT_ID, "from-host").is_ok());
    std::fs::remove_file(h.root.join("from-host")).unwrap();
    assert_eq!(h.lookup(ROOT_ID, "from-host").unwrap_err(), libc::ENOENT);
}

#[test]
fn fs_symlink_readlink_setattr() {
    let mut h = Harness::new();
    let s = h.symlink(ROOT_ID, "ln", "target/inside").unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        std::fs::read_link(h.root.join("ln")).unwrap(),
        Path::new("target/inside")
    );
    assert_eq!(h.readlink(s.nodeid).unwrap(), b"target/inside");

    std::fs::write(h.root.join("f"), b"0123456789").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    let a = h
        .setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_MODE | FATTR_SIZE,
                mode: libc::S_IFREG | 0o600,
                size: 4,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.attr.size, 4);
    let meta = std::fs::metadata(h.root.join("f")).unwrap();
    assert_eq!(meta.len(), 4);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

/// Only `user.*` and the POSIX ACLs may be written by the guest: a
/// `security.capability` set through the share would give a host binary file
/// capabilities. The refusal comes before the host is asked, so it holds on
/// any host file system; nothing reaches the file.
#[test]
fn fs_xattrs_outside_user_namespace_are_refused() {
    let mut h = Harness::new();
    std::fs::write(h.root.join("bin"), b"").unwrap();
    let e = h.lookup(ROOT_ID, "bin").unwrap();
    for name in ["security.capability", "security.selinux", "trusted.overlay.opaque", "system.nfs4_acl", "user.", "userx.a"] {
        assert_eq!(h.setxattr(e.nodeid, name, b"\x01\x00\x00\x02"), libc::EPERM, "setxattr {name}");
        assert_eq!(h.call(REMOVEXATTR, e.nodeid, &cstr(name)).errno(), libc::EPERM, "removexattr {name}");
    }
    let p = CString::new(h.root.join("bin").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string and a null buffer of size 0 (size query).
    let n = unsafe { libc::getxattr(p.as_ptr(), c"security.capability".as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, -1, "no file capability reached the host file");
    for name in [&b"user.a"[..], b"system.posix_acl_access", b"system.posix_acl_default"] {
        assert!(crate::devices::virtio::fs::confined::guest_may_write_xattr(name));
    }
}

#[test]
fn fs_xattrs() {
    let mut h = Harness::new();
    std::fs::write(h.root.join("x"), b"").unwrap();
    let e = h.lookup(ROOT_ID, "x").unwrap();
    let rc = h.setxattr(e.nodeid, "user.vmrt", b"value-1");
    if !host_xattrs_supported(&h.root) {
        // The share's host file system has no user xattrs: the guest must
        // see the host's EOPNOTSUPP, not a fake success.
        assert_eq!(rc, libc::EOPNOTSUPP);
        return;
    }
    assert_eq!(rc, 0);
    let mut buf = [0u8; 64];
    let p = CString::new(h.root.join("x").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and a buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"user.vmrt".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"value-1", "host sees the xattr");

    // GETXATTR size probe, then value.
    let probe = GetxattrIn {
        size: 0,
        padding: 0,
    };
    let r = h.call(
        GETXATTR,
        e.nodeid,
        &concat(&[probe.as_slice(), &cstr("user.vmrt")]),
    );
    assert_eq!(r.obj::<GetxattrOut>().size, 7);
    let get = GetxattrIn {
        size: 64,
        padding: 0,
    };
    let r = h.call(
        GETXATTR,
        e.nodeid,
        &concat(&[get.as_slice(), &cstr("user.vmrt")]),
    );
    assert_eq!(r.ok(), b"value-1");
    let r = h.call(
        GETXATTR,
        e.nodeid,
        &concat(&[get.as_slice(), &cstr("user.none")]),
    );
    assert_eq!(r.errno(), libc::ENODATA);

    let r = h.call(LISTXATTR, e.nodeid, get.as_slice());
    let names: Vec<&[u8]> = r
        .ok()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    assert!(names.contains(&&b"user.vmrt"[..]), "{names:?}");

    assert_eq!(h.call(REMOVEXATTR, e.nodeid, &cstr("user.vmrt")).errno(), 0);
    // SAFETY: as above.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"user.vmrt".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, -1, "xattr removed on the host");
    assert_eq!(
        h.call(REMOVEXATTR, e.nodeid, &cstr("user.vmrt")).errno(),
        libc::ENODATA
    );
}

#[test]
fn fs_forget_has_no_reply() {
    let mut h = Harness::new();
    std::fs::write(h.root.join("f"), b"").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    let r = h.call(FORGET, e.nodeid, &1u64.to_le_bytes());
    assert_eq!(r.used_len, 0);
    // Forgetting the root is ignored: it stays usable.
    let r = h.call(FORGET, ROOT_ID, &1000u64.to_le_bytes());
    assert_eq!(r.used_len, 0);
    assert!(h.getattr(ROOT_ID).is_ok());
}

// ---------------------------------------------------------------- confinement

#[test]
fn fs_dotdot_from_root_stays_at_root() {
    let mut h = Harness::new();
    std::fs::write(h.outside("secret"), b"outside").unwrap();
    let root_ino = std::fs::metadata(&h.root).unwrap().ino();
    let up = h.lookup(ROOT_ID, "..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    assert_eq!(up.attr.ino, root_ino);
    let dot = h.lookup(ROOT_ID, ".").unwrap();
    assert_eq!(dot.nodeid, ROOT_ID);
    // `..` of `..` of a subdirectory is still the root.
    let sub = h.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    let up1 = h.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(up1.nodeid, ROOT_ID);
    let up2 = h.lookup(up1.nodeid, "..").unwrap();
    assert_eq!(up2.nodeid, ROOT_ID);
    assert_eq!(h.lookup(up2.nodeid, "secret").unwrap_err(), libc::ENOENT);
    // Multi-component names never reach the host's path walk.
    assert_eq!(h.lookup(ROOT_ID, "../secret").unwrap_err(), libc::EINVAL);
    assert_eq!(
        h.lookup(sub.nodeid, "../../secret").unwrap_err(),
        libc::EINVAL
    );
    // `.`/`..` and `/` are refused as names of new entries.
    assert_eq!(h.mkdir(ROOT_ID, "..", 0o755).unwrap_err(), libc::EINVAL);
    assert_eq!(h.mkdir(ROOT_ID, "a/b", 0o755).unwrap_err(), libc::EINVAL);
    assert_eq!(
        h.create(ROOT_ID, "../escape", 0o644, libc::O_CREAT | libc::O_RDWR)
            .unwrap_err(),
        libc::EINVAL
    );
    assert!(!h.outside("escape").exists());
    assert_eq!(h.symlink(ROOT_ID, "..", "/").unwrap_err(), libc::EINVAL);
}

#[test]
fn fs_symlinks_are_not_followed_host_side() {
    let mut h = Harness::new();
    let secret = h.outside("secret");
    std::fs::write(&secret, b"outside").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&secret, h.root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", h.root.join("rel")).unwrap();
    let g = h.symlink(ROOT_ID, "guest-made", "/etc/passwd").unwrap();
    assert_eq!(h.readlink(g.nodeid).unwrap(), b"/etc/passwd");

    for name in ["abs", "rel", "guest-made"] {
        let e = h.lookup(ROOT_ID, name).unwrap();
        assert_eq!(
            e.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} is a link"
        );
        // Opening the link inode never opens its target.
        assert!(h.open(e.nodeid, libc::O_RDONLY).is_err(), "{name} opened");
        assert!(h.open(e.nodeid, libc::O_RDWR | libc::O_TRUNC).is_err());
        // chmod / truncate / xattr on the link do not reach the target.
        let _ = h.setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_MODE,
                mode: libc::S_IFREG | 0o777,
                ..Default::default()
            },
        );
        assert!(h
            .setattr(
                e.nodeid,
                SetattrIn {
                    valid: FATTR_SIZE,
                    size: 0,
                    ..Default::default()
                },
            )
            .is_err());
        let _ = h.setxattr(e.nodeid, "user.evil", b"1");
        // CREATE over the link name, without O_EXCL, must not open the target.
        assert!(h
            .create(
                ROOT_ID,
                name,
                0o644,
                libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC
            )
            .is_err());
    }
    // READLINK-then-LOOKUP, as a guest resolving "/etc/passwd" inside the
    // share would do, stays inside the share.
    assert_eq!(h.lookup(ROOT_ID, "etc").unwrap_err(), libc::ENOENT);
    let up = h.lookup(ROOT_ID, "..").unwrap();
    assert_eq!(h.lookup(up.nodeid, "secret").unwrap_err(), libc::ENOENT);

    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"outside");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(meta.nlink(), 1);
    let p = CString::new(secret.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string, NULL buffer of size 0 asks for the list size.
    let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(n <= 0, "no xattr was set on the outside file");
}

#[test]
fn fs_symlink_swapped_in_after_lookup() {
    let mut h = Harness::new();
    let secret = h.outside("secret");
    std::fs::write(&secret, b"outside").unwrap();
    let outdir = h.outside("outdir");
    std::fs::create_dir(&outdir).unwrap();
    std::fs::write(h.root.join("f"), b"inside").unwrap();
    std::fs::create_dir(h.root.join("d")).unwrap();

    let f = h.lookup(ROOT_ID, "f").unwrap();
    let d = h.lookup(ROOT_ID, "d").unwrap();
    // Swap both for symlinks pointing out of the share.
    std::fs::rename(h.root.join("f"), h.root.join("f.old")).unwrap();
    std::os::unix::fs::symlink(&secret, h.root.join("f")).unwrap();
    std::fs::rename(h.root.join("d"), h.root.join("d.old")).unwrap();
    std::os::unix::fs::symlink(&outdir, h.root.join("d")).unwrap();

    // The node still names the original file.
    let o = h.open(f.nodeid, libc::O_RDWR).unwrap();
    assert_eq!(h.read(f.nodeid, o.fh, 0, 64).unwrap(), b"inside");
    h.write(f.nodeid, o.fh, 0, b"INSIDE").unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"outside");
    // Entries created under the directory node land in the original directory.
    let (_, o2) = h
        .create(d.nodeid, "new", 0o644, libc::O_CREAT | libc::O_RDWR)
        .unwrap();
    assert_ne!(o2.fh, 0);
    assert!(h.root.join("d.old/new").exists());
    assert_eq!(std::fs::read_dir(&outdir).unwrap().count(), 0);
    assert!(h.mkdir(d.nodeid, "sub", 0o755).is_ok());
    assert_eq!(std::fs::read_dir(&outdir).unwrap().count(), 0);
    // A fresh lookup sees the link, not its target.
    let again = h.lookup(ROOT_ID, "d").unwrap();
    assert_eq!(again.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(h.lookup(again.nodeid, "x").unwrap_err(), libc::ENOTDIR);
}

#[test]
fn fs_hard_links_only_within_share() {
    let mut h = Harness::new();
    let secret = h.outside("secret");
    std::fs::write(&secret, b"outside").unwrap();
    std::os::unix::fs::symlink(&secret, h.root.join("abs")).unwrap();
    std::fs::write(h.root.join("f"), b"inside").unwrap();

    // A node the guest never looked up (e.g. a guessed host inode number).
    let secret_ino = std::fs::metadata(&secret).unwrap().ino();
    for bogus in [secret_ino, 0xdead_beef, u64::MAX, 0] {
        assert!(
            h.link(bogus, ROOT_ID, "stolen").is_err(),
            "LINK from node {bogus}"
        );
        assert!(!h.root.join("stolen").exists());
    }
    // Linking a symlink links the link itself, not its target.
    let l = h.lookup(ROOT_ID, "abs").unwrap();
    let e = h.link(l.nodeid, ROOT_ID, "abs2").unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(std::fs::symlink_metadata(h.root.join("abs2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    // Linking a real file of the share works.
    let f = h.lookup(ROOT_ID, "f").unwrap();
    h.link(f.nodeid, ROOT_ID, "f2").unwrap();
    assert_eq!(std::fs::metadata(h.root.join("f")).unwrap().nlink(), 2);
}

#[test]
fn fs_device_nodes_refused() {
    let mut h = Harness::new();
    let null_rdev = libc::makedev(1, 3) as u32;
    assert_eq!(
        h.mknod(ROOT_ID, "chr", libc::S_IFCHR | 0o666, null_rdev)
            .unwrap_err(),
        libc::EPERM
    );
    assert_eq!(
        h.mknod(
            ROOT_ID,
            "blk",
            libc::S_IFBLK | 0o666,
            libc::makedev(8, 0) as u32
        )
        .unwrap_err(),
        libc::EPERM
    );
    assert!(!h.root.join("chr").exists() && !h.root.join("blk").exists());
    // FIFOs and regular files may be created...
    let fifo = h.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    assert!(std::fs::metadata(h.root.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    h.mknod(ROOT_ID, "reg", libc::S_IFREG | 0o644, 0).unwrap();
    assert!(h.root.join("reg").is_file());
    // ...but a FIFO is never opened host-side (that would block the worker).
    assert_eq!(
        h.open(fifo.nodeid, libc::O_RDONLY).unwrap_err(),
        libc::EBADF
    );

    // A device node placed in the share by the host is visible but cannot
    // be opened through the share.
    let path = CString::new(h.root.join("hostnull").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if rc == 0 {
        let e = h.lookup(ROOT_ID, "hostnull").unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(h.open(e.nodeid, libc::O_RDWR).unwrap_err(), libc::EBADF);
        assert_eq!(h.open(e.nodeid, libc::O_RDONLY).unwrap_err(), libc::EBADF);
        assert!(h
            .setattr(
                e.nodeid,
                SetattrIn {
                    valid: FATTR_SIZE,
                    ..Default::default()
                }
            )
            .is_err());
    } else {
        // Not root: the host cannot create the node either; nothing to check.
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
    }
}

#[test]
fn fs_dax_mapping_refused() {
    let mut h = Harness::new();
    let r = h.call(SETUPMAPPING, ROOT_ID, &[0u8; 40]);
    assert!(r.errno() != 0, "SETUPMAPPING without a DAX window fails");
}

// ---------------------------------------------------------------- malformed

#[test]
fn fs_malformed_short_header() {
    let h = Harness::new();
    let (outcome, reply) = h.raw(&[1u8; 20], 4096);
    assert_eq!(outcome.completed, 1);
    assert_eq!(outcome.malformed, 1);
    assert_eq!(outcome.panics, 0);
    assert_eq!(reply.used_len, 0, "nothing to answer without a header");
    // Empty chain of readable bytes.
    let (outcome, used) = h.submit(&[(REPLY_ADDR, 4096, true)]);
    assert_eq!((outcome.completed, outcome.panics), (1, 0));
    assert_eq!(used, vec![(0, 0)]);
}

#[test]
fn fs_malformed_length_fields() {
    let mut h = Harness::new();
    // in_header.len beyond the chain.
    let mut hdr = h.header(GETATTR, ROOT_ID, size_of::<GetattrIn>());
    hdr.len = 1 << 16;
    let req = concat(&[hdr.as_slice(), GetattrIn::default().as_slice()]);
    let (outcome, reply) = h.raw(&req, 4096);
    assert_eq!((outcome.malformed, outcome.panics), (1, 0));
    assert_eq!(reply.errno(), libc::EINVAL);
    assert_eq!(reply.header.unique, hdr.unique);
    // in_header.len shorter than the header itself.
    let mut hdr = h.header(LOOKUP, ROOT_ID, 4);
    hdr.len = 8;
    let req = concat(&[hdr.as_slice(), b"abc\0"]);
    let (_, reply) = h.raw(&req, 4096);
    assert_eq!(reply.errno(), libc::EINVAL);
    // Huge declared length.
    let mut hdr = h.header(WRITE, ROOT_ID, 0);
    hdr.len = u32::MAX;
    let (_, reply) = h.raw(hdr.as_slice(), 4096);
    assert_eq!(reply.errno(), libc::EINVAL);
    // Body shorter than the op's fixed arguments.
    let hdr = h.header(GETATTR, ROOT_ID, 0);
    let (outcome, reply) = h.raw(&concat(&[hdr.as_slice(), &[0u8; 4]]), 4096);
    assert_eq!(outcome.panics, 0);
    assert_ne!(reply.errno(), 0, "short GETATTR body is an error");
    let hdr = h.header(SETATTR, ROOT_ID, 0);
    let (_, reply) = h.raw(hdr.as_slice(), 4096);
    assert_ne!(reply.errno(), 0);
    // WRITE claiming more data than sent.
    std::fs::write(h.root.join("f"), b"").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    let o = h.open(e.nodeid, libc::O_RDWR).unwrap();
    let arg = WriteIn {
        fh: o.fh,
        size: 1 << 20,
        ..Default::default()
    };
    let r = h.call(WRITE, e.nodeid, &concat(&[arg.as_slice(), b"tiny"]));
    // Only the bytes present in the chain are written: a short write, never
    // guest memory beyond the request.
    match r.errno() {
        0 => assert_eq!(r.obj::<WriteOut>().size, 4),
        e => assert!(e > 0),
    }
    assert!(std::fs::read(h.root.join("f")).unwrap().len() <= 4);
    // Names without NUL terminator.
    let r = h.call(LOOKUP, ROOT_ID, b"noterm");
    assert_ne!(r.errno(), 0);
}

#[test]
fn fs_malformed_unknown_opcode_and_bad_node() {
    let mut h = Harness::new();
    for op in [0u32, 7, 19, 50, 4096, 0x7fff_ffff, u32::MAX] {
        let r = h.call(op, ROOT_ID, &[0u8; 64]);
        assert_eq!(r.errno(), libc::ENOSYS, "opcode {op}");
    }
    for node in [0u64, 2, 0xdead_beef, u64::MAX] {
        assert_eq!(h.getattr(node).unwrap_err(), libc::EBADF, "node {node}");
        assert!(h.lookup(node, "x").is_err());
        assert!(h.open(node, libc::O_RDONLY).is_err());
        assert!(h.mkdir(node, "x", 0o755).is_err());
    }
    // Bad file handle.
    std::fs::write(h.root.join("f"), b"abc").unwrap();
    let e = h.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(h.read(e.nodeid, 12345, 0, 3).unwrap_err(), libc::EBADF);
    assert_eq!(h.release(RELEASE, e.nodeid, 999), libc::EBADF);
}

#[test]
fn fs_malformed_descriptors() {
    let mut h = Harness::new();
    let hdr = h.header(GETATTR, ROOT_ID, size_of::<GetattrIn>());
    let req = concat(&[hdr.as_slice(), GetattrIn::default().as_slice()]);
    h.mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    let len = req.len() as u32;
    let cases: Vec<Vec<(u64, u32, bool)>> = vec![
        // Readable descriptor outside guest memory.
        vec![
            (MEM_SIZE as u64 + 0x1000, len, false),
            (REPLY_ADDR, 4096, true),
        ],
        // Readable descriptor crossing the end of guest memory.
        vec![(MEM_SIZE as u64 - 8, len, false), (REPLY_ADDR, 4096, true)],
        // Writable descriptor outside guest memory.
        vec![(REQ_ADDR, len, false), (u64::MAX - 10, 4096, true)],
        // No writable room at all.
        vec![(REQ_ADDR, len, false)],
        // Writable room too small for the reply.
        vec![(REQ_ADDR, len, false), (REPLY_ADDR, 8, true)],
        // Writable descriptor before the readable one.
        vec![(REPLY_ADDR, 4096, true), (REQ_ADDR, len, false)],
        // Zero-length descriptors.
        vec![(REQ_ADDR, 0, false), (REPLY_ADDR, 0, true)],
        // Huge lengths.
        vec![(REQ_ADDR, u32::MAX, false), (REPLY_ADDR, u32::MAX, true)],
    ];
    for descs in cases {
        let (outcome, used) = h.submit(&descs);
        assert_eq!(outcome.panics, 0, "{descs:?}");
        assert_eq!(outcome.completed, 1, "{descs:?}");
        assert_eq!(used.len(), 1);
        let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
        assert!(u64::from(used[0].1) <= writable, "{descs:?}");
    }
    // Still serving afterwards.
    assert!(h.getattr(ROOT_ID).is_ok());
}

#[test]
fn fs_malformed_ring_state() {
    let h = Harness::new();
    // Head index beyond the queue size in the available ring.
    h.mem.write_slice(&[0u8; 0x2000], GuestAddress(0)).unwrap();
    let mock = MockSplitQueue::new(&h.mem, RING_SIZE);
    let avail = mock.avail_addr();
    h.mem.write_obj(1000u16, avail.unchecked_add(4)).unwrap();
    h.mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let outcome = process_queue(&mut q, &h.mem, &h.server);
    assert_eq!(outcome.panics, 0);
    // Available index far ahead of what the ring can hold.
    h.mem.write_slice(&[0u8; 0x2000], GuestAddress(0)).unwrap();
    let mock = MockSplitQueue::new(&h.mem, RING_SIZE);
    h.mem
        .write_obj(RING_SIZE * 3, mock.avail_addr().unchecked_add(2))
        .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let outcome = process_queue(&mut q, &h.mem, &h.server);
    assert_eq!((outcome.panics, outcome.completed), (0, 0));
    // A descriptor loop (next pointing to itself).
    h.mem.write_slice(&[0u8; 0x2000], GuestAddress(0)).unwrap();
    let mock = MockSplitQueue::new(&h.mem, RING_SIZE);
    let raw = [RawDescriptor::from(SplitDescriptor::new(
        REQ_ADDR,
        40,
        VRING_DESC_F_NEXT as u16,
        0,
    ))];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let outcome = process_queue(&mut q, &h.mem, &h.server);
    assert_eq!((outcome.panics, outcome.completed), (0, 1));
}

fn opcode_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 1u32..=49,
        1 => any::<u32>(),
    ]
}

fn nodeid_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(ROOT_ID),
        2 => 2u64..8,
        1 => any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random FUSE requests (random opcode, node, length field and body)
    /// split into random descriptors with random writable room never panic,
    /// always complete the chain and never report more bytes than the room.
    #[test]
    fn fs_proptest_random_requests_never_panic(
        opcode in opcode_strategy(),
        nodeid in nodeid_strategy(),
        len_delta in prop_oneof![3 => Just(0i64), 1 => -64i64..64, 1 => any::<u32>().prop_map(i64::from)],
        body in proptest::collection::vec(any::<u8>(), 0..512),
        splits in proptest::collection::vec(1usize..64, 0..6),
        writable in proptest::collection::vec(0u32..8192, 0..4),
        raw_prefix in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..48)),
    ) {
        let h = proptest_harness();
        let mut req = match raw_prefix {
            // Entirely random bytes, header included.
            Some(prefix) => concat(&[&prefix, &body]),
            None => {
                let len = (size_of::<InHeader>() + body.len()) as i64 + len_delta;
                let hdr = InHeader {
                    len: len.clamp(0, i64::from(u32::MAX)) as u32,
                    opcode,
                    unique: 1,
                    nodeid,
                    ..Default::default()
                };
                concat(&[hdr.as_slice(), &body])
            }
        };
        if req.is_empty() {
            req.push(0);
        }
        h.mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
        let mut descs = Vec::new();
        let mut pos = 0usize;
        for s in splits {
            if pos + s >= req.len() {
                break;
            }
            descs.push((REQ_ADDR + pos as u64, s as u32, false));
            pos += s;
        }
        descs.push((REQ_ADDR + pos as u64, (req.len() - pos) as u32, false));
        let mut at = REPLY_ADDR;
        for w in &writable {
            descs.push((at, *w, true));
            at += u64::from(*w) + 64;
        }
        let (outcome, used) = h.submit(&descs);
        prop_assert_eq!(outcome.panics, 0);
        prop_assert_eq!(outcome.completed, 1);
        prop_assert_eq!(used.len(), 1);
        let room: u32 = writable.iter().sum();
        prop_assert!(used[0].1 <= room);
    }
}

/// A fresh share with a file and a directory for one proptest case.
fn proptest_harness() -> Harness {
    let h = Harness::new();
    std::fs::write(h.root.join("file"), b"some data").unwrap();
    std::fs::create_dir(h.root.join("dir")).unwrap();
    h
}
