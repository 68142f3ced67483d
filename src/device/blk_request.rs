//! Turning one descriptor chain into a checked virtio-blk request, without
//! touching the store and without allocating.
//!
//! The chain is split into its two byte streams as for the tmem device
//! ([`request::split`]); then the 16-byte header (type, reserved, sector) is
//! read, and everything the request will touch is checked against the disk's
//! size: the data length, and for DISCARD and WRITE_ZEROES every range, which
//! are copied out of guest memory here. A request that [`parse`] accepts can
//! be executed without another check; one it refuses has done nothing.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError};

use super::request::{self, ChainError, Split, Stream};

pub const SECTOR_SIZE: u64 = 512;
/// type (u32), reserved (u32), sector (u64).
pub const HEADER_SIZE: usize = 16;
/// One DISCARD or WRITE_ZEROES range: sector (u64), sectors (u32), flags (u32).
pub const RANGE_SIZE: usize = 16;
/// Most ranges in one DISCARD or WRITE_ZEROES (`max_discard_seg` and
/// `max_write_zeroes_seg` in config space): they are copied out of guest
/// memory whole before anything is done, into a fixed array.
pub const MAX_RANGES: usize = 16;
/// Most sectors in one range (`max_discard_sectors`, `max_write_zeroes_sectors`):
/// 32 MiB, 8192 pages, bounds the work one request can ask for.
pub const MAX_RANGE_SECTORS: u32 = 1 << 16;
/// Bytes of the device ID that GET_ID returns.
pub const ID_BYTES: usize = 20;

/// Status bytes of the virtio-blk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlkStatus {
    Ok = 0,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

#[derive(Debug, Error)]
pub enum BlkError {
    #[error("malformed chain")]
    Chain(#[source] ChainError),
    #[error("header needs {HEADER_SIZE} device-readable bytes, chain has {0}")]
    ShortHeader(usize),
    #[error("cannot read the request from guest memory")]
    Memory(#[source] GuestMemoryError),
    #[error("unsupported request type {0}")]
    UnknownType(u32),
    #[error("{what} carries {got} bytes in the wrong direction or of the wrong length")]
    Layout { what: &'static str, got: usize },
    #[error("data length {0} is not a whole number of {SECTOR_SIZE}-byte sectors")]
    Unaligned(usize),
    #[error("sectors {sector}..+{sectors} are beyond the disk's {capacity} sectors")]
    BeyondEnd {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("{0} ranges, 1 to {MAX_RANGES} allowed")]
    RangeCount(usize),
    #[error("range of {0} sectors, at most {MAX_RANGE_SECTORS} allowed")]
    RangeTooLong(u32),
    #[error("range flags {0:#x} not allowed for this request")]
    RangeFlags(u32),
}

impl BlkError {
    /// What the driver is told: UNSUPP for what this device does not do,
    /// IOERR for everything malformed.
    pub fn status(&self) -> BlkStatus {
        match self {
            BlkError::UnknownType(_) | BlkError::RangeFlags(_) => BlkStatus::Unsupp,
            _ => BlkStatus::IoErr,
        }
    }
}

/// A request's kind and its checked arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// `len` bytes from byte `offset` of the disk.
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
    },
    Flush,
    /// Writes up to `len` bytes of ID.
    GetId {
        len: usize,
    },
    /// `count` ranges in [`BlkRequest::ranges`].
    Discard {
        count: usize,
    },
    WriteZeroes {
        count: usize,
    },
}

/// One DISCARD or WRITE_ZEROES range, in bytes of the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// A request whose chain and arguments have been fully validated.
pub struct BlkRequest {
    pub op: BlkOp,
    /// Header, then a write's data or the ranges.
    pub readable: Stream,
    /// A read's data or the ID, then the status byte.
    pub writable: Stream,
    pub ranges: [Range; MAX_RANGES],
    pub status: GuestAddress,
}

/// A chain that could not be accepted, and where (if anywhere) to write the
/// status that says so.
#[derive(Debug)]
pub struct BlkRejection {
    pub error: BlkError,
    pub status: Option<GuestAddress>,
}

/// Validates a chain against a disk of `capacity` sectors. Reads guest
/// memory (descriptors, header, ranges), writes nothing.
pub fn parse<C, M>(chain: DescriptorChain<C>, mem: &M, capacity: u64) -> Result<BlkRequest, BlkRejection>
where
    C: Deref,
    C::Target: GuestMemory,
    M: GuestMemory + ?Sized,
{
    let Split {
        readable,
        writable,
        status,
    } = request::split(chain, mem).map_err(|r| BlkRejection {
        error: BlkError::Chain(r.error),
        status: r.status,
    })?;
    let reject = |error| BlkRejection {
        error,
        status: Some(status),
    };
    if readable.len() < HEADER_SIZE {
        return Err(reject(BlkError::ShortHeader(readable.len())));
    }
    let mut raw = [0u8; HEADER_SIZE];
    readable
        .read_at(mem, 0, &mut raw)
        .map_err(|e| reject(BlkError::Memory(e)))?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..]);
    let sector = u64::from_le_bytes(sector);
    // Payload bytes each way, beyond the header and the status byte.
    let (rd, wr) = (readable.len() - HEADER_SIZE, writable.len() - 1);
    let mut ranges = [Range::default(); MAX_RANGES];
    let op = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (len, other) = if kind == VIRTIO_BLK_T_IN {
                (wr, rd)
            } else {
                (rd, wr)
            };
            if other != 0 {
                return Err(reject(BlkError::Layout {
                    what: if kind == VIRTIO_BLK_T_IN { "IN" } else { "OUT" },
                    got: other,
                }));
            }
            if len as u64 % SECTOR_SIZE != 0 {
                return Err(reject(BlkError::Unaligned(len)));
            }
            let offset = check_extent(sector, len as u64 / SECTOR_SIZE, capacity).map_err(reject)?;
            if kind == VIRTIO_BLK_T_IN {
                BlkOp::Read { offset, len }
            } else {
                BlkOp::Write { offset, len }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if rd != 0 || wr != 0 {
                return Err(reject(BlkError::Layout {
                    what: "FLUSH",
                    got: rd + wr,
                }));
            }
            BlkOp::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if rd != 0 || wr == 0 {
                return Err(reject(BlkError::Layout {
                    what: "GET_ID",
                    got: rd,
                }));
            }
            BlkOp::GetId {
                len: wr.min(ID_BYTES),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            let what = if zeroes { "WRITE_ZEROES" } else { "DISCARD" };
            if wr != 0 || rd % RANGE_SIZE != 0 {
                return Err(reject(BlkError::Layout { what, got: rd }));
            }
            let count = rd / RANGE_SIZE;
            if count == 0 || count > MAX_RANGES {
                return Err(reject(BlkError::RangeCount(count)));
            }
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            for (i, range) in ranges.iter_mut().take(count).enumerate() {
                let mut raw = [0u8; RANGE_SIZE];
                readable
                    .read_at(mem, HEADER_SIZE + i * RANGE_SIZE, &mut raw)
                    .map_err(|e| reject(BlkError::Memory(e)))?;
                let mut start = [0u8; 8];
                start.copy_from_slice(&raw[..8]);
                let start = u64::from_le_bytes(start);
                let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
                let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
                if flags & !allowed != 0 {
                    return Err(reject(BlkError::RangeFlags(flags)));
                }
                if sectors > MAX_RANGE_SECTORS {
                    return Err(reject(BlkError::RangeTooLong(sectors)));
                }
                *range = Range {
                    offset: check_extent(start, u64::from(sectors), capacity).map_err(reject)?,
                    len: u64::from(sectors) * SECTOR_SIZE,
                };
            }
            if zeroes {
                BlkOp::WriteZeroes { count }
            } else {
                BlkOp::Discard { count }
            }
        }
        other => return Err(reject(BlkError::UnknownType(other))),
    };
    Ok(BlkRequest {
        op,
        readable,
        writable,
        ranges,
        status,
    })
}

/// The byte offset of `sectors` sectors from `sector`, if they are all on
/// a disk of `capacity` sectors.
fn check_extent(sector: u64, sectors: u64, capacity: u64) -> Result<u64, BlkError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(BlkError::BeyondEnd {
            sector,
            sectors,
            capacity,
        }),
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::{split::Descriptor, RawDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const BUF: u64 = 0x10_0000;
    const CAPACITY: u64 = 64;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn r(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
    }

    fn w(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut raw = kind.to_le_bytes().to_vec();
        raw.extend_from_slice(&[0; 4]);
        raw.extend_from_slice(&sector.to_le_bytes());
        raw
    }

    fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
        let mut raw = sector.to_le_bytes().to_vec();
        raw.extend_from_slice(&sectors.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw
    }

    fn parse_with(bytes: &[u8], descs: &[RawDescriptor]) -> Result<BlkRequest, BlkRejection> {
        let mem = memory();
        mem.write_slice(bytes, GuestAddress(BUF)).unwrap();
        let queue = MockSplitQueue::new(&mem, 256);
        let chain = queue.build_desc_chain(descs).unwrap();
        parse(chain, &mem, CAPACITY)
    }

    #[test]
    fn read_and_write_of_the_last_sectors() {
        let h = header(VIRTIO_BLK_T_IN, CAPACITY - 8);
        let req = parse_with(&h, &[r(BUF, 16), w(BUF + 0x1000, 4096), w(BUF + 0x3000, 1)]).unwrap();
        assert_eq!(
            req.op,
            BlkOp::Read {
                offset: (CAPACITY - 8) * 512,
                len: 4096
            }
        );
        assert_eq!(req.status, GuestAddress(BUF + 0x3000));
        let h = header(VIRTIO_BLK_T_OUT, 1);
        let req = parse_with(&h, &[r(BUF, 16), r(BUF + 0x1000, 1024), w(BUF + 0x3000, 1)]).unwrap();
        assert_eq!(
            req.op,
            BlkOp::Write {
                offset: 512,
                len: 1024
            }
        );
    }

    #[test]
    fn beyond_the_end_is_an_io_error() {
        for (sector, len) in [(CAPACITY - 7, 4096), (CAPACITY, 512), (u64::MAX, 512)] {
            let h = header(VIRTIO_BLK_T_IN, sector);
            let e = parse_with(&h, &[r(BUF, 16), w(BUF + 0x1000, len), w(BUF + 0x3000, 1)])
                .err()
                .unwrap();
            assert_matches!(e.error, BlkError::BeyondEnd { .. });
            assert_eq!(e.error.status(), BlkStatus::IoErr);
            assert_eq!(e.status, Some(GuestAddress(BUF + 0x3000)));
        }
    }

    #[test]
    fn malformed_requests() {
        let h = header(VIRTIO_BLK_T_IN, 0);
        let e = parse_with(&h, &[r(BUF, 16), w(BUF + 0x1000, 100), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::Unaligned(100));
        let e = parse_with(&h, &[r(BUF, 20), w(BUF + 0x1000, 512), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::Layout { what: "IN", got: 4 });
        let e = parse_with(&h, &[r(BUF, 8), w(BUF + 0x3000, 1)]).err().unwrap();
        assert_matches!(e.error, BlkError::ShortHeader(8));
        let e = parse_with(&h, &[r(BUF, 16)]).err().unwrap();
        assert_matches!(e.error, BlkError::Chain(ChainError::NoStatus));
        assert_eq!(e.status, None);
        let h = header(VIRTIO_BLK_T_FLUSH, 0);
        let e = parse_with(&h, &[r(BUF, 16), w(BUF + 0x1000, 512), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::Layout { what: "FLUSH", .. });
        let h = header(77, 0);
        let e = parse_with(&h, &[r(BUF, 16), w(BUF + 0x3000, 1)]).err().unwrap();
        assert_matches!(e.error, BlkError::UnknownType(77));
        assert_eq!(e.error.status(), BlkStatus::Unsupp);
    }

    #[test]
    fn ranges_are_read_and_checked_whole() {
        let mut bytes = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        bytes.extend(range(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        bytes.extend(range(0, 1, 0));
        let req = parse_with(&bytes, &[r(BUF, 48), w(BUF + 0x3000, 1)]).unwrap();
        assert_eq!(req.op, BlkOp::WriteZeroes { count: 2 });
        assert_eq!(
            req.ranges[0],
            Range {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(req.ranges[1], Range { offset: 0, len: 512 });

        let mut bytes = header(VIRTIO_BLK_T_DISCARD, 0);
        bytes.extend(range(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        let e = parse_with(&bytes, &[r(BUF, 32), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::RangeFlags(_));
        let mut bytes = header(VIRTIO_BLK_T_DISCARD, 0);
        bytes.extend(range(0, 8, 0));
        bytes.extend(range(CAPACITY - 1, 2, 0));
        let e = parse_with(&bytes, &[r(BUF, 48), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::BeyondEnd { .. });
        let e = parse_with(&bytes, &[r(BUF, 40), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(
            e.error,
            BlkError::Layout {
                what: "DISCARD",
                got: 24
            }
        );
        let e = parse_with(&bytes, &[r(BUF, 16), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::RangeCount(0));
        let mut bytes = header(VIRTIO_BLK_T_DISCARD, 0);
        bytes.extend(range(0, MAX_RANGE_SECTORS + 1, 0));
        let e = parse_with(&bytes, &[r(BUF, 32), w(BUF + 0x3000, 1)])
            .err()
            .unwrap();
        assert_matches!(e.error, BlkError::RangeTooLong(_));
    }

    #[test]
    fn get_id_takes_at_most_twenty_bytes() {
        let h = header(VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_with(&h, &[r(BUF, 16), w(BUF + 0x1000, 512), w(BUF + 0x3000, 1)]).unwrap();
        assert_eq!(req.op, BlkOp::GetId { len: ID_BYTES });
        let e = parse_with(&h, &[r(BUF, 16), w(BUF + 0x3000, 1)]).err().unwrap();
        assert_matches!(e.error, BlkError::Layout { what: "GET_ID", .. });
    }
}
