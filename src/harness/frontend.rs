//! An in-process vhost-user frontend: the part of a VMM that talks to the daemon.
//!
//! Integration tests and `tmem-bench device` use it to drive the real daemon over its
//! real socket, the way QEMU or cloud-hypervisor would:
//!
//! - [`Vmm`] owns the vhost-user connection and the guest memory (one memfd, shared
//!   with the daemon through `SET_MEM_TABLE`). It negotiates features, reads config
//!   space, and starts, stops, resets or disconnects the device.
//! - [`Virtqueue`] is one split virtqueue laid out by hand in that memory. It is
//!   `Send`, so each queue can be driven from its own thread. It builds descriptor
//!   chains in any layout ([`Layout`], [`RawChain`]), publishes them, kicks, and
//!   collects used entries by polling the used ring or waiting on the call eventfd.
//!   On top sit the tmem operations ([`Virtqueue::put`], [`Virtqueue::get`], ...).
//!
//! Memory map of one queue's area (every part 4 KiB aligned, none overlapping; the
//! layout of virtio-queue's `MockSplitQueue` puts the used ring over the tail of the
//! avail ring, which hides event-index bugs):
//!
//! ```text
//! desc table | avail ring (+used_event) | used ring (+avail_event) | slot 0 | slot 1 | ...
//! ```
//!
//! A slot holds the buffers of one in-flight request plus room for its indirect table.

use std::{
    collections::VecDeque,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{fence, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use thiserror::Error;
use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserVirtioFeatures},
        Frontend, VhostUserFrontend, VhostUserProtocolFeatures,
    },
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use virtio_bindings::bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{self, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::protocol::{Op, RequestHeader, Status, CONFIG_SIZE, FLAG_EXCLUSIVE, HEADER_SIZE, PAGE_SIZE};

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Feature bit `bit` as a mask.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

// virtio-bindings gives descriptor and ring flags as u32; they fit the u16
// fields of the split ring.
const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
const VRING_USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

const DESC_SIZE: u64 = 16;
const RING_ALIGN: u64 = 4096;
/// Guest-physical address of the start of guest memory. Not 0, so that address 0 is
/// outside guest memory and the daemon's translation is actually exercised.
pub const GUEST_MEM_BASE: u64 = 0x10_0000;
/// Bytes of buffer space per request slot: a header, a page and a status with room
/// to spare for byte-granular layouts with gaps between buffers.
pub const SLOT_DATA: u32 = 3 * 4096;
/// Largest indirect table a slot can hold.
pub const MAX_INDIRECT: usize = 512;
const SLOT_STRIDE: u64 = SLOT_DATA as u64 + (MAX_INDIRECT as u64) * DESC_SIZE;
/// Byte written over every writable buffer before submission, so that bytes the
/// device did not write are recognisable (it is not a valid status).
pub const POISON: u8 = 0xEE;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user request {what} failed")]
    VhostUser {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("creating the guest memory memfd")]
    Memfd(#[source] io::Error),
    #[error("mapping guest memory")]
    MapMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory access")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("eventfd")]
    EventFd(#[source] io::Error),
    #[error("the daemon does not offer required feature bits {0:#x}")]
    MissingFeatures(u64),
    #[error("the daemon does not offer protocol features {0:?}")]
    MissingProtocolFeatures(VhostUserProtocolFeatures),
    #[error("the daemon has {have} queues, {want} were asked for")]
    TooFewQueues { have: u64, want: usize },
    #[error("queue {queue}: no free descriptors or slots")]
    QueueFull { queue: usize },
    #[error("queue {queue}: nothing in flight to wait for")]
    NothingInFlight { queue: usize },
    #[error("bad layout: {0}")]
    Layout(String),
    #[error("queue {queue}: no used entry within {timeout:?} (used idx {used_idx}, {in_flight} in flight, last seen {last_used})")]
    Timeout {
        queue: usize,
        timeout: Duration,
        used_idx: u16,
        last_used: u16,
        in_flight: usize,
    },
    #[error("queue {queue}: used entries appeared but no interrupt within {timeout:?}")]
    MissedInterrupt { queue: usize, timeout: Duration },
    #[error("queue {queue}: device returned used id {id}, which is not in flight")]
    BadUsedId { queue: usize, id: u32 },
    #[error("queue {queue}: device moved used idx from {last} to {now}, more than in flight ({in_flight})")]
    UsedIdxJump {
        queue: usize,
        last: u16,
        now: u16,
        in_flight: usize,
    },
}

pub type Result<T> = std::result::Result<T, FrontendError>;

fn vu(what: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { what, source }
}

/// How the frontend learns that the device has used a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Block on the call eventfd. If used entries are there but no interrupt came,
    /// that is reported as [`FrontendError::MissedInterrupt`].
    Interrupt,
    /// Busy-poll the used ring for up to the given time, then block on the call eventfd.
    Spin(Duration),
}

/// What the frontend asks for at connection time.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    pub queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    pub wait: WaitMode,
    /// Honour the device's notification suppression (`VRING_USED_F_NO_NOTIFY` or
    /// `avail_event`). When false, every submission is kicked.
    pub honour_no_notify: bool,
    /// How long any single wait for the daemon may take.
    pub timeout: Duration,
    /// Ack the RESET_DEVICE protocol feature if offered. Without it, a reset is
    /// RESET_OWNER, as with an older VMM.
    pub reset_device: bool,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            queues: 1,
            queue_size: 128,
            event_idx: true,
            indirect: true,
            wait: WaitMode::Interrupt,
            honour_no_notify: true,
            timeout: Duration::from_secs(10),
            reset_device: true,
        }
    }
}

/// Guest memory shared with the daemon: one memfd, mapped here and there.
struct GuestMem {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestMem {
    fn new(size: u64) -> Result<Self> {
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"tmem-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FrontendError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(FrontendError::Memfd)?;
        let len = usize::try_from(size)
            .map_err(|e| FrontendError::Layout(format!("guest memory size {size}: {e}")))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(GUEST_MEM_BASE),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(FrontendError::MapMemory)?;
        Ok(GuestMem { mem, size })
    }

    fn region_info(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(vu("region info")))
            .collect()
    }

    /// The frontend's own virtual address of a guest-physical address: what
    /// `SET_VRING_ADDR` wants.
    fn host_addr(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(FrontendError::Memory)
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Where one queue lives in guest memory.
#[derive(Clone, Copy, Debug)]
struct QueueLayout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    slots: u64,
    end: u64,
}

impl QueueLayout {
    fn new(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + align_up(DESC_SIZE * n, RING_ALIGN);
        let used = avail + align_up(6 + 2 * n, RING_ALIGN);
        let slots = used + align_up(6 + 8 * n, RING_ALIGN);
        let end = slots + n * SLOT_STRIDE;
        QueueLayout {
            size,
            desc,
            avail,
            used,
            slots,
            end: align_up(end, RING_ALIGN),
        }
    }

    fn span(size: u16) -> u64 {
        Self::new(0, size).end
    }
}

/// A vhost-user connection to one device of the daemon, with its guest memory.
pub struct Vmm {
    frontend: Frontend,
    mem: Arc<GuestMem>,
    cfg: VmmConfig,
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    daemon_queues: u64,
    mem_table_sent: bool,
}

/// Connects to a unix socket, retrying while it does not exist yet or nobody
/// listens, until `timeout`. Backs off from 1 ms so a daemon that is already up is
/// reached at once.
pub fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(FrontendError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

impl Vmm {
    /// Connects and negotiates, the way QEMU starts a vhost-user device: SET_OWNER,
    /// features, protocol features, queue count. Queues are started separately with
    /// [`Vmm::start`].
    pub fn connect(path: &Path, cfg: VmmConfig) -> Result<Self> {
        let stream = connect_socket(path, cfg.timeout)?;
        stream
            .set_read_timeout(Some(cfg.timeout))
            .map_err(|source| FrontendError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let frontend = Frontend::from_stream(stream, cfg.queues as u64);
        let span = QueueLayout::span(cfg.queue_size) * cfg.queues as u64;
        let mem = Arc::new(GuestMem::new(span)?);
        let mut vmm = Vmm {
            frontend,
            mem,
            cfg,
            offered: 0,
            acked: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            daemon_queues: 0,
            mem_table_sent: false,
        };
        vmm.negotiate()?;
        Ok(vmm)
    }

    fn negotiate(&mut self) -> Result<()> {
        self.frontend.set_owner().map_err(vu("SET_OWNER"))?;
        self.offered = self.frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let required = feature(VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES;
        if self.offered & required != required {
            return Err(FrontendError::MissingFeatures(required & !self.offered));
        }
        let theirs = self
            .frontend
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE;
        let needed = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        if !theirs.contains(needed) {
            return Err(FrontendError::MissingProtocolFeatures(needed - theirs));
        }
        let wanted = if self.cfg.reset_device {
            wanted
        } else {
            wanted - VhostUserProtocolFeatures::RESET_DEVICE
        };
        self.protocol = theirs & wanted;
        self.frontend
            .set_protocol_features(self.protocol)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message that has no reply of its own is acknowledged, so that
            // once a call returns the daemon has acted on it.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        self.daemon_queues = self.frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
        if self.daemon_queues < self.cfg.queues as u64 {
            return Err(FrontendError::TooFewQueues {
                have: self.daemon_queues,
                want: self.cfg.queues,
            });
        }
        Ok(())
    }

    /// Feature bits the daemon offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Feature bits acked by the last [`Vmm::start`].
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Queue count reported by GET_QUEUE_NUM.
    pub fn daemon_queues(&self) -> u64 {
        self.daemon_queues
    }

    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    /// The raw vhost-user frontend, for requests this type does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Reads `len` bytes of config space from `offset`.
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .map_err(vu("GET_CONFIG"))?;
        Ok(payload)
    }

    /// The whole 32-byte config space.
    pub fn config_space(&mut self) -> Result<[u8; CONFIG_SIZE]> {
        let raw = self.read_config(0, CONFIG_SIZE as u32)?;
        let mut out = [0u8; CONFIG_SIZE];
        out.copy_from_slice(&raw);
        Ok(out)
    }

    /// Acks features and starts every queue: SET_FEATURES, SET_MEM_TABLE (first
    /// time), then per queue NUM/BASE/ADDR/KICK/CALL/ENABLE. The rings are zeroed
    /// first, as a freshly booted driver would have them.
    pub fn start(&mut self) -> Result<Vec<Virtqueue>> {
        let mut want = feature(VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES;
        if self.cfg.event_idx {
            want |= feature(VIRTIO_RING_F_EVENT_IDX);
        }
        if self.cfg.indirect {
            want |= feature(VIRTIO_RING_F_INDIRECT_DESC);
        }
        self.acked = want & self.offered;
        self.frontend
            .set_features(self.acked)
            .map_err(vu("SET_FEATURES"))?;
        if !self.mem_table_sent {
            let regions = self.mem.region_info()?;
            self.frontend
                .set_mem_table(&regions)
                .map_err(vu("SET_MEM_TABLE"))?;
            self.mem_table_sent = true;
        }
        let event_idx = self.acked & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let span = QueueLayout::span(self.cfg.queue_size);
        let mut queues = Vec::with_capacity(self.cfg.queues);
        for index in 0..self.cfg.queues {
            let layout = QueueLayout::new(GUEST_MEM_BASE + span * index as u64, self.cfg.queue_size);
            let q = Virtqueue::new(self.mem.clone(), index, layout, event_idx, &self.cfg)?;
            self.start_queue(&q)?;
            queues.push(q);
        }
        Ok(queues)
    }

    /// Restarts stopped queues as they were, the way QEMU continues a paused VM:
    /// same rings, same eventfds, SET_VRING_BASE with what GET_VRING_BASE returned.
    pub fn resume(&mut self, queues: &[Virtqueue], bases: &[u32]) -> Result<()> {
        self.frontend
            .set_features(self.acked)
            .map_err(vu("SET_FEATURES"))?;
        for (q, &base) in queues.iter().zip(bases) {
            self.start_queue_at(q, base as u16)?;
        }
        Ok(())
    }

    fn start_queue(&mut self, q: &Virtqueue) -> Result<()> {
        self.start_queue_at(q, 0)
    }

    fn start_queue_at(&mut self, q: &Virtqueue, base: u16) -> Result<()> {
        let i = q.index;
        let l = q.layout;
        self.frontend
            .set_vring_num(i, l.size)
            .map_err(vu("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_base(i, base)
            .map_err(vu("SET_VRING_BASE"))?;
        let addr = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: 0,
            desc_table_addr: self.mem.host_addr(l.desc)?,
            used_ring_addr: self.mem.host_addr(l.used)?,
            avail_ring_addr: self.mem.host_addr(l.avail)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(i, &addr)
            .map_err(vu("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_kick(i, &q.kick)
            .map_err(vu("SET_VRING_KICK"))?;
        self.frontend
            .set_vring_call(i, &q.call)
            .map_err(vu("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_enable(i, true)
            .map_err(vu("SET_VRING_ENABLE"))?;
        Ok(())
    }

    /// Stops every started queue the way QEMU does when a guest reboots or the VM
    /// stops: GET_VRING_BASE, which returns the next avail index per queue.
    pub fn stop(&mut self) -> Result<Vec<u32>> {
        (0..self.cfg.queues)
            .map(|i| self.frontend.get_vring_base(i).map_err(vu("GET_VRING_BASE")))
            .collect()
    }

    /// Disables one queue (SET_VRING_ENABLE 0).
    pub fn disable_queue(&mut self, index: usize) -> Result<()> {
        self.frontend
            .set_vring_enable(index, false)
            .map_err(vu("SET_VRING_ENABLE"))
    }

    /// RESET_DEVICE (requires the protocol feature).
    pub fn reset_device(&mut self) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            return Err(FrontendError::MissingProtocolFeatures(
                VhostUserProtocolFeatures::RESET_DEVICE,
            ));
        }
        self.frontend.reset_device().map_err(vu("RESET_DEVICE"))
    }

    /// RESET_OWNER, the legacy reset.
    pub fn reset_owner(&mut self) -> Result<()> {
        self.frontend.reset_owner().map_err(vu("RESET_OWNER"))
    }

    /// Closes the connection (the VMM went away).
    pub fn disconnect(self) {
        drop(self)
    }
}

/// Where a descriptor's buffer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescAddr {
    /// Offset into the request's slot (translated to a guest-physical address).
    Slot(u32),
    /// Any guest-physical address, valid or not.
    Gpa(u64),
}

/// One descriptor of a [`RawChain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescSpec {
    pub addr: DescAddr,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor chain described descriptor by descriptor, for requests the
/// [`Layout`] builder cannot express (bad addresses, readable after writable, ...).
#[derive(Clone, Debug, Default)]
pub struct RawChain {
    pub descs: Vec<DescSpec>,
    pub indirect: bool,
    /// Bytes written into the slot before submission, at the given offsets.
    pub init: Vec<(u32, Vec<u8>)>,
    /// With `indirect`: put this address in the head descriptor instead of the
    /// real table's (e.g. a table outside guest memory).
    pub indirect_addr: Option<u64>,
    /// With `indirect`: put this length in the head descriptor instead of the real
    /// table's (e.g. zero, or not a multiple of 16).
    pub indirect_len: Option<u32>,
    /// With `indirect`: also set NEXT on the ring's indirect descriptor, with
    /// this `next` index (virtio 1.x forbids the combination).
    pub indirect_next: Option<u16>,
    /// Link the last descriptor back to the first, making an endless chain.
    pub cycle: bool,
    /// Give the last descriptor NEXT with this `next` index (e.g. beyond the table),
    /// making a chain that does not end where it stops.
    pub dangling_next: Option<u16>,
}

/// How a request's readable and writable byte streams are cut into descriptors.
///
/// `readable` and `writable` are the lengths of the consecutive descriptors; they
/// must add up to the stream lengths. Buffers are placed in the slot `gap` bytes
/// apart, so a device that assumes contiguous buffers reads the wrong bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub readable: Vec<u32>,
    pub writable: Vec<u32>,
    pub indirect: bool,
    pub gap: u32,
}

impl Layout {
    /// One descriptor for all readable bytes, one for all writable bytes.
    pub fn merged(readable: usize, writable: usize) -> Self {
        let nz = |n: usize| if n == 0 { vec![] } else { vec![n as u32] };
        Layout {
            readable: nz(readable),
            writable: nz(writable),
            indirect: false,
            gap: 64,
        }
    }

    /// The layout Linux drivers use: header, page, status each in its own descriptor.
    pub fn separate(op: Op) -> Self {
        let mut readable = vec![HEADER_SIZE as u32];
        if op.readable_payload() > 0 {
            readable.push(op.readable_payload() as u32);
        }
        let mut writable = vec![];
        if op.writable_payload() > 0 {
            writable.push(op.writable_payload() as u32);
        }
        writable.push(1);
        Layout {
            readable,
            writable,
            indirect: false,
            gap: 64,
        }
    }

    /// Cuts a stream of `total` bytes at the given offsets (sorted, each in
    /// `1..total`; duplicates give zero-length descriptors).
    pub fn cut(total: usize, cuts: &[usize]) -> Vec<u32> {
        let mut out = Vec::with_capacity(cuts.len() + 1);
        let mut prev = 0;
        for &c in cuts {
            out.push((c - prev) as u32);
            prev = c;
        }
        out.push((total - prev) as u32);
        out
    }

    pub fn with_indirect(mut self, indirect: bool) -> Self {
        self.indirect = indirect;
        self
    }

    pub fn with_gap(mut self, gap: u32) -> Self {
        self.gap = gap;
        self
    }

    /// Number of descriptors in the chain (or in the indirect table).
    pub fn len(&self) -> usize {
        self.readable.len() + self.writable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request: its readable bytes, how many writable bytes it offers, and the layout.
#[derive(Clone, Debug)]
pub struct GuestRequest {
    pub readable: Vec<u8>,
    pub writable_len: usize,
    pub layout: Layout,
}

impl GuestRequest {
    /// A well-formed request for `header` (with `page` for PUT), laid out as Linux
    /// drivers do.
    pub fn new(header: RequestHeader, page: Option<&[u8]>) -> Self {
        let mut readable = header.to_bytes().to_vec();
        if let Some(p) = page {
            readable.extend_from_slice(p);
        }
        let writable_len = header.op.writable_payload() + 1;
        let layout = Layout::separate(header.op);
        let mut layout = layout;
        if page.is_none() && header.op.readable_payload() > 0 {
            // Caller chose to send no page: keep the layout consistent with the bytes.
            layout.readable.truncate(1);
        }
        GuestRequest {
            readable,
            writable_len,
            layout,
        }
    }

    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Descriptors for this request, with the bytes to place in the slot.
    fn to_raw(&self) -> Result<RawChain> {
        let sum = |v: &[u32]| v.iter().map(|&l| l as usize).sum::<usize>();
        if sum(&self.layout.readable) != self.readable.len() {
            return Err(FrontendError::Layout(format!(
                "readable descriptors add up to {} bytes, the request has {}",
                sum(&self.layout.readable),
                self.readable.len()
            )));
        }
        if sum(&self.layout.writable) != self.writable_len {
            return Err(FrontendError::Layout(format!(
                "writable descriptors add up to {} bytes, the request wants {}",
                sum(&self.layout.writable),
                self.writable_len
            )));
        }
        let mut chain = RawChain {
            indirect: self.layout.indirect,
            ..RawChain::default()
        };
        let mut off = 0u32;
        let mut consumed = 0usize;
        for &len in &self.layout.readable {
            let bytes = self.readable[consumed..consumed + len as usize].to_vec();
            consumed += len as usize;
            chain.descs.push(DescSpec {
                addr: DescAddr::Slot(off),
                len,
                writable: false,
            });
            chain.init.push((off, bytes));
            off += len + self.layout.gap;
        }
        for &len in &self.layout.writable {
            chain.descs.push(DescSpec {
                addr: DescAddr::Slot(off),
                len,
                writable: true,
            });
            off += len + self.layout.gap;
        }
        if off > SLOT_DATA + self.layout.gap {
            return Err(FrontendError::Layout(format!(
                "{off} bytes of buffers do not fit a {SLOT_DATA}-byte slot"
            )));
        }
        Ok(chain)
    }
}

/// A used chain, read back.
#[derive(Clone, Debug)]
pub struct Completion {
    /// What [`Virtqueue::submit`] returned for this request.
    pub token: u64,
    /// The used length the device reported.
    pub used_len: u32,
    /// The whole writable stream as it is now (unwritten bytes are [`POISON`]).
    /// Descriptors outside the slot are not read back.
    pub written: Vec<u8>,
}

impl Completion {
    /// The last writable byte: where the status goes.
    pub fn status_byte(&self) -> Option<u8> {
        self.written.last().copied()
    }

    /// The status, if the status byte holds a known one.
    pub fn status(&self) -> Option<Status> {
        self.status_byte().and_then(|b| Status::try_from(b).ok())
    }

    /// The writable bytes before the status byte (the page of a GET).
    pub fn payload(&self) -> &[u8] {
        match self.written.split_last() {
            Some((_, rest)) => rest,
            None => &[],
        }
    }
}

/// The result of one tmem operation: status and used length, and for GET the page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// `None` if the status byte holds no valid status (e.g. it was not written).
    pub status: Option<Status>,
    pub raw_status: u8,
    pub used_len: u32,
    pub page: Vec<u8>,
}

impl From<Completion> for Reply {
    fn from(c: Completion) -> Self {
        Reply {
            status: c.status(),
            raw_status: c.status_byte().unwrap_or(POISON),
            used_len: c.used_len,
            page: c.payload().to_vec(),
        }
    }
}

struct InFlight {
    token: u64,
    slot: u16,
    descs: Vec<u16>,
    /// (guest-physical address, len) of each writable buffer inside the slot.
    writable: Vec<(u64, u32)>,
}

/// One split virtqueue, driven by one thread.
pub struct Virtqueue {
    mem: Arc<GuestMem>,
    index: usize,
    layout: QueueLayout,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    wait: WaitMode,
    honour_no_notify: bool,
    timeout: Duration,
    next_avail: u16,
    last_used: u16,
    free_descs: Vec<u16>,
    free_slots: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    next_token: u64,
    /// Avail idx when the device was last told about new buffers (for event idx).
    kicked_avail: u16,
    pending: VecDeque<Completion>,
    poison: bool,
    kicks: u64,
    interrupts: u64,
}

impl Virtqueue {
    fn new(
        mem: Arc<GuestMem>,
        index: usize,
        layout: QueueLayout,
        event_idx: bool,
        cfg: &VmmConfig,
    ) -> Result<Self> {
        // A fresh driver hands the device zeroed rings.
        let zeros = vec![0u8; (layout.slots - layout.desc) as usize];
        mem.mem
            .write_slice(&zeros, GuestAddress(layout.desc))
            .map_err(FrontendError::Memory)?;
        let n = layout.size;
        Ok(Virtqueue {
            mem,
            index,
            layout,
            kick: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            event_idx,
            wait: cfg.wait,
            honour_no_notify: cfg.honour_no_notify,
            timeout: cfg.timeout,
            next_avail: 0,
            last_used: 0,
            free_descs: (0..n).rev().collect(),
            free_slots: (0..n).rev().collect(),
            in_flight: (0..n).map(|_| None).collect(),
            in_flight_count: 0,
            next_token: 0,
            kicked_avail: 0,
            pending: VecDeque::new(),
            poison: true,
            kicks: 0,
            interrupts: 0,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Requests submitted whose completion the caller has not taken yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count + self.pending.len()
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    pub fn set_wait_mode(&mut self, wait: WaitMode) {
        self.wait = wait;
    }

    /// Kicks sent and interrupts received so far.
    pub fn notify_counts(&self) -> (u64, u64) {
        (self.kicks, self.interrupts)
    }

    /// One past the last guest-physical address of guest memory.
    pub fn guest_mem_end(&self) -> u64 {
        GUEST_MEM_BASE + self.mem.size
    }

    fn slot_gpa(&self, slot: u16) -> u64 {
        self.layout.slots + u64::from(slot) * SLOT_STRIDE
    }

    fn m(&self) -> &GuestMemoryMmap {
        &self.mem.mem
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<()> {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.m()
            .write_slice(&raw, GuestAddress(table + DESC_SIZE * u64::from(i)))
            .map_err(FrontendError::Memory)
    }

    /// Publishes a well-formed or deliberately odd request; returns its token.
    pub fn submit(&mut self, req: &GuestRequest) -> Result<u64> {
        let chain = req.to_raw()?;
        self.submit_raw(&chain)
    }

    /// Publishes a chain built descriptor by descriptor.
    pub fn submit_raw(&mut self, chain: &RawChain) -> Result<u64> {
        let init: Vec<(u32, &[u8])> = chain.init.iter().map(|(o, b)| (*o, &b[..])).collect();
        self.submit_parts(chain, &chain.descs, &init)
    }

    /// A well-formed request in the Linux driver's layout (header, page, status in
    /// separate descriptors, or one indirect descriptor), written straight from
    /// `page` into guest memory: the fast path for benchmarks.
    pub fn submit_op(&mut self, header: &RequestHeader, page: Option<&[u8]>, indirect: bool) -> Result<u64> {
        const PAGE_AT: u32 = 64;
        let raw = header.to_bytes();
        let page_len = PAGE_SIZE as u32;
        let mut descs = [DescSpec {
            addr: DescAddr::Slot(0),
            len: HEADER_SIZE as u32,
            writable: false,
        }; 3];
        let mut n = 1;
        if header.op.readable_payload() > 0 || header.op.writable_payload() > 0 {
            descs[1] = DescSpec {
                addr: DescAddr::Slot(PAGE_AT),
                len: page_len,
                writable: header.op.writable_payload() > 0,
            };
            n = 2;
        }
        descs[n] = DescSpec {
            addr: DescAddr::Slot(PAGE_AT + page_len + 64),
            len: 1,
            writable: true,
        };
        let descs = &descs[..n + 1];
        let chain = RawChain {
            indirect,
            ..RawChain::default()
        };
        match page {
            Some(p) => self.submit_parts(&chain, descs, &[(0, &raw[..]), (PAGE_AT, p)]),
            None => self.submit_parts(&chain, descs, &[(0, &raw[..])]),
        }
    }

    fn submit_parts(
        &mut self,
        chain: &RawChain,
        descs_in: &[DescSpec],
        init: &[(u32, &[u8])],
    ) -> Result<u64> {
        let queue = self.index;
        if descs_in.is_empty() {
            return Err(FrontendError::Layout("a chain needs a descriptor".into()));
        }
        let direct = if chain.indirect { 1 } else { descs_in.len() };
        if chain.indirect && descs_in.len() > MAX_INDIRECT {
            return Err(FrontendError::Layout(format!(
                "{} descriptors exceed the {MAX_INDIRECT}-entry indirect table",
                descs_in.len()
            )));
        }
        if self.free_descs.len() < direct || self.free_slots.is_empty() {
            // Used chains not reaped yet still hold their descriptors.
            self.reap()?;
        }
        if self.free_descs.len() < direct || self.free_slots.is_empty() {
            return Err(FrontendError::QueueFull { queue });
        }
        let slot = self.free_slots.pop().ok_or(FrontendError::QueueFull { queue })?;
        let base = self.slot_gpa(slot);
        let gpa = |a: DescAddr| match a {
            DescAddr::Slot(off) => base + u64::from(off),
            DescAddr::Gpa(g) => g,
        };
        for (off, bytes) in init {
            self.m()
                .write_slice(bytes, GuestAddress(base + u64::from(*off)))
                .map_err(FrontendError::Memory)?;
        }
        let mut writable = Vec::new();
        for d in descs_in.iter().filter(|d| d.writable) {
            if let DescAddr::Slot(off) = d.addr {
                let end = u64::from(off) + u64::from(d.len);
                if end <= u64::from(SLOT_DATA) {
                    let g = base + u64::from(off);
                    if self.poison {
                        self.poison_at(g, d.len)?;
                    }
                    writable.push((g, d.len));
                }
            }
        }
        let flags_of = |d: &DescSpec| if d.writable { VRING_DESC_F_WRITE } else { 0 };
        let mut descs = Vec::with_capacity(direct);
        for _ in 0..direct {
            // Checked above that enough are free.
            descs.push(self.free_descs.pop().ok_or(FrontendError::QueueFull { queue })?);
        }
        if chain.indirect {
            let table = base + u64::from(SLOT_DATA);
            let n = descs_in.len();
            for (i, d) in descs_in.iter().enumerate() {
                let last = i + 1 == n && !chain.cycle;
                let mut flags = flags_of(d) | if last { 0 } else { VRING_DESC_F_NEXT };
                let mut next = if last { 0 } else { ((i + 1) % n) as u16 };
                if let (true, Some(dangling)) = (i + 1 == n, chain.dangling_next) {
                    flags |= VRING_DESC_F_NEXT;
                    next = dangling;
                }
                self.write_desc(table, i as u16, gpa(d.addr), d.len, flags, next)?;
            }
            let taddr = chain.indirect_addr.unwrap_or(table);
            let tlen = chain.indirect_len.unwrap_or((n as u64 * DESC_SIZE) as u32);
            let (flags, next) = match chain.indirect_next {
                Some(next) => (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, next),
                None => (VRING_DESC_F_INDIRECT, 0),
            };
            self.write_desc(self.layout.desc, descs[0], taddr, tlen, flags, next)?;
        } else {
            let n = descs.len();
            for (i, d) in descs_in.iter().enumerate() {
                let last = i + 1 == n && !chain.cycle;
                let mut flags = flags_of(d) | if last { 0 } else { VRING_DESC_F_NEXT };
                let mut next = if last { 0 } else { descs[(i + 1) % n] };
                if let (true, Some(dangling)) = (i + 1 == n, chain.dangling_next) {
                    flags |= VRING_DESC_F_NEXT;
                    next = dangling;
                }
                self.write_desc(self.layout.desc, descs[i], gpa(d.addr), d.len, flags, next)?;
            }
        }
        let head = descs[0];
        let token = self.next_token;
        self.next_token += 1;
        self.in_flight[head as usize] = Some(InFlight {
            token,
            slot,
            descs,
            writable,
        });
        self.in_flight_count += 1;
        self.publish(head)?;
        Ok(token)
    }

    fn poison_at(&self, gpa: u64, len: u32) -> Result<()> {
        const CHUNK: [u8; 512] = [POISON; 512];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(CHUNK.len() as u32);
            self.m()
                .write_slice(&CHUNK[..n as usize], GuestAddress(gpa + u64::from(done)))
                .map_err(FrontendError::Memory)?;
            done += n;
        }
        Ok(())
    }

    /// Whether writable buffers are filled with [`POISON`] before submission (on
    /// by default; tests rely on it to see what the device did not write).
    pub fn set_poison(&mut self, poison: bool) {
        self.poison = poison;
    }

    fn publish(&mut self, head: u16) -> Result<()> {
        let n = u64::from(self.layout.size);
        let avail = self.layout.avail;
        let slot = u64::from(self.next_avail % self.layout.size);
        self.m()
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * slot))
            .map_err(FrontendError::Memory)?;
        if self.event_idx {
            // used_event: interrupt me as soon as the next chain is used. It must be
            // in place before the device can see the new avail idx.
            self.m()
                .write_obj(self.last_used.to_le(), GuestAddress(avail + 4 + 2 * n))
                .map_err(FrontendError::Memory)?;
        }
        // Descriptors, ring entry and used_event before the index that publishes them.
        fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.m()
            .store(
                self.next_avail.to_le(),
                GuestAddress(avail + 2),
                Ordering::Release,
            )
            .map_err(FrontendError::Memory)?;
        // The index store must be visible before we read the device's suppression
        // state, or we could skip a kick the device is waiting for.
        fence(Ordering::SeqCst);
        if self.need_kick()? {
            self.kick()?;
        }
        Ok(())
    }

    fn need_kick(&mut self) -> Result<bool> {
        let old = self.kicked_avail;
        let new = self.next_avail;
        if !self.honour_no_notify {
            return Ok(true);
        }
        let used = self.layout.used;
        let kick = if self.event_idx {
            let n = u64::from(self.layout.size);
            let avail_event: u16 = self
                .m()
                .load(GuestAddress(used + 4 + 8 * n), Ordering::Acquire)
                .map_err(FrontendError::Memory)?;
            vring_need_event(u16::from_le(avail_event), new, old)
        } else {
            let flags: u16 = self
                .m()
                .load(GuestAddress(used), Ordering::Acquire)
                .map_err(FrontendError::Memory)?;
            u16::from_le(flags) & VRING_USED_F_NO_NOTIFY == 0
        };
        Ok(kick)
    }

    /// Publishes avail ring entries the frontend does not track (a head index of
    /// the guest's choosing, possibly out of range), or with `idx_jump` moves the
    /// avail index further than there are entries. For hostile-driver tests: the
    /// queue cannot be trusted afterwards.
    pub fn publish_bogus(&mut self, head: u16, idx_jump: u16) -> Result<()> {
        let slot = u64::from(self.next_avail % self.layout.size);
        self.m()
            .write_obj(head.to_le(), GuestAddress(self.layout.avail + 4 + 2 * slot))
            .map_err(FrontendError::Memory)?;
        fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(idx_jump);
        self.m()
            .store(
                self.next_avail.to_le(),
                GuestAddress(self.layout.avail + 2),
                Ordering::Release,
            )
            .map_err(FrontendError::Memory)?;
        fence(Ordering::SeqCst);
        self.kick()
    }

    /// The used index as the device last published it.
    pub fn device_used_idx(&self) -> Result<u16> {
        self.used_idx()
    }

    /// Writes the kick eventfd unconditionally.
    pub fn kick(&mut self) -> Result<()> {
        self.kicked_avail = self.next_avail;
        self.kicks += 1;
        self.kick.write(1).map_err(FrontendError::EventFd)
    }

    fn used_idx(&self) -> Result<u16> {
        let idx: u16 = self
            .m()
            .load(GuestAddress(self.layout.used + 2), Ordering::Acquire)
            .map_err(FrontendError::Memory)?;
        Ok(u16::from_le(idx))
    }

    /// Moves every used entry the device has published into the completion queue.
    fn reap(&mut self) -> Result<()> {
        let now = self.used_idx()?;
        let new = now.wrapping_sub(self.last_used) as usize;
        if new == 0 {
            return Ok(());
        }
        if new > self.in_flight_count {
            return Err(FrontendError::UsedIdxJump {
                queue: self.index,
                last: self.last_used,
                now,
                in_flight: self.in_flight_count,
            });
        }
        // The entries were written before the index the device published.
        fence(Ordering::Acquire);
        for _ in 0..new {
            let slot = u64::from(self.last_used % self.layout.size);
            let entry = self.layout.used + 4 + 8 * slot;
            let id: u32 = self
                .m()
                .read_obj(GuestAddress(entry))
                .map_err(FrontendError::Memory)?;
            let len: u32 = self
                .m()
                .read_obj(GuestAddress(entry + 4))
                .map_err(FrontendError::Memory)?;
            let (id, len) = (u32::from_le(id), u32::from_le(len));
            let inf = self.in_flight.get_mut(id as usize).and_then(Option::take).ok_or(
                FrontendError::BadUsedId {
                    queue: self.index,
                    id,
                },
            )?;
            let total: usize = inf.writable.iter().map(|w| w.1 as usize).sum();
            let mut written = vec![0u8; total];
            let mut at = 0;
            for &(g, l) in &inf.writable {
                self.m()
                    .read_slice(&mut written[at..at + l as usize], GuestAddress(g))
                    .map_err(FrontendError::Memory)?;
                at += l as usize;
            }
            self.free_descs.extend(inf.descs.iter().rev());
            self.free_slots.push(inf.slot);
            self.in_flight_count -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            self.pending.push_back(Completion {
                token: inf.token,
                used_len: len,
                written,
            });
        }
        Ok(())
    }

    /// A completion if one is ready, without waiting.
    pub fn try_complete(&mut self) -> Result<Option<Completion>> {
        if self.pending.is_empty() {
            self.reap()?;
        }
        Ok(self.pending.pop_front())
    }

    /// Waits for the next completion (in used-ring order).
    pub fn complete(&mut self) -> Result<Completion> {
        if let Some(c) = self.try_complete()? {
            return Ok(c);
        }
        self.wait_more()?;
        self.pending
            .pop_front()
            .ok_or(FrontendError::NothingInFlight { queue: self.index })
    }

    /// Waits until the device has used at least one more chain and it has been
    /// reaped into `pending`.
    fn wait_more(&mut self) -> Result<()> {
        let before = self.pending.len();
        self.reap()?;
        if self.pending.len() > before {
            return Ok(());
        }
        if self.in_flight_count == 0 {
            return Err(FrontendError::NothingInFlight { queue: self.index });
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        if let WaitMode::Spin(spin) = self.wait {
            let spin_end = start + spin;
            while Instant::now() < spin_end {
                self.reap()?;
                if self.pending.len() > before {
                    // Clear an interrupt that may have come with it, so a later blocking
                    // wait does not return on a stale one.
                    if self.call.read().is_ok() {
                        self.interrupts += 1;
                    }
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.reap()?;
                if self.pending.len() > before {
                    return Err(FrontendError::MissedInterrupt {
                        queue: self.index,
                        timeout: self.timeout,
                    });
                }
                return Err(FrontendError::Timeout {
                    queue: self.index,
                    timeout: self.timeout,
                    used_idx: self.used_idx()?,
                    last_used: self.last_used,
                    in_flight: self.in_flight_count,
                });
            }
            // Re-arm before sleeping, as a driver re-enables callbacks: used_event
            // written at submit time may already be behind us after earlier reaps,
            // and the device would then rightly stay silent.
            self.arm_interrupt()?;
            if self.pending.len() > before {
                return Ok(());
            }
            if self.wait_call(deadline - now)? {
                self.interrupts += 1;
                self.reap()?;
                if self.pending.len() > before {
                    return Ok(());
                }
            }
        }
    }

    /// Points used_event at the next used entry, then looks at the used ring once
    /// more so an entry published before the store is not slept through.
    fn arm_interrupt(&mut self) -> Result<()> {
        if self.event_idx {
            let n = u64::from(self.layout.size);
            self.m()
                .store(
                    self.last_used.to_le(),
                    GuestAddress(self.layout.avail + 4 + 2 * n),
                    Ordering::Release,
                )
                .map_err(FrontendError::Memory)?;
        }
        fence(Ordering::SeqCst);
        self.reap()
    }

    /// Blocks on the call eventfd; true if it fired (and was cleared).
    fn wait_call(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(FrontendError::EventFd(e));
        }
        if r == 0 {
            return Ok(false);
        }
        match self.call.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(FrontendError::EventFd(e)),
        }
    }

    /// Submits one request and waits for it.
    pub fn roundtrip(&mut self, req: &GuestRequest) -> Result<Completion> {
        let token = self.submit(req)?;
        self.wait_token(token)
    }

    /// Submits one raw chain and waits for it.
    pub fn roundtrip_raw(&mut self, chain: &RawChain) -> Result<Completion> {
        let token = self.submit_raw(chain)?;
        self.wait_token(token)
    }

    fn wait_token(&mut self, token: u64) -> Result<Completion> {
        loop {
            if let Some(pos) = self.pending.iter().position(|c| c.token == token) {
                // Completions of earlier pipelined requests stay queued for complete().
                return self
                    .pending
                    .remove(pos)
                    .ok_or(FrontendError::NothingInFlight { queue: self.index });
            }
            self.wait_more()?;
        }
    }

    /// PUT `page` at (`pool`, `index`).
    pub fn put(&mut self, pool: u32, index: u64, page: &[u8]) -> Result<Reply> {
        let req = GuestRequest::new(header(Op::Put, 0, pool, index, 0), Some(page));
        self.roundtrip(&req).map(Reply::from)
    }

    /// PUT_FILL: the page is `value` repeated.
    pub fn put_fill(&mut self, pool: u32, index: u64, value: u64) -> Result<Reply> {
        let req = GuestRequest::new(header(Op::PutFill, 0, pool, index, value), None);
        self.roundtrip(&req).map(Reply::from)
    }

    /// GET (`exclusive`: drop the page once read).
    pub fn get(&mut self, pool: u32, index: u64, exclusive: bool) -> Result<Reply> {
        let flags = if exclusive { FLAG_EXCLUSIVE } else { 0 };
        let req = GuestRequest::new(header(Op::Get, flags, pool, index, 0), None);
        self.roundtrip(&req).map(Reply::from)
    }

    pub fn invalidate_page(&mut self, pool: u32, index: u64) -> Result<Reply> {
        let req = GuestRequest::new(header(Op::InvalidatePage, 0, pool, index, 0), None);
        self.roundtrip(&req).map(Reply::from)
    }

    pub fn invalidate_pool(&mut self, pool: u32) -> Result<Reply> {
        let req = GuestRequest::new(header(Op::InvalidatePool, 0, pool, 0, 0), None);
        self.roundtrip(&req).map(Reply::from)
    }
}

/// virtio-blk requests, for the queues of a blk device: a 16-byte header
/// (type, reserved, sector), then `out` device-readable (a write's data or
/// DISCARD/WRITE_ZEROES ranges) or `in_len` device-writable bytes (a read's
/// data, GET_ID's ID), then the status byte, each in its own descriptor, the
/// way Linux's virtio_blk lays them out. Everything must fit one slot
/// ([`SLOT_DATA`] bytes).
impl Virtqueue {
    /// Publishes one virtio-blk request; returns its token.
    pub fn submit_blk(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Result<u64> {
        const DATA_AT: u32 = 64;
        let data_len = (out.len() as u32).max(in_len);
        let status_at = DATA_AT + data_len.next_multiple_of(64);
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&kind.to_le_bytes());
        head[8..].copy_from_slice(&sector.to_le_bytes());
        let mut descs = vec![DescSpec {
            addr: DescAddr::Slot(0),
            len: 16,
            writable: false,
        }];
        if !out.is_empty() {
            descs.push(DescSpec {
                addr: DescAddr::Slot(DATA_AT),
                len: out.len() as u32,
                writable: false,
            });
        }
        if in_len > 0 {
            descs.push(DescSpec {
                addr: DescAddr::Slot(DATA_AT),
                len: in_len,
                writable: true,
            });
        }
        descs.push(DescSpec {
            addr: DescAddr::Slot(status_at),
            len: 1,
            writable: true,
        });
        if status_at >= SLOT_DATA {
            return Err(FrontendError::Layout(format!(
                "{data_len} bytes of data do not fit a {SLOT_DATA}-byte slot"
            )));
        }
        let chain = RawChain {
            descs,
            indirect: false,
            ..RawChain::default()
        };
        self.submit_parts(&chain, &chain.descs, &[(0, &head[..]), (DATA_AT, out)])
    }

    /// One virtio-blk request, waited for.
    pub fn blk(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Result<Completion> {
        let token = self.submit_blk(kind, sector, out, in_len)?;
        self.wait_token(token)
    }
}

/// One DISCARD or WRITE_ZEROES range.
pub fn blk_range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    raw
}

/// A request header with the given fields.
pub fn header(op: Op, flags: u8, pool: u32, index: u64, arg: u64) -> RequestHeader {
    RequestHeader {
        op,
        flags,
        pool,
        index,
        arg,
    }
}

/// The virtio event-index test: has `new_idx` moved past `event` since `old`?
pub fn vring_need_event(event: u16, new_idx: u16, old: u16) -> bool {
    new_idx.wrapping_sub(event).wrapping_sub(1) < new_idx.wrapping_sub(old)
}

/// The page PUT_FILL stands for.
pub fn fill_page(value: u64) -> Vec<u8> {
    value.to_le_bytes().repeat(PAGE_SIZE / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal tmem device built on vhost-user-backend, just enough to check that
    /// the frontend moves real descriptors through real rings. The daemon proper is
    /// tested in tests/ against this same frontend.
    mod mini {
        use std::{
            collections::HashMap,
            io::{Read, Write},
            sync::{Arc, Mutex},
        };

        use vhost::vhost_user::{Listener, VhostUserProtocolFeatures};
        use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
        use virtio_queue::QueueOwnedT;
        use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
        use vmm_sys_util::epoll::EventSet;

        use super::super::*;

        pub struct Mini {
            mem: GuestMemoryAtomic<GuestMemoryMmap>,
            event_idx: bool,
            pages: HashMap<(u32, u64), Vec<u8>>,
        }

        impl VhostUserBackendMut for Mini {
            type Bitmap = ();
            type Vring = VringRwLock;

            fn num_queues(&self) -> usize {
                2
            }
            fn max_queue_size(&self) -> usize {
                256
            }
            fn features(&self) -> u64 {
                feature(VIRTIO_F_VERSION_1)
                    | feature(VIRTIO_RING_F_EVENT_IDX)
                    | feature(VIRTIO_RING_F_INDIRECT_DESC)
                    | VHOST_USER_F_PROTOCOL_FEATURES
            }
            fn protocol_features(&self) -> VhostUserProtocolFeatures {
                VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::RESET_DEVICE
            }
            fn reset_device(&mut self) {
                self.pages.clear();
            }
            fn set_event_idx(&mut self, enabled: bool) {
                self.event_idx = enabled;
            }
            fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
                let raw = crate::protocol::ConfigSpace {
                    num_queues: 2,
                    caps: 3,
                    capacity_pages: 0,
                }
                .to_bytes();
                raw.get(offset as usize..(offset + size) as usize)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default()
            }
            fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
                self.mem = mem;
                Ok(())
            }
            fn handle_event(
                &mut self,
                device_event: u16,
                _evset: EventSet,
                vrings: &[VringRwLock],
                _thread_id: usize,
            ) -> io::Result<()> {
                let vring = &vrings[device_event as usize];
                loop {
                    if self.event_idx {
                        vring.disable_notification().unwrap();
                    }
                    let mem = self.mem.memory();
                    // A kick can race a reset: a queue no longer ready has
                    // nothing to serve.
                    let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
                        Ok(chains) => chains.collect(),
                        Err(virtio_queue::Error::QueueNotReady) => return Ok(()),
                        Err(e) => panic!("mini backend: {e}"),
                    };
                    for chain in chains {
                        let head = chain.head_index();
                        let mut r = chain.clone().reader(&mem).unwrap();
                        let mut w = chain.writer(&mem).unwrap();
                        // The status is the last writable byte, wherever that is.
                        let mut sw = w.split_at(w.available_bytes() - 1).unwrap();
                        let mut hdr = [0u8; HEADER_SIZE];
                        r.read_exact(&mut hdr).unwrap();
                        let h = RequestHeader::parse(&hdr).unwrap();
                        let key = (h.pool, h.index);
                        let status = match h.op {
                            Op::Put => {
                                let mut p = vec![0u8; PAGE_SIZE];
                                r.read_exact(&mut p).unwrap();
                                self.pages.insert(key, p);
                                Status::Ok
                            }
                            Op::Get => match self.pages.get(&key) {
                                Some(p) => {
                                    w.write_all(p).unwrap();
                                    if h.exclusive() {
                                        self.pages.remove(&key);
                                    }
                                    Status::Ok
                                }
                                None => Status::NotFound,
                            },
                            _ => Status::Invalid,
                        };
                        sw.write_all(&[status as u8]).unwrap();
                        let used = w.bytes_written() + sw.bytes_written();
                        vring.add_used(head, used as u32).unwrap();
                    }
                    if vring.needs_notification().unwrap() {
                        vring.signal_used_queue().unwrap();
                    }
                    if !self.event_idx || !vring.enable_notification().unwrap() {
                        break;
                    }
                }
                Ok(())
            }
        }

        /// Serves one connection on `path` from a background thread.
        pub fn spawn(path: &Path) {
            let mut listener = Listener::new(path, true).unwrap();
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = Arc::new(Mutex::new(Mini {
                mem: mem.clone(),
                event_idx: false,
                pages: HashMap::new(),
            }));
            std::thread::spawn(move || {
                let mut d = VhostUserDaemon::new("mini".into(), backend, mem).unwrap();
                d.start(&mut listener).unwrap();
                let _ = d.wait();
            });
        }
    }

    fn mini_vmm(event_idx: bool, queues: usize) -> (tempfile::TempDir, Vmm, Vec<Virtqueue>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("mini.sock");
        mini::spawn(&sock);
        let mut vmm = Vmm::connect(
            &sock,
            VmmConfig {
                queues,
                event_idx,
                timeout: Duration::from_secs(5),
                ..VmmConfig::default()
            },
        )
        .unwrap();
        let q = vmm.start().unwrap();
        (dir, vmm, q)
    }

    #[test]
    fn roundtrip_through_a_real_backend() {
        for event_idx in [false, true] {
            let (_dir, mut vmm, mut qs) = mini_vmm(event_idx, 2);
            assert_eq!(vmm.config_space().unwrap()[0..4], *b"TMEM");
            assert_eq!(qs[0].event_idx(), event_idx);
            let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
            // Enough round trips to wrap the 128-entry rings several times.
            for i in 0..600u64 {
                let q = &mut qs[(i % 2) as usize];
                let r = q.put(1, i, &page).unwrap();
                assert_eq!((r.status, r.used_len), (Some(Status::Ok), 1));
                let r = q.get(1, i, true).unwrap();
                assert_eq!((r.status, r.used_len), (Some(Status::Ok), 4097));
                assert_eq!(r.page, page);
                let r = q.get(1, i, false).unwrap();
                assert_eq!((r.status, r.used_len), (Some(Status::NotFound), 1));
            }
        }
    }

    #[test]
    fn pipelined_and_odd_layouts() {
        let (_dir, _vmm, mut qs) = mini_vmm(true, 1);
        let q = &mut qs[0];
        let page = vec![0x5Au8; PAGE_SIZE];
        let mut tokens = Vec::new();
        for i in 0..60u64 {
            let req = GuestRequest::new(header(Op::Put, 0, 0, i, 0), Some(&page));
            let cut = (i as usize * 37) % (HEADER_SIZE + PAGE_SIZE - 1) + 1;
            let layout = Layout {
                readable: Layout::cut(HEADER_SIZE + PAGE_SIZE, &[cut]),
                writable: vec![1],
                indirect: i % 2 == 0,
                gap: 8,
            };
            tokens.push(q.submit(&req.with_layout(layout)).unwrap());
        }
        for t in tokens {
            let c = q.complete().unwrap();
            assert_eq!(c.token, t);
            assert_eq!(c.status(), Some(Status::Ok));
        }
        // GET with the page and status merged into one writable descriptor, split in
        // an indirect table at every 1000th byte.
        let req = GuestRequest::new(header(Op::Get, 0, 0, 5, 0), None).with_layout(Layout {
            readable: vec![HEADER_SIZE as u32],
            writable: Layout::cut(PAGE_SIZE + 1, &[1000, 2000, 3000, 4000, 4096]),
            indirect: true,
            gap: 3,
        });
        let c = q.roundtrip(&req).unwrap();
        assert_eq!(c.used_len, 4097);
        assert_eq!(c.status(), Some(Status::Ok));
        assert_eq!(c.payload(), &page[..]);
    }

    #[test]
    fn submit_op_fast_path() {
        let (_dir, _vmm, mut qs) = mini_vmm(true, 1);
        let q = &mut qs[0];
        q.set_poison(false);
        let page = vec![0x33u8; PAGE_SIZE];
        for indirect in [false, true] {
            let t = q
                .submit_op(&header(Op::Put, 0, 9, 1, 0), Some(&page), indirect)
                .unwrap();
            let c = q.complete().unwrap();
            assert_eq!((c.token, c.used_len, c.status()), (t, 1, Some(Status::Ok)));
            q.submit_op(&header(Op::Get, 0, 9, 1, 0), None, indirect).unwrap();
            let c = q.complete().unwrap();
            assert_eq!((c.used_len, c.status()), (4097, Some(Status::Ok)));
            assert_eq!(c.payload(), &page[..]);
        }
    }

    #[test]
    fn restart_after_reset_reuses_fresh_rings() {
        let (_dir, mut vmm, mut qs) = mini_vmm(true, 1);
        let page = vec![1u8; PAGE_SIZE];
        for i in 0..5 {
            assert_eq!(qs[0].put(0, i, &page).unwrap().status, Some(Status::Ok));
        }
        assert_eq!(vmm.stop().unwrap(), vec![5]);
        vmm.reset_device().unwrap();
        drop(qs);
        let mut qs = vmm.start().unwrap();
        let r = qs[0].get(0, 1, false).unwrap();
        assert_eq!((r.status, r.used_len), (Some(Status::NotFound), 1));
    }

    #[test]
    fn queue_parts_do_not_overlap() {
        for size in [1u16, 2, 128, 256, 1024] {
            let l = QueueLayout::new(GUEST_MEM_BASE, size);
            let n = u64::from(size);
            assert!(l.desc + 16 * n <= l.avail, "desc/avail overlap at {size}");
            assert!(l.avail + 6 + 2 * n <= l.used, "avail/used overlap at {size}");
            assert!(l.used + 6 + 8 * n <= l.slots, "used/slots overlap at {size}");
            assert_eq!(l.avail % 2, 0);
            assert_eq!(l.used % 4, 0);
            assert!(l.end >= l.slots + n * SLOT_STRIDE);
        }
    }

    #[test]
    fn event_idx_arithmetic_wraps() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(u16::MAX, 0, u16::MAX));
        assert!(vring_need_event(5, 10, 0));
        assert!(!vring_need_event(10, 10, 0));
    }

    #[test]
    fn cut_covers_the_stream() {
        assert_eq!(Layout::cut(10, &[]), vec![10]);
        assert_eq!(Layout::cut(10, &[3, 3, 9]), vec![3, 0, 6, 1]);
    }

    #[test]
    fn request_layout_must_match_bytes() {
        let r = GuestRequest::new(header(Op::Put, 0, 1, 2, 0), Some(&[7u8; PAGE_SIZE]));
        let raw = r.to_raw().unwrap();
        assert_eq!(raw.descs.len(), 3);
        assert!(raw.descs[2].writable);
        let bad = r.with_layout(Layout::merged(10, 1));
        assert!(matches!(bad.to_raw(), Err(FrontendError::Layout(_))));
    }

    #[test]
    fn fill_page_repeats_le_value() {
        let p = fill_page(0x0102_0304_0506_0708);
        assert_eq!(p.len(), PAGE_SIZE);
        assert_eq!(&p[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&p[8..16], &p[..8]);
    }
}
