//! Turning one descriptor chain into a checked request, without touching the
//! store and without allocating.
//!
//! The protocol lets the driver lay a request out over descriptors however it
//! likes, so the chain is seen as two byte streams: everything device-readable
//! (header, then the PUT page) and everything device-writable (the GET page,
//! then the status byte). The status byte is the last writable byte of the
//! chain; it is located first, so that a request that is wrong in any other
//! way can still be answered INVALID.
//!
//! virtio-queue's `Reader`/`Writer` give the same byte-stream view, but build
//! a `VecDeque` per chain and a `Vec` per read; the hot path here keeps the
//! segments in fixed arrays on the stack instead.
//!
//! Everything is checked (layout, lengths, guest addresses, header) before
//! [`parse`] returns, so the caller acts on a request only once it is known to
//! be whole.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::protocol::{HeaderError, Op, RequestHeader, HEADER_SIZE, PAGE_SIZE};

/// Most non-empty descriptors we accept in one chain. A well-formed request is at most
/// header + page + status, and a page is contiguous in guest-physical memory,
/// so a driver needs 3 or 4; 64 leaves room for odd layouts while bounding the
/// work and stack (1 KiB per direction) a guest can make one request cost.
pub const MAX_DESCRIPTORS: usize = 64;

#[derive(Debug, Error)]
pub enum ChainError {
    #[error("chain has more than {MAX_DESCRIPTORS} non-empty descriptors")]
    TooManyDescriptors,
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} of {len} bytes is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    #[error("chain carries more bytes than fit in usize")]
    TooLong,
    #[error("chain breaks off: a next link loops, leaves the table, or points at an unreadable descriptor")]
    Truncated,
    #[error("chain has no device-writable byte for the status")]
    NoStatus,
    #[error("header needs {HEADER_SIZE} device-readable bytes, chain has {0}")]
    ShortHeader(usize),
    #[error("invalid request header")]
    Header(#[source] HeaderError),
    #[error("{0:?} page is device-readable, it must be device-writable")]
    PageNotWritable(Op),
    #[error("{0:?} page is device-writable, it must be device-readable")]
    PageNotReadable(Op),
    #[error("{op:?} needs {expected} device-readable bytes, chain has {got}")]
    ReadableLength { op: Op, expected: usize, got: usize },
    #[error("{op:?} needs {expected} device-writable bytes (status included), chain has {got}")]
    WritableLength { op: Op, expected: usize, got: usize },
    #[error("cannot read the request header from guest memory")]
    Memory(#[source] GuestMemoryError),
    #[error("descriptor {0} has both INDIRECT and NEXT set")]
    IndirectWithNext(u16),
}

/// A chain that could not be accepted, and where (if anywhere) to write the
/// INVALID status for it.
#[derive(Debug)]
pub struct Rejection {
    pub error: ChainError,
    pub status: Option<GuestAddress>,
}

#[derive(Clone, Copy, Default, Debug)]
struct Segment {
    addr: u64,
    len: u32,
}

/// One direction of a chain, as a byte stream over guest memory.
pub struct Stream {
    segments: [Segment; MAX_DESCRIPTORS],
    count: usize,
    len: usize,
}

impl Stream {
    fn new() -> Self {
        Stream {
            segments: [Segment::default(); MAX_DESCRIPTORS],
            count: 0,
            len: 0,
        }
    }

    /// Total bytes in the stream.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(guest address, offset in buf, length)` for each piece of
    /// `[offset, offset + buf_len)` of the stream.
    fn pieces(
        &self,
        offset: usize,
        buf_len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        let mut skip = offset;
        let mut done = 0;
        for seg in &self.segments[..self.count] {
            if done == buf_len {
                break;
            }
            let seg_len = seg.len as usize;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(buf_len - done);
            // Cannot overflow: the whole segment was range-checked in `parse`.
            f(GuestAddress(seg.addr + skip as u64), done, n)?;
            done += n;
            skip = 0;
        }
        if done == buf_len {
            Ok(())
        } else {
            Err(GuestMemoryError::PartialBuffer {
                expected: buf_len,
                completed: done,
            })
        }
    }

    /// Copies `buf.len()` bytes starting at `offset` of the stream into `buf`.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.pieces(offset, buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies `buf` into the stream starting at `offset`.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: usize,
        buf: &[u8],
    ) -> Result<(), GuestMemoryError> {
        self.pieces(offset, buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }

    fn push(&mut self, addr: u64, len: u32) -> Result<(), ChainError> {
        let slot = self
            .segments
            .get_mut(self.count)
            .ok_or(ChainError::TooManyDescriptors)?;
        *slot = Segment { addr, len };
        self.count += 1;
        self.len = self.len.checked_add(len as usize).ok_or(ChainError::TooLong)?;
        Ok(())
    }
}

/// A request whose chain has been fully validated.
pub struct Request {
    pub header: RequestHeader,
    /// Header, then for PUT the page.
    pub readable: Stream,
    /// For GET the page, then the status byte.
    pub writable: Stream,
    /// The last writable byte of the chain.
    pub status: GuestAddress,
}

impl Request {
    /// Copies the PUT page out of guest memory.
    pub fn read_page<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), GuestMemoryError> {
        self.readable.read_at(mem, HEADER_SIZE, page)
    }

    /// Copies a GET result into the chain's writable page.
    pub fn write_page<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        page: &[u8; PAGE_SIZE],
    ) -> Result<(), GuestMemoryError> {
        self.writable.write_at(mem, 0, page)
    }
}

/// Where a split ring's descriptor table is, for walking a chain's links.
#[derive(Clone, Copy, Debug)]
pub struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

/// The chain starting at `head` has a descriptor with both INDIRECT and NEXT
/// set, which virtio 1.x forbids (2.7.5.3.1). virtio-queue's walk follows the
/// indirect table and silently drops the rest, so the chain it yields is not
/// the one the driver built, and its status byte is not where the driver
/// will look: such a chain is answered with nothing at all. The walk follows
/// the same links virtio-queue does, so it costs at most as many reads.
pub fn indirect_with_next<M: GuestMemory + ?Sized>(
    mem: &M,
    table: DescTable,
    head: u16,
) -> Option<Rejection> {
    let mut index = head;
    for _ in 0..table.size {
        if index >= table.size {
            return None;
        }
        let addr = table.addr.checked_add(u64::from(index) * 16)?;
        let desc: Descriptor = mem.read_obj(addr).ok()?;
        let has_next = desc.has_next();
        if desc.refers_to_indirect_table() {
            return has_next.then_some(Rejection {
                error: ChainError::IndirectWithNext(index),
                status: None,
            });
        }
        if !has_next {
            return None;
        }
        index = desc.next();
    }
    None
}

/// A chain checked whole as two byte streams, not yet read as a request of
/// either device kind.
pub struct Split {
    pub readable: Stream,
    pub writable: Stream,
    /// The last writable byte of the chain.
    pub status: GuestAddress,
}

/// Checks a chain's layout (descriptor count, directions, guest addresses,
/// links) and finds its status byte. Reads the descriptors, writes nothing.
/// Shared by both device kinds: what the bytes mean is theirs to check.
pub fn split<C, M>(chain: DescriptorChain<C>, mem: &M) -> Result<Split, Rejection>
where
    C: Deref,
    C::Target: GuestMemory,
    M: GuestMemory + ?Sized,
{
    let mut readable = Stream::new();
    let mut writable = Stream::new();
    let mut first_error = None;
    // The last non-empty writable descriptor: its last byte is the status.
    let mut last_writable: Option<Segment> = None;

    // The iterator stops by itself on a loop (its TTL is the table size), on a
    // `next` beyond the table and on unreadable descriptors, so this walk is
    // bounded even past the cap, where segments are no longer stored.
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        let (addr, len) = (desc.addr().0, desc.len());
        if len == 0 {
            continue;
        }
        let step = if readable.count + writable.count >= MAX_DESCRIPTORS {
            if desc.is_write_only() {
                last_writable = Some(Segment { addr, len });
            }
            Err(ChainError::TooManyDescriptors)
        } else if desc.is_write_only() {
            last_writable = Some(Segment { addr, len });
            check_range(mem, addr, len, Permissions::Write).and_then(|()| writable.push(addr, len))
        } else if last_writable.is_some() {
            Err(ChainError::ReadableAfterWritable)
        } else {
            check_range(mem, addr, len, Permissions::Read).and_then(|()| readable.push(addr, len))
        };
        if let Err(e) = step {
            first_error.get_or_insert(e);
        }
    }

    let status = last_writable
        .and_then(|seg| seg.addr.checked_add(u64::from(seg.len) - 1))
        .map(GuestAddress)
        .filter(|&addr| mem.check_range(addr, 1, Permissions::Write));
    let reject = |error| Rejection { error, status };

    // The iterator ends quietly when it runs out of TTL or meets a bad link;
    // the last descriptor it gave still saying "more follows" is how we tell.
    if last_has_next {
        first_error.get_or_insert(ChainError::Truncated);
    }
    if let Some(error) = first_error {
        return Err(reject(error));
    }
    let Some(status) = status else {
        return Err(reject(ChainError::NoStatus));
    };
    Ok(Split {
        readable,
        writable,
        status,
    })
}

/// Validates a chain and decodes its header. Reads guest memory (the
/// descriptors and the header) but writes nothing.
pub fn parse<C, M>(chain: DescriptorChain<C>, mem: &M) -> Result<Request, Rejection>
where
    C: Deref,
    C::Target: GuestMemory,
    M: GuestMemory + ?Sized,
{
    let Split {
        readable,
        writable,
        status,
    } = split(chain, mem)?;
    let reject = |error| Rejection {
        error,
        status: Some(status),
    };

    if readable.len() < HEADER_SIZE {
        return Err(reject(ChainError::ShortHeader(readable.len())));
    }
    let mut raw = [0u8; HEADER_SIZE];
    readable
        .read_at(mem, 0, &mut raw)
        .map_err(|e| reject(ChainError::Memory(e)))?;
    let header = RequestHeader::parse(&raw).map_err(|e| reject(ChainError::Header(e)))?;

    let op = header.op;
    let want_r = HEADER_SIZE + op.readable_payload();
    let want_w = op.writable_payload() + 1;
    let (got_r, got_w) = (readable.len(), writable.len());
    if got_r != want_r || got_w != want_w {
        let error = if op.writable_payload() > 0 && got_r == HEADER_SIZE + op.writable_payload() && got_w == 1
        {
            ChainError::PageNotWritable(op)
        } else if op.readable_payload() > 0 && got_r == HEADER_SIZE && got_w == op.readable_payload() + 1 {
            ChainError::PageNotReadable(op)
        } else if got_r != want_r {
            ChainError::ReadableLength {
                op,
                expected: want_r,
                got: got_r,
            }
        } else {
            ChainError::WritableLength {
                op,
                expected: want_w,
                got: got_w,
            }
        };
        return Err(reject(error));
    }

    Ok(Request {
        header,
        readable,
        writable,
        status,
    })
}

fn check_range<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: u32,
    access: Permissions,
) -> Result<(), ChainError> {
    if mem.check_range(GuestAddress(addr), len as usize, access) {
        Ok(())
    } else {
        Err(ChainError::OutOfRange { addr, len })
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::{
        desc::{split::Descriptor, RawDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::protocol::FLAG_EXCLUSIVE;

    const MEM_SIZE: usize = 0x40_0000;
    /// Buffers live from here on; the mock queue sits at 0.
    const BUF: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn r(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
    }

    fn w(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    fn header(op: u8, flags: u8) -> [u8; HEADER_SIZE] {
        let mut raw = [0u8; HEADER_SIZE];
        raw[0] = op;
        raw[1] = flags;
        raw[4..8].copy_from_slice(&3u32.to_le_bytes());
        raw[8..16].copy_from_slice(&77u64.to_le_bytes());
        raw
    }

    /// Writes `bytes` at BUF and parses the chain `descs`.
    fn parse_with(
        mem: &GuestMemoryMmap,
        bytes: &[u8],
        descs: &[RawDescriptor],
    ) -> Result<Request, Rejection> {
        mem.write_slice(bytes, GuestAddress(BUF)).unwrap();
        let queue = MockSplitQueue::new(mem, 256);
        let chain = queue.build_desc_chain(descs).unwrap();
        parse(chain, mem)
    }

    fn put_bytes() -> Vec<u8> {
        let mut bytes = header(1, 0).to_vec();
        bytes.extend((0..PAGE_SIZE).map(|i| (i % 251) as u8));
        bytes
    }

    #[test]
    fn put_in_three_descriptors() {
        let mem = memory();
        let req = parse_with(
            &mem,
            &put_bytes(),
            &[r(BUF, 24), r(BUF + 24, 4096), w(BUF + 0x2000, 1)],
        )
        .unwrap();
        assert_eq!(req.header.op, Op::Put);
        assert_eq!(req.header.pool, 3);
        assert_eq!(req.header.index, 77);
        assert_eq!(req.status, GuestAddress(BUF + 0x2000));
        let mut page = [0u8; PAGE_SIZE];
        req.read_page(&mem, &mut page).unwrap();
        assert_eq!(&page[..], &put_bytes()[24..]);
    }

    #[test]
    fn put_split_at_odd_places() {
        let mem = memory();
        // Header split 5+19+page part, page split again; status shares nothing.
        let req = parse_with(
            &mem,
            &put_bytes(),
            &[
                r(BUF, 5),
                r(BUF + 5, 30),
                r(BUF + 35, 1000),
                r(BUF + 1035, 3085),
                w(BUF + 0x3000, 1),
            ],
        )
        .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        req.read_page(&mem, &mut page).unwrap();
        assert_eq!(&page[..], &put_bytes()[24..]);
    }

    #[test]
    fn get_with_page_and_status_merged() {
        let mem = memory();
        let req = parse_with(
            &mem,
            &header(2, FLAG_EXCLUSIVE),
            &[r(BUF, 24), w(BUF + 0x1000, 4097)],
        )
        .unwrap();
        assert!(req.header.exclusive());
        assert_eq!(req.status, GuestAddress(BUF + 0x1000 + 4096));
        let page = [0xabu8; PAGE_SIZE];
        req.write_page(&mem, &page).unwrap();
        let back: [u8; 16] = mem.read_obj(GuestAddress(BUF + 0x1000 + 4080)).unwrap();
        assert_eq!(back, [0xab; 16]);
        // The status byte was not part of the page write.
        assert_eq!(mem.read_obj::<u8>(req.status).unwrap(), 0);
    }

    #[test]
    fn header_and_status_in_the_same_buffer_area_split_oddly() {
        let mem = memory();
        let req = parse_with(
            &mem,
            &header(3, 0),
            &[r(BUF, 1), r(BUF + 1, 23), w(BUF + 0x100, 1), w(BUF + 0x200, 0)],
        )
        .unwrap();
        assert_eq!(req.header.op, Op::InvalidatePage);
        // A zero-length trailing descriptor does not move the status byte.
        assert_eq!(req.status, GuestAddress(BUF + 0x100));
    }

    #[test]
    fn unknown_op_is_invalid_with_status() {
        let mem = memory();
        let rej = parse_with(&mem, &header(9, 0), &[r(BUF, 24), w(BUF + 0x100, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::Header(HeaderError::UnknownOp(9)));
        assert_eq!(rej.status, Some(GuestAddress(BUF + 0x100)));
    }

    #[test]
    fn reserved_bits_are_invalid() {
        let mem = memory();
        let mut raw = header(3, 0);
        raw[3] = 0x80;
        let rej = parse_with(&mem, &raw, &[r(BUF, 24), w(BUF + 0x100, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::Header(HeaderError::Reserved(_)));
        let rej = parse_with(&mem, &header(1, 1), &[r(BUF, 24), w(BUF + 0x100, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::Header(HeaderError::UnknownFlags { .. }));
    }

    #[test]
    fn short_header() {
        let mem = memory();
        let rej = parse_with(&mem, &header(3, 0), &[r(BUF, 23), w(BUF + 0x100, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::ShortHeader(23));
        assert!(rej.status.is_some());
    }

    #[test]
    fn short_and_long_put_page() {
        let mem = memory();
        let rej = parse_with(&mem, &put_bytes(), &[r(BUF, 24 + 4095), w(BUF + 0x2000, 1)])
            .err()
            .unwrap();
        assert_matches!(
            rej.error,
            ChainError::ReadableLength {
                op: Op::Put,
                expected: 4120,
                got: 4119
            }
        );
        let rej = parse_with(&mem, &put_bytes(), &[r(BUF, 24 + 4097), w(BUF + 0x2000, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::ReadableLength { got: 4121, .. });
    }

    #[test]
    fn short_get_page() {
        let mem = memory();
        let rej = parse_with(&mem, &header(2, 0), &[r(BUF, 24), w(BUF + 0x1000, 4000)])
            .err()
            .unwrap();
        assert_matches!(
            rej.error,
            ChainError::WritableLength {
                op: Op::Get,
                expected: 4097,
                got: 4000
            }
        );
        // Status is still the last writable byte, inside the short page.
        assert_eq!(rej.status, Some(GuestAddress(BUF + 0x1000 + 3999)));
    }

    #[test]
    fn get_page_given_readable() {
        let mem = memory();
        let rej = parse_with(
            &mem,
            &header(2, 0),
            &[r(BUF, 24), r(BUF + 0x1000, 4096), w(BUF + 0x3000, 1)],
        )
        .err()
        .unwrap();
        assert_matches!(rej.error, ChainError::PageNotWritable(Op::Get));
        assert_eq!(rej.status, Some(GuestAddress(BUF + 0x3000)));
    }

    #[test]
    fn put_page_given_writable() {
        let mem = memory();
        let rej = parse_with(&mem, &put_bytes(), &[r(BUF, 24), w(BUF + 0x1000, 4097)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::PageNotReadable(Op::Put));
    }

    #[test]
    fn no_writable_byte_means_no_status() {
        let mem = memory();
        let rej = parse_with(&mem, &header(3, 0), &[r(BUF, 24)]).err().unwrap();
        assert_matches!(rej.error, ChainError::NoStatus);
        assert_eq!(rej.status, None);
    }

    #[test]
    fn readable_after_writable() {
        let mem = memory();
        let rej = parse_with(
            &mem,
            &header(3, 0),
            &[w(BUF + 0x100, 1), r(BUF, 24), w(BUF + 0x200, 1)],
        )
        .err()
        .unwrap();
        assert_matches!(rej.error, ChainError::ReadableAfterWritable);
        assert_eq!(rej.status, Some(GuestAddress(BUF + 0x200)));
    }

    #[test]
    fn buffer_outside_guest_memory() {
        let mem = memory();
        let end = MEM_SIZE as u64;
        let rej = parse_with(&mem, &header(3, 0), &[r(end - 10, 24), w(BUF + 0x100, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::OutOfRange { len: 24, .. });
        assert!(rej.status.is_some());
        // Status itself outside memory: nothing can be written back.
        let rej = parse_with(&mem, &header(3, 0), &[r(BUF, 24), w(end + 0x1000, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::OutOfRange { .. });
        assert_eq!(rej.status, None);
        // A descriptor whose end wraps around the address space.
        let rej = parse_with(&mem, &header(3, 0), &[r(u64::MAX - 3, 24), w(BUF, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::OutOfRange { .. });
    }

    #[test]
    fn over_long_chain() {
        let mem = memory();
        let mut descs = vec![r(BUF, 24)];
        descs.extend((0..MAX_DESCRIPTORS as u64).map(|i| w(BUF + 0x1000 + i, 1)));
        let rej = parse_with(&mem, &header(3, 0), &descs).err().unwrap();
        assert_matches!(rej.error, ChainError::TooManyDescriptors);
        // The status is found past the cap: it is the chain's last writable byte.
        assert_eq!(
            rej.status,
            Some(GuestAddress(BUF + 0x1000 + MAX_DESCRIPTORS as u64 - 1))
        );
    }

    #[test]
    fn longest_accepted_chain() {
        let mem = memory();
        // PUT: 24 one-byte header descriptors, the page in 39 pieces and the
        // status: 64, with empty descriptors between them (they do not count).
        let mut descs: Vec<_> = (0..24).map(|i| r(BUF + i, 1)).collect();
        descs.extend((0..20).map(|_| r(BUF, 0)));
        descs.extend((0..38).map(|i| r(BUF + 24 + i * 100, 100)));
        descs.push(r(BUF + 24 + 3800, 296));
        descs.push(w(BUF + 0x2000, 1));
        let req = parse_with(&mem, &put_bytes(), &descs).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        req.read_page(&mem, &mut page).unwrap();
        assert_eq!(&page[..], &put_bytes()[24..]);
        // GET: the header, then page and status in 63 writable pieces.
        let mut descs = vec![r(BUF, 24)];
        descs.extend((0..62).map(|i| w(BUF + 0x2000 + i * 64, 64)));
        descs.push(w(BUF + 0x2000 + 62 * 64, 129));
        let req = parse_with(&mem, &header(2, 0), &descs).unwrap();
        assert_eq!(req.status, GuestAddress(BUF + 0x2000 + 4096));
    }

    #[test]
    fn looping_chain_is_truncated() {
        let mem = memory();
        mem.write_slice(&header(3, 0), GuestAddress(BUF)).unwrap();
        let queue = MockSplitQueue::new(&mem, 16);
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // 0 -> 1 -> 0 -> ...: header, status, header, ...
        let descs = [
            RawDescriptor::from(Descriptor::new(BUF, 24, next, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 0x100, 1, next | write, 0)),
        ];
        let chain = queue.build_multiple_desc_chains(&descs).unwrap();
        let rej = parse(chain, &mem).err().unwrap();
        // The walk meets the header again after the status first.
        assert_matches!(rej.error, ChainError::ReadableAfterWritable);
        // A chain whose only loop is on the status: cut off by the TTL.
        let descs = [
            RawDescriptor::from(Descriptor::new(BUF, 24, next, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 0x100, 1, next | write, 1)),
        ];
        let chain = queue.build_multiple_desc_chains(&descs).unwrap();
        let rej = parse(chain, &mem).err().unwrap();
        assert_matches!(rej.error, ChainError::Truncated);
        assert_eq!(rej.status, Some(GuestAddress(BUF + 0x100)));
        // A next index beyond the table.
        let descs = [
            RawDescriptor::from(Descriptor::new(BUF, 24, next, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 0x100, 1, next | write, 999)),
        ];
        let chain = queue.build_multiple_desc_chains(&descs).unwrap();
        let rej = parse(chain, &mem).err().unwrap();
        assert_matches!(rej.error, ChainError::Truncated);
    }

    #[test]
    fn put_fill_has_no_page() {
        let mem = memory();
        let mut raw = header(5, 0);
        raw[16..24].copy_from_slice(&0x0101_0101_0101_0101u64.to_le_bytes());
        let req = parse_with(&mem, &raw, &[r(BUF, 24), w(BUF + 0x100, 1)]).unwrap();
        assert_eq!(req.header.op, Op::PutFill);
        assert_eq!(req.header.arg, 0x0101_0101_0101_0101);
        let rej = parse_with(&mem, &put_bytes(), &[r(BUF, 24 + 4096), w(BUF + 0x100, 1)]);
        // Same bytes with op 1 is a PUT; as PUT_FILL a page is one too many.
        let mut fill_with_page = put_bytes();
        fill_with_page[0] = 5;
        assert!(rej.is_ok());
        let rej = parse_with(&mem, &fill_with_page, &[r(BUF, 24 + 4096), w(BUF + 0x2000, 1)])
            .err()
            .unwrap();
        assert_matches!(rej.error, ChainError::ReadableLength { op: Op::PutFill, .. });
    }
}
