//! Target `device_chain`: descriptor chains, direct and indirect, over a
//! guest-memory image, served by the real [`TmemBackend`] and its queue
//! worker (through `VhostUserBackend::handle_event`, as the vhost-user
//! thread would call it), and judged by an oracle written from
//! docs/protocol.md, sections 4 and 5.
//!
//! The invariant: every chain gets INVALID (or, with no writable byte to
//! carry it, nothing) or the correct answer; nothing panics; and a malformed
//! chain has no effect on the stored pages. After each batch of chains:
//! - every byte of guest memory outside the used ring is what the oracle
//!   says the device writes (a GET page, a status byte) on top of what was
//!   there, so a GET that is not OK leaves its buffer untouched and nothing
//!   else is written;
//! - the used ring holds one entry per chain whose head is inside the table,
//!   in order, with the used length the protocol gives (4097, 1 or 0);
//! - the store holds exactly the model's pages, byte for byte.
//!
//! The oracle sees a chain as virtio-queue walks it (the crate serves what
//! `DescriptorChain` yields, so its walk is restated here: follow `next`
//! within the table up to the table's size, switch once into an indirect
//! table, stop at 4 GiB), then classifies it by the protocol's rules, with
//! its own byte streams and header decoding.
//!
//! Guest memory: three regions, the first two adjacent, then a hole, then a
//! page: `[0, 0x18000)` and `[0x19000, 0x1a000)`. Below 0x1000 are the
//! descriptor table and the rings; 0x1000..0x2000 holds four indirect tables;
//! buffers live above. Descriptor addresses are either offsets in the buffer
//! area (which reaches the hole and past the end), one of the indirect
//! tables, or any 64-bit address not below the buffer area, so that no GET
//! page can land in the rings.
//!
//! Input format ([`crate::input`]): a set-up byte (queue size, EVENT_IDX, and
//! a tight RAM budget, under which PUTs may be REJECTED), then batches until
//! the input ends: commands that write descriptors, headers, pages or bytes,
//! then up to four available heads (one under the tight budget, so each PUT's
//! answer can be read back alone).

use std::{collections::HashMap, sync::Arc, time::Duration};

use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_tmem::{
    config::DeviceKind,
    device::{TmemBackend, Vring},
    protocol::{Status, HEADER_SIZE},
    store::{GetOutcome, GuestId, Page, Store, StoreConfig, PAGE_SIZE},
    telemetry::DeviceTelemetry,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::{
    input::{Reader, Writer},
    pages::{fill_page, make_page, Content},
};

pub const DESC_TABLE: u64 = 0;
pub const AVAIL: u64 = 0x400;
pub const USED: u64 = 0x600;
pub const TABLES: u64 = 0x1000;
pub const TABLE_BYTES: u64 = 0x400;
pub const N_TABLES: u8 = 4;
/// Entries an indirect table may be given (its slot is 1 KiB).
pub const TABLE_ENTRIES: u8 = 64;
pub const DATA: u64 = 0x2000;
/// (start, length) of each region of guest memory.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x8000), (0x19000, 0x1000)];
pub const MEM_END: u64 = 0x1a000;
/// Buffer offsets reach into the hole and a page past the end of memory.
pub const DATA_SPAN: u64 = MEM_END + 0x1000 - DATA;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The protocol's cap on non-empty descriptors in one chain.
const MAX_DESCRIPTORS: usize = 64;
const MAX_BATCHES: usize = 48;
const MAX_CMDS: u8 = 24;
const GUEST: GuestId = GuestId(0);

// ---------------------------------------------------------------------------
// Input

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSpec {
    /// Offset in the buffer area (modulo [`DATA_SPAN`]).
    Data(u32),
    /// The start of indirect table `n` (modulo [`N_TABLES`]).
    Table(u8),
    /// Any address; one below [`DATA`] is moved up by [`DATA`].
    Raw(u64),
}

impl AddrSpec {
    fn read(r: &mut Reader) -> Self {
        match r.choice(3) {
            0 => AddrSpec::Data(r.u32()),
            1 => AddrSpec::Table(r.u8()),
            _ => AddrSpec::Raw(r.u64()),
        }
    }

    fn write(self, w: &mut Writer) {
        match self {
            AddrSpec::Data(off) => w.u8(0).u32(off),
            AddrSpec::Table(n) => w.u8(1).u8(n),
            AddrSpec::Raw(a) => w.u8(2).u64(a),
        };
    }

    pub fn resolve(self) -> u64 {
        match self {
            AddrSpec::Data(off) => DATA + u64::from(off) % DATA_SPAN,
            AddrSpec::Table(n) => table_addr(n),
            AddrSpec::Raw(a) if a < DATA => a + DATA,
            AddrSpec::Raw(a) => a,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenSpec {
    Short(u16),
    /// A whole number of 16-byte descriptors, for indirect tables.
    Entries(u8),
    Raw(u32),
}

impl LenSpec {
    fn read(r: &mut Reader) -> Self {
        match r.choice(3) {
            0 => LenSpec::Short(r.u16()),
            1 => LenSpec::Entries(r.u8()),
            _ => LenSpec::Raw(r.u32()),
        }
    }

    fn write(self, w: &mut Writer) {
        match self {
            LenSpec::Short(n) => w.u8(0).u16(n),
            LenSpec::Entries(n) => w.u8(1).u8(n),
            LenSpec::Raw(n) => w.u8(2).u32(n),
        };
    }

    pub fn resolve(self) -> u32 {
        match self {
            LenSpec::Short(n) => u32::from(n),
            LenSpec::Entries(n) => u32::from(n) * 16,
            LenSpec::Raw(n) => n,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescSpec {
    pub addr: AddrSpec,
    pub len: LenSpec,
    /// Raw flags: NEXT 1, WRITE 2, INDIRECT 4, other bits as given.
    pub flags: u16,
    pub next: u16,
}

impl DescSpec {
    fn read(r: &mut Reader) -> Self {
        DescSpec {
            addr: AddrSpec::read(r),
            len: LenSpec::read(r),
            flags: r.u16(),
            next: r.u16(),
        }
    }

    fn write(self, w: &mut Writer) {
        self.addr.write(w);
        self.len.write(w);
        w.u16(self.flags).u16(self.next);
    }

    fn resolve(self) -> Desc {
        Desc {
            addr: self.addr.resolve(),
            len: self.len.resolve(),
            flags: self.flags,
            next: self.next,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Main descriptor table entry `slot` (modulo the queue size).
    Desc {
        slot: u8,
        desc: DescSpec,
    },
    /// Entry `slot` (modulo [`TABLE_ENTRIES`]) of indirect table `table`.
    IndirectDesc {
        table: u8,
        slot: u8,
        desc: DescSpec,
    },
    /// A request header at buffer offset `at`.
    Header {
        at: u32,
        op: u8,
        flags: u8,
        reserved: u16,
        pool: u8,
        index: u8,
        arg: u64,
    },
    /// A page at buffer offset `at`.
    Page {
        at: u32,
        content: Content,
    },
    Bytes {
        at: u32,
        bytes: Vec<u8>,
    },
}

impl Cmd {
    fn read(r: &mut Reader) -> Self {
        match r.choice(5) {
            0 => Cmd::Desc {
                slot: r.u8(),
                desc: DescSpec::read(r),
            },
            1 => Cmd::IndirectDesc {
                table: r.u8(),
                slot: r.u8(),
                desc: DescSpec::read(r),
            },
            2 => Cmd::Header {
                at: r.u32(),
                op: r.u8(),
                flags: r.u8(),
                reserved: r.u16(),
                pool: r.u8(),
                index: r.u8(),
                arg: r.u64(),
            },
            3 => Cmd::Page {
                at: r.u32(),
                content: Content::read(r),
            },
            _ => {
                let at = r.u32();
                let n = usize::from(r.u8());
                Cmd::Bytes {
                    at,
                    bytes: r.bytes(n).to_vec(),
                }
            }
        }
    }

    fn write(&self, w: &mut Writer) {
        match self {
            Cmd::Desc { slot, desc } => {
                w.u8(0).u8(*slot);
                desc.write(w);
            }
            Cmd::IndirectDesc { table, slot, desc } => {
                w.u8(1).u8(*table).u8(*slot);
                desc.write(w);
            }
            Cmd::Header {
                at,
                op,
                flags,
                reserved,
                pool,
                index,
                arg,
            } => {
                w.u8(2).u32(*at).u8(*op).u8(*flags).u16(*reserved);
                w.u8(*pool).u8(*index).u64(*arg);
            }
            Cmd::Page { at, content } => {
                w.u8(3).u32(*at);
                content.write(w);
            }
            Cmd::Bytes { at, bytes } => {
                let n = u8::try_from(bytes.len()).expect("at most 255 bytes per command");
                w.u8(4).u32(*at).u8(n).bytes(bytes);
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub cmds: Vec<Cmd>,
    /// Descriptor indices made available, in order (at most 4).
    pub heads: Vec<u8>,
    pub used_event: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// 1..=64.
    pub queue_size: u16,
    pub event_idx: bool,
    /// 0: a roomy store. 1..=3: a RAM budget of 0, 16 KiB or 64 KiB over the
    /// empty store's own use.
    pub tight: u8,
    pub batches: Vec<Batch>,
}

impl Input {
    pub fn read(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let setup = r.u8();
        let mut batches = Vec::new();
        while !r.is_empty() && batches.len() < MAX_BATCHES {
            let n = r.u8() % (MAX_CMDS + 1);
            let cmds = (0..n).map(|_| Cmd::read(&mut r)).collect();
            let heads = (0..r.u8() % 5).map(|_| r.u8()).collect();
            batches.push(Batch {
                cmds,
                heads,
                used_event: r.u16(),
            });
        }
        Input {
            queue_size: 1 << ((setup & 7) % 7),
            event_idx: setup & 8 != 0,
            tight: (setup >> 4) & 3,
            batches,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let log2 = self.queue_size.trailing_zeros() as u8;
        assert!(self.queue_size.is_power_of_two() && log2 < 7);
        w.u8(log2 | u8::from(self.event_idx) << 3 | (self.tight & 3) << 4);
        for b in &self.batches {
            w.u8(u8::try_from(b.cmds.len()).expect("command count"));
            for c in &b.cmds {
                c.write(&mut w);
            }
            w.u8(u8::try_from(b.heads.len()).expect("head count"));
            for &h in &b.heads {
                w.u8(h);
            }
            w.u16(b.used_event);
        }
        w.data
    }
}

pub fn table_addr(n: u8) -> u64 {
    TABLES + u64::from(n % N_TABLES) * TABLE_BYTES
}

// ---------------------------------------------------------------------------
// The oracle

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        let le = |r: std::ops::Range<usize>| b[r].iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x));
        Desc {
            addr: le(0..8),
            len: le(8..12) as u32,
            flags: le(12..14) as u16,
            next: le(14..16) as u16,
        }
    }

    fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }
}

/// Whether every byte of `[addr, addr + len)` is guest memory.
pub fn in_memory(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    // The first two regions are adjacent: one range.
    let ranges = [(0u64, 0x18000u64), (0x19000, 0x1a000)];
    ranges.iter().any(|&(lo, hi)| addr >= lo && end <= hi)
}

/// A flat copy of guest memory (the hole reads as zero and is never written).
pub struct Shadow(pub Vec<u8>);

impl Shadow {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        in_memory(addr, len as u64).then(|| &self.0[addr as usize..addr as usize + len])
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        assert!(
            in_memory(addr, bytes.len() as u64),
            "oracle writes outside memory"
        );
        self.0[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn desc(&self, addr: u64) -> Option<Desc> {
        self.read(addr, 16).map(Desc::from_bytes)
    }
}

/// A chain as the device sees it.
#[derive(Debug, Default)]
pub struct Walk {
    pub descs: Vec<Desc>,
    /// The last descriptor yielded still said "more follows": the chain broke off.
    pub broke_off: bool,
    /// A descriptor of the descriptor table with INDIRECT and NEXT both set was met.
    pub indirect_with_next: bool,
    /// The walk stopped because the chain passed 4 GiB.
    pub past_4g: bool,
}

/// virtio-queue's walk of the chain at `head`: along `next` links, at most
/// as many descriptors as the table has, switching once into an indirect
/// table (a whole number of descriptors; an indirect one in it ends the
/// walk), until the bytes yielded would pass `u32::MAX`. It stops at an
/// INDIRECT|NEXT descriptor of the descriptor table, which the device must
/// not serve at all.
pub fn walk(mem: &Shadow, queue_size: u16, head: u16) -> Walk {
    let mut w = Walk::default();
    let (mut table, mut size, mut ttl, mut index) = (DESC_TABLE, queue_size, queue_size, head);
    let mut in_indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && index < size {
        let Some(d) = table.checked_add(u64::from(index) * 16).and_then(|a| mem.desc(a)) else {
            break;
        };
        if d.flags & F_INDIRECT != 0 {
            // Inside an indirect table it breaks the chain off, NEXT or not.
            if in_indirect {
                break;
            }
            if d.flags & F_NEXT != 0 {
                w.indirect_with_next = true;
                break;
            }
            let entries = d.len / 16;
            if d.len % 16 != 0 || entries > u32::from(u16::MAX) {
                break;
            }
            (table, size, ttl, index) = (d.addr, entries as u16, entries as u16, 0);
            in_indirect = true;
            continue;
        }
        let Some(total) = bytes.checked_add(d.len) else {
            w.past_4g = true;
            break;
        };
        bytes = total;
        w.broke_off = d.flags & F_NEXT != 0;
        if w.broke_off {
            index = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        w.descs.push(d);
    }
    w
}

/// Whether the links of the main table from `head` (bytes not counted) reach a
/// descriptor with INDIRECT and NEXT set.
fn links_reach_indirect_with_next(mem: &Shadow, queue_size: u16, head: u16) -> bool {
    let mut index = head;
    for _ in 0..queue_size {
        if index >= queue_size {
            return false;
        }
        let Some(d) = mem.desc(DESC_TABLE + u64::from(index) * 16) else {
            return false;
        };
        if d.flags & F_INDIRECT != 0 {
            return d.flags & F_NEXT != 0;
        }
        if d.flags & F_NEXT == 0 {
            return false;
        }
        index = d.next;
    }
    false
}

/// A request the protocol says must be carried out.
#[derive(Debug)]
pub struct Valid {
    pub op: u8,
    pub exclusive: bool,
    pub pool: u32,
    pub index: u64,
    pub arg: u64,
    /// PUT's page.
    pub page: Option<Box<Page>>,
    /// The non-empty writable descriptors, in order (GET page, then status).
    pub writable: Vec<Desc>,
    pub status: u64,
}

#[derive(Debug)]
pub enum Verdict {
    /// Malformed: INVALID at this address, or nothing at all when `None`.
    Invalid(Option<u64>),
    /// INDIRECT and NEXT together: used length 0, nothing written.
    Silent,
    /// Malformed two ways whose answers differ (past 4 GiB, and INDIRECT|NEXT
    /// further along the links): either answer is right.
    Either(Option<u64>),
    Valid(Valid),
}

/// What docs/protocol.md (sections 4 and 5) says of the chain at `head`.
pub fn judge(mem: &Shadow, queue_size: u16, head: u16) -> Verdict {
    let w = walk(mem, queue_size, head);
    if w.indirect_with_next {
        return Verdict::Silent;
    }
    let nonempty: Vec<Desc> = w.descs.iter().copied().filter(|d| d.len > 0).collect();
    // The status is the chain's last writable byte, if it is guest memory.
    let status = nonempty
        .iter()
        .rev()
        .find(|d| d.writable())
        .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
        .filter(|&a| in_memory(a, 1));
    if w.past_4g && links_reach_indirect_with_next(mem, queue_size, head) {
        return Verdict::Either(status);
    }
    let mut malformed = w.broke_off || nonempty.len() > MAX_DESCRIPTORS;
    let mut seen_writable = false;
    for d in &nonempty {
        if d.writable() {
            seen_writable = true;
        } else if seen_writable {
            malformed = true;
        }
        if !in_memory(d.addr, u64::from(d.len)) {
            malformed = true;
        }
    }
    let Some(status) = status else {
        return Verdict::Invalid(None);
    };
    let invalid = Verdict::Invalid(Some(status));
    if malformed {
        return invalid;
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut writable_len = 0u64;
    for d in nonempty {
        if d.writable() {
            writable_len += u64::from(d.len);
            writable.push(d);
        } else {
            let bytes = mem.read(d.addr, d.len as usize).expect("checked in memory");
            readable.extend_from_slice(bytes);
        }
    }
    if readable.len() < HEADER_SIZE {
        return invalid;
    }
    let h = &readable[..HEADER_SIZE];
    let (op, flags, reserved) = (h[0], h[1], u16::from_le_bytes([h[2], h[3]]));
    let allowed_flags = if op == 2 { 1 } else { 0 };
    if !(1..=5).contains(&op) || flags & !allowed_flags != 0 || reserved != 0 {
        return invalid;
    }
    let want_readable = HEADER_SIZE + if op == 1 { PAGE_SIZE } else { 0 };
    let want_writable = if op == 2 { PAGE_SIZE as u64 } else { 0 } + 1;
    if readable.len() != want_readable || writable_len != want_writable {
        return invalid;
    }
    let page = (op == 1).then(|| {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        p.copy_from_slice(&readable[HEADER_SIZE..]);
        p
    });
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    Verdict::Valid(Valid {
        op,
        exclusive: flags & 1 != 0,
        pool: u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")),
        index: le64(&h[8..16]),
        arg: le64(&h[16..24]),
        page,
        writable,
        status,
    })
}

// ---------------------------------------------------------------------------
// The harness

/// Verdicts by kind, for the tests (to see that inputs reach every answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub rejected_puts: u32,
    pub invalid: u32,
    pub silent: u32,
    pub valid: [u32; 6],
}

struct Harness {
    mem: GuestMemoryMmap,
    backend: TmemBackend,
    vring: Vring,
    store: Arc<Store>,
    queue_size: u16,
    tight: bool,
    next_avail: u16,
    used_idx: u16,
    model: HashMap<(u32, u64), Box<Page>>,
    shadow: Shadow,
    tally: Tally,
}

impl Harness {
    fn new(input: &Input) -> Self {
        let mem = GuestMemoryMmap::from_ranges(
            &REGIONS
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l))
                .collect::<Vec<_>>(),
        )
        .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let store = Arc::new(Store::new(StoreConfig::default()).expect("store"));
        if input.tight > 0 {
            let extra = [0u64, 16 << 10, 64 << 10][usize::from(input.tight - 1)];
            store
                .set_mem_limit(store.mem_used() + extra)
                .expect("limit on an empty store");
        }
        let telemetry = Arc::new(DeviceTelemetry::new(GUEST.0, "fuzz.sock".into(), 1));
        let backend = TmemBackend::new(
            telemetry,
            store.clone(),
            atomic.clone(),
            DeviceKind::Tmem,
            0,
            Duration::ZERO,
        );
        let vring = Vring::new(atomic, 1024).expect("vring");
        vring.set_queue_size(input.queue_size);
        vring
            .set_queue_info(DESC_TABLE, AVAIL, USED)
            .expect("ring addresses");
        vring.set_queue_event_idx(input.event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Harness {
            mem,
            backend,
            vring,
            store,
            queue_size: input.queue_size,
            tight: input.tight > 0,
            next_avail: 0,
            used_idx: 0,
            model: HashMap::new(),
            shadow: Shadow(vec![0u8; MEM_END as usize]),
            tally: Tally::default(),
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        // Buffers may run into the hole or off the end: write what fits.
        for (i, chunk) in bytes.chunks(64).enumerate() {
            let _ = self.mem.write_slice(chunk, GuestAddress(addr + 64 * i as u64));
        }
    }

    fn apply(&self, cmd: &Cmd) {
        let data = |at: u32| DATA + u64::from(at) % DATA_SPAN;
        match cmd {
            Cmd::Desc { slot, desc } => {
                let slot = u64::from(u16::from(*slot) % self.queue_size);
                self.write(DESC_TABLE + 16 * slot, &desc.resolve().to_bytes());
            }
            Cmd::IndirectDesc { table, slot, desc } => {
                let at = table_addr(*table) + 16 * u64::from(slot % TABLE_ENTRIES);
                self.write(at, &desc.resolve().to_bytes());
            }
            Cmd::Header {
                at,
                op,
                flags,
                reserved,
                pool,
                index,
                arg,
            } => {
                let mut h = [0u8; HEADER_SIZE];
                h[0] = *op;
                h[1] = *flags;
                h[2..4].copy_from_slice(&reserved.to_le_bytes());
                h[4..8].copy_from_slice(&u32::from(*pool).to_le_bytes());
                h[8..16].copy_from_slice(&u64::from(*index).to_le_bytes());
                h[16..24].copy_from_slice(&arg.to_le_bytes());
                self.write(data(*at), &h);
            }
            Cmd::Page { at, content } => self.write(data(*at), &make_page(*content)[..]),
            Cmd::Bytes { at, bytes } => self.write(data(*at), bytes),
        }
    }

    fn snapshot(&mut self) {
        for &(start, len) in &REGIONS {
            let s = start as usize;
            self.mem
                .read_slice(&mut self.shadow.0[s..s + len], GuestAddress(start))
                .expect("read a region");
        }
    }

    fn used_ring_len(&self) -> u64 {
        6 + 8 * u64::from(self.queue_size)
    }

    fn batch(&mut self, n: usize, b: &Batch) {
        for cmd in &b.cmds {
            self.apply(cmd);
        }
        let most = if self.tight { 1 } else { 4 }.min(usize::from(self.queue_size));
        let heads: Vec<u16> = b.heads.iter().take(most).map(|&h| u16::from(h)).collect();
        if heads.is_empty() {
            return;
        }
        for (j, &head) in heads.iter().enumerate() {
            let slot = self.next_avail.wrapping_add(j as u16) % self.queue_size;
            self.write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        }
        self.write(
            AVAIL + 4 + 2 * u64::from(self.queue_size),
            &b.used_event.to_le_bytes(),
        );
        self.next_avail = self.next_avail.wrapping_add(heads.len() as u16);
        self.write(AVAIL + 2, &self.next_avail.to_le_bytes());
        self.snapshot();

        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .expect("handle_event");

        let used_now: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let in_table = heads.iter().filter(|&&h| h < self.queue_size).count() as u16;
        assert_eq!(
            used_now,
            self.used_idx.wrapping_add(in_table),
            "batch {n}: used index; heads {heads:?}, queue size {}",
            self.queue_size
        );
        for &head in &heads {
            let used = (head < self.queue_size).then(|| {
                let slot = self.used_idx % self.queue_size;
                self.used_idx = self.used_idx.wrapping_add(1);
                let at = USED + 4 + 8 * u64::from(slot);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
                assert_eq!(id, u32::from(head), "batch {n}: used entries out of order");
                len
            });
            let verdict = judge(&self.shadow, self.queue_size, head);
            self.expect(n, head, verdict, used);
        }
        self.compare_memory(n);
        self.check_store(n);
    }

    /// Checks one chain's used length against its verdict, and applies what the
    /// device must have done to the shadow and the model.
    fn expect(&mut self, n: usize, head: u16, verdict: Verdict, used: Option<u32>) {
        let ctx = || format!("batch {n}, chain at {head}");
        let Some(used) = used else {
            assert!(
                matches!(verdict, Verdict::Invalid(None) | Verdict::Silent),
                "{}: head outside the table, yet the oracle says {verdict:?}",
                ctx()
            );
            return;
        };
        match verdict {
            Verdict::Silent | Verdict::Invalid(None) => {
                self.tally.silent += 1;
                assert_eq!(used, 0, "{}: {verdict:?}", ctx());
            }
            Verdict::Invalid(Some(status)) => {
                self.tally.invalid += 1;
                assert_eq!(used, 1, "{}: malformed, INVALID at {status:#x}", ctx());
                self.shadow.write(status, &[Status::Invalid as u8]);
            }
            Verdict::Either(status) => match (used, status) {
                (0, _) => self.tally.silent += 1,
                (1, Some(status)) => {
                    self.tally.invalid += 1;
                    self.shadow.write(status, &[Status::Invalid as u8]);
                }
                _ => panic!("{}: used length {used} for a rejected chain ({status:?})", ctx()),
            },
            Verdict::Valid(req) => {
                self.tally.valid[usize::from(req.op)] += 1;
                let (status, page) = self.serve(&req);
                let want_used = if page.is_some() { PAGE_SIZE as u32 + 1 } else { 1 };
                assert_eq!(used, want_used, "{}: {req:?} answered {status:?}", ctx());
                if let Some(page) = page {
                    let mut left = &page[..];
                    for d in &req.writable {
                        let n = (d.len as usize).min(left.len());
                        self.shadow.write(d.addr, &left[..n]);
                        left = &left[n..];
                    }
                }
                self.shadow.write(req.status, &[status as u8]);
            }
        }
    }

    /// The model's answer to a valid request: its status, and a GET's page.
    fn serve(&mut self, req: &Valid) -> (Status, Option<Box<Page>>) {
        let key = (req.pool, req.index);
        let mut rejected = 0;
        let mut store = |model: &mut HashMap<_, _>, page: Box<Page>, tight: bool, answered: u8| {
            // Under the tight budget the store may refuse a page; its answer
            // (this chain ran alone) says which, and both are right.
            if tight && answered == Status::Rejected as u8 {
                rejected += 1;
                model.remove(&key);
                Status::Rejected
            } else {
                model.insert(key, page);
                Status::Ok
            }
        };
        let answered = self.mem.read_obj::<u8>(GuestAddress(req.status)).unwrap_or(0xff);
        let out = match req.op {
            1 => {
                let page = req.page.clone().expect("a PUT has a page");
                (store(&mut self.model, page, self.tight, answered), None)
            }
            2 => match self.model.get(&key) {
                Some(page) => {
                    let page = page.clone();
                    if req.exclusive {
                        self.model.remove(&key);
                    }
                    (Status::Ok, Some(page))
                }
                None => (Status::NotFound, None),
            },
            3 => {
                self.model.remove(&key);
                (Status::Ok, None)
            }
            4 => {
                self.model.retain(|k, _| k.0 != req.pool);
                (Status::Ok, None)
            }
            5 => (
                store(&mut self.model, fill_page(req.arg), self.tight, answered),
                None,
            ),
            op => unreachable!("op {op} judged valid"),
        };
        self.tally.rejected_puts += rejected;
        out
    }

    fn compare_memory(&self, n: usize) {
        let used = USED..USED + self.used_ring_len();
        let mut real = vec![0u8; MEM_END as usize];
        for &(start, len) in &REGIONS {
            let s = start as usize;
            self.mem
                .read_slice(&mut real[s..s + len], GuestAddress(start))
                .expect("read a region");
        }
        let (lo, hi) = (used.start as usize, used.end as usize);
        // Slices compare with memcmp, which the coverage instrumentation
        // leaves alone; a byte loop here would be most of a run's time.
        if real[..lo] == self.shadow.0[..lo] && real[hi..] == self.shadow.0[hi..] {
            return;
        }
        if let Some(at) =
            (0..MEM_END).find(|&a| !used.contains(&a) && real[a as usize] != self.shadow.0[a as usize])
        {
            panic!(
                "batch {n}: guest memory at {at:#x} is {:#04x}, the protocol says {:#04x}",
                real[at as usize], self.shadow.0[at as usize]
            );
        }
    }

    fn check_store(&self, n: usize) {
        let mut out = Box::new([0u8; PAGE_SIZE]);
        for (&(pool, index), page) in &self.model {
            let r = self.store.get(GUEST, pool, index, &mut out, false);
            assert!(
                matches!(r, Ok(GetOutcome::Found)),
                "batch {n}: page ({pool}, {index}) answered OK is gone: {r:?}"
            );
            assert!(out[..] == page[..], "batch {n}: page ({pool}, {index}) changed");
        }
        let stored = self.store.stats().total.stored_pages;
        assert_eq!(
            stored,
            self.model.len() as u64,
            "batch {n}: the store holds pages no request put there"
        );
    }
}

/// Runs one input; panics when an invariant breaks.
pub fn run(data: &[u8]) -> Tally {
    run_input(&Input::read(data))
}

pub fn run_input(input: &Input) -> Tally {
    let mut h = Harness::new(input);
    for (n, b) in input.batches.iter().enumerate() {
        h.batch(n, b);
    }
    h.backend.close();
    h.tally
}

// ---------------------------------------------------------------------------
// Seeds

/// Builders for well-formed requests, for the seed corpus and the tests.
pub mod seeds {
    use super::*;

    pub const NEXT: u16 = F_NEXT;
    pub const WRITE: u16 = F_WRITE;
    pub const INDIRECT: u16 = F_INDIRECT;

    pub fn data_desc(off: u32, len: u16, flags: u16, next: u16) -> DescSpec {
        DescSpec {
            addr: AddrSpec::Data(off),
            len: LenSpec::Short(len),
            flags,
            next,
        }
    }

    pub fn header(at: u32, op: u8, flags: u8, pool: u8, index: u8, arg: u64) -> Cmd {
        Cmd::Header {
            at,
            op,
            flags,
            reserved: 0,
            pool,
            index,
            arg,
        }
    }

    /// A request in the main table from slot `first` on: header at buffer
    /// offset `at`, a PUT page right after it, a GET page at `at + 0x2000`,
    /// and the status after that; each part its own descriptor.
    pub fn direct(first: u8, at: u32, op: u8, flags: u8, pool: u8, index: u8, content: Content) -> Vec<Cmd> {
        let mut parts = vec![(at, HEADER_SIZE as u16, 0)];
        let mut cmds = vec![header(at, op, flags, pool, index, 0x0101_0101_0101_0101)];
        if op == 1 {
            parts.push((at + HEADER_SIZE as u32, PAGE_SIZE as u16, 0));
            cmds.push(Cmd::Page {
                at: at + HEADER_SIZE as u32,
                content,
            });
        }
        if op == 2 {
            parts.push((at + 0x2000, PAGE_SIZE as u16, WRITE));
        }
        parts.push((at + 0x3000, 1, WRITE));
        let last = parts.len() - 1;
        for (i, (off, len, flags)) in parts.into_iter().enumerate() {
            let slot = first + i as u8;
            let next_flag = if i < last { NEXT } else { 0 };
            cmds.push(Cmd::Desc {
                slot,
                desc: data_desc(off, len, flags | next_flag, u16::from(slot) + 1),
            });
        }
        cmds
    }

    /// The same request through indirect table `table`, its head at main slot `slot`.
    pub fn indirect(slot: u8, table: u8, at: u32, op: u8, flags: u8, pool: u8, index: u8) -> Vec<Cmd> {
        let mut cmds = direct(0, at, op, flags, pool, index, Content::Text(index));
        let mut entries = 0;
        for c in &mut cmds {
            if let Cmd::Desc { slot: s, desc } = c {
                *c = Cmd::IndirectDesc {
                    table,
                    slot: *s,
                    desc: *desc,
                };
                entries += 1;
            }
        }
        cmds.push(Cmd::Desc {
            slot,
            desc: DescSpec {
                addr: AddrSpec::Table(table),
                len: LenSpec::Entries(entries),
                flags: INDIRECT,
                next: 0,
            },
        });
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::{seeds::*, *};

    fn batch(cmds: Vec<Cmd>, heads: Vec<u8>) -> Batch {
        Batch {
            cmds,
            heads,
            used_event: 0,
        }
    }

    fn input(batches: Vec<Batch>) -> Input {
        Input {
            queue_size: 16,
            event_idx: false,
            tight: 0,
            batches,
        }
    }

    #[test]
    fn memory_layout_matches_the_oracle() {
        let mem = GuestMemoryMmap::<()>::from_ranges(
            &REGIONS
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        use vm_memory::{GuestMemory, Permissions};
        for (addr, len) in [
            (0xfff0u64, 0x20u64),
            (0x17fff, 1),
            (0x17fff, 2),
            (0x18000, 1),
            (0x19000, 0x1000),
            (0x19fff, 2),
            (u64::MAX - 3, 24),
        ] {
            assert_eq!(
                mem.check_range(GuestAddress(addr), len as usize, Permissions::Write),
                in_memory(addr, len),
                "{addr:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn input_round_trips() {
        let i = Input {
            queue_size: 8,
            event_idx: true,
            tight: 2,
            batches: vec![batch(direct(0, 0, 1, 0, 1, 2, Content::Random(3)), vec![0, 9])],
        };
        assert_eq!(Input::read(&i.to_bytes()), i);
    }

    #[test]
    fn well_formed_requests_are_served() {
        let t = run_input(&input(vec![
            batch(direct(0, 0, 1, 0, 1, 2, Content::Random(3)), vec![0]),
            batch(direct(4, 0x100, 5, 0, 1, 3, Content::Zero), vec![4]),
            batch(direct(0, 0x200, 2, 0, 1, 2, Content::Zero), vec![0]),
            batch(direct(4, 0x300, 2, 1, 1, 3, Content::Zero), vec![4, 4]),
            batch(direct(8, 0x400, 3, 0, 1, 2, Content::Zero), vec![8, 0]),
            batch(direct(0, 0x500, 4, 0, 1, 0, Content::Zero), vec![0]),
        ]));
        assert_eq!(t.valid, [0, 1, 4, 1, 1, 1], "{t:?}");
        assert_eq!(t.invalid + t.silent, 0, "{t:?}");
    }

    #[test]
    fn indirect_requests_are_served() {
        let t = run_input(&input(vec![
            batch(indirect(3, 0, 0, 1, 0, 7, 7), vec![3]),
            batch(indirect(5, 1, 0x4000, 2, 0, 7, 7), vec![5]),
        ]));
        assert_eq!(t.valid, [0, 1, 1, 0, 0, 0], "{t:?}");
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let mut bad_op = direct(0, 0, 3, 0, 1, 2, Content::Zero);
        bad_op[0] = header(0, 9, 0, 1, 2, 0);
        let mut short = direct(4, 0x100, 1, 0, 1, 2, Content::Zero);
        if let Cmd::Desc { desc, .. } = &mut short[3] {
            desc.len = LenSpec::Short(4095);
        }
        let mut with_next = indirect(8, 2, 0x200, 3, 0, 1, 1);
        if let Some(Cmd::Desc { desc, .. }) = with_next.last_mut() {
            desc.flags |= NEXT;
        }
        let t = run_input(&input(vec![
            batch(bad_op, vec![0]),
            batch(short, vec![4]),
            batch(with_next, vec![8]),
            batch(vec![], vec![200]),
        ]));
        assert_eq!(t.invalid, 2, "{t:?}");
        assert_eq!(t.silent, 1, "{t:?}");
    }

    /// docs/protocol.md, section 5: INDIRECT|NEXT in the descriptor table is
    /// answered with nothing; inside an indirect table an INDIRECT
    /// descriptor, NEXT or not, breaks the chain off, which is INVALID at the
    /// last writable byte before it.
    #[test]
    fn indirect_inside_an_indirect_table_breaks_the_chain_off() {
        for flags in [INDIRECT, INDIRECT | NEXT] {
            let cmds = vec![
                header(0, 3, 0, 0, 0, 0),
                Cmd::IndirectDesc {
                    table: 0,
                    slot: 0,
                    desc: data_desc(0, 24, NEXT, 1),
                },
                Cmd::IndirectDesc {
                    table: 0,
                    slot: 1,
                    desc: data_desc(0x100, 1, WRITE | NEXT, 2),
                },
                Cmd::IndirectDesc {
                    table: 0,
                    slot: 2,
                    desc: DescSpec {
                        addr: AddrSpec::Table(1),
                        len: LenSpec::Entries(1),
                        flags,
                        next: 0,
                    },
                },
                Cmd::Desc {
                    slot: 0,
                    desc: DescSpec {
                        addr: AddrSpec::Table(0),
                        len: LenSpec::Entries(3),
                        flags: INDIRECT,
                        next: 0,
                    },
                },
            ];
            let t = run_input(&input(vec![batch(cmds, vec![0])]));
            assert_eq!((t.invalid, t.silent), (1, 0), "flags {flags:#x}: {t:?}");
        }
    }

    #[test]
    fn tight_budget_puts_may_be_rejected() {
        let mut batches = Vec::new();
        for i in 0..24u8 {
            batches.push(batch(
                direct(0, u32::from(i) * 0x40, 1, 0, 0, i, Content::Random(i)),
                vec![0],
            ));
        }
        let t = run_input(&Input {
            tight: 1,
            ..input(batches)
        });
        assert_eq!(t.valid[1], 24);
        assert!(t.rejected_puts > 0, "{t:?}");
    }
}
