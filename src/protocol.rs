//! Wire format of the tmem virtio device, protocol version 1.
//!
//! This is the vocabulary shared with the guest driver (`guest-driver/virtio_tmem.c`);
//! `docs/protocol.md` is the normative description. Nothing here touches a
//! virtqueue: it only turns bytes into typed values and back.

use thiserror::Error;

/// Virtio device ID used by the tmem device. Unallocated by the virtio spec; the
/// VMM is told to use it (`virtio-id=63` in QEMU, `device_type=63` in cloud-hypervisor).
pub const VIRTIO_ID_TMEM: u32 = 63;
/// `"TMEM"` read as a little-endian u32.
pub const CONFIG_MAGIC: u32 = 0x4D45_4D54;
pub const PROTOCOL_VERSION: u16 = 1;
pub const PAGE_SIZE: usize = 4096;
pub const CONFIG_SIZE: usize = 32;
pub const HEADER_SIZE: usize = 24;

/// Config-space capability bits.
pub const CAP_EXCLUSIVE_GET: u32 = 1 << 0;
pub const CAP_PUT_FILL: u32 = 1 << 1;

/// Request flag: on GET, drop the page once it has been read.
pub const FLAG_EXCLUSIVE: u8 = 1 << 0;
const KNOWN_FLAGS: u8 = FLAG_EXCLUSIVE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Put = 1,
    Get = 2,
    InvalidatePage = 3,
    InvalidatePool = 4,
    PutFill = 5,
}

impl Op {
    /// Device-readable bytes that follow the header.
    pub fn readable_payload(self) -> usize {
        match self {
            Op::Put => PAGE_SIZE,
            _ => 0,
        }
    }

    /// Device-writable bytes that precede the status byte.
    pub fn writable_payload(self) -> usize {
        match self {
            Op::Get => PAGE_SIZE,
            _ => 0,
        }
    }
}

impl TryFrom<u8> for Op {
    type Error = HeaderError;

    fn try_from(raw: u8) -> Result<Self, HeaderError> {
        Ok(match raw {
            1 => Op::Put,
            2 => Op::Get,
            3 => Op::InvalidatePage,
            4 => Op::InvalidatePool,
            5 => Op::PutFill,
            other => return Err(HeaderError::UnknownOp(other)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Rejected = 2,
    Invalid = 3,
    IoError = 4,
}

/// A status byte the device never writes.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown status byte {0}")]
pub struct UnknownStatus(pub u8);

impl TryFrom<u8> for Status {
    type Error = UnknownStatus;

    fn try_from(raw: u8) -> Result<Self, UnknownStatus> {
        Ok(match raw {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Rejected,
            3 => Status::Invalid,
            4 => Status::IoError,
            other => return Err(UnknownStatus(other)),
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("unknown flags {flags:#04x} for op {op:?}")]
    UnknownFlags { op: Op, flags: u8 },
    #[error("reserved header field is {0:#06x}, expected 0")]
    Reserved(u16),
}

/// The 24-byte request header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub pool: u32,
    pub index: u64,
    pub arg: u64,
}

impl RequestHeader {
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<Self, HeaderError> {
        let op = Op::try_from(raw[0])?;
        let flags = raw[1];
        // EXCLUSIVE only means something on GET; anything else set is a guest bug
        // we would rather hear about than silently ignore.
        let allowed = if op == Op::Get { KNOWN_FLAGS } else { 0 };
        if flags & !allowed != 0 {
            return Err(HeaderError::UnknownFlags { op, flags });
        }
        let reserved = u16::from_le_bytes([raw[2], raw[3]]);
        if reserved != 0 {
            return Err(HeaderError::Reserved(reserved));
        }
        Ok(RequestHeader {
            op,
            flags,
            pool: u32::from_le_bytes(le_array(&raw[4..8])),
            index: u64::from_le_bytes(le_array(&raw[8..16])),
            arg: u64::from_le_bytes(le_array(&raw[16..24])),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = [0u8; HEADER_SIZE];
        raw[0] = self.op as u8;
        raw[1] = self.flags;
        raw[4..8].copy_from_slice(&self.pool.to_le_bytes());
        raw[8..16].copy_from_slice(&self.index.to_le_bytes());
        raw[16..24].copy_from_slice(&self.arg.to_le_bytes());
        raw
    }

    pub fn exclusive(&self) -> bool {
        self.flags & FLAG_EXCLUSIVE != 0
    }
}

fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

/// The 32-byte read-only config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    pub num_queues: u16,
    pub caps: u32,
    pub capacity_pages: u64,
}

impl ConfigSpace {
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut raw = [0u8; CONFIG_SIZE];
        raw[0..4].copy_from_slice(&CONFIG_MAGIC.to_le_bytes());
        raw[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        raw[6..8].copy_from_slice(&self.num_queues.to_le_bytes());
        raw[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        raw[12..16].copy_from_slice(&self.caps.to_le_bytes());
        raw[16..24].copy_from_slice(&self.capacity_pages.to_le_bytes());
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u8, flags: u8) -> [u8; HEADER_SIZE] {
        let mut raw = [0u8; HEADER_SIZE];
        raw[0] = op;
        raw[1] = flags;
        raw[4..8].copy_from_slice(&7u32.to_le_bytes());
        raw[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        raw[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        raw
    }

    #[test]
    fn header_fields_are_little_endian() {
        let h = RequestHeader::parse(&header(2, FLAG_EXCLUSIVE)).unwrap();
        assert_eq!(h.op, Op::Get);
        assert!(h.exclusive());
        assert_eq!(h.pool, 7);
        assert_eq!(h.index, 0x1122_3344_5566_7788);
        assert_eq!(h.arg, u64::MAX);
        assert_eq!(RequestHeader::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn ops_and_statuses_round_trip_through_their_bytes() {
        for op in [
            Op::Put,
            Op::Get,
            Op::InvalidatePage,
            Op::InvalidatePool,
            Op::PutFill,
        ] {
            assert_eq!(Op::try_from(op as u8), Ok(op));
        }
        for status in [
            Status::Ok,
            Status::NotFound,
            Status::Rejected,
            Status::Invalid,
            Status::IoError,
        ] {
            assert_eq!(Status::try_from(status as u8), Ok(status));
        }
        assert_eq!(Status::try_from(5), Err(UnknownStatus(5)));
        assert_eq!(Status::try_from(0xff), Err(UnknownStatus(0xff)));
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert_eq!(
            RequestHeader::parse(&header(0, 0)),
            Err(HeaderError::UnknownOp(0))
        );
        assert_eq!(
            RequestHeader::parse(&header(6, 0)),
            Err(HeaderError::UnknownOp(6))
        );
    }

    #[test]
    fn exclusive_flag_only_on_get() {
        assert!(matches!(
            RequestHeader::parse(&header(1, FLAG_EXCLUSIVE)),
            Err(HeaderError::UnknownFlags { op: Op::Put, .. })
        ));
        assert!(matches!(
            RequestHeader::parse(&header(2, 0x80)),
            Err(HeaderError::UnknownFlags { op: Op::Get, .. })
        ));
    }

    #[test]
    fn reserved_must_be_zero() {
        let mut raw = header(3, 0);
        raw[2] = 1;
        assert_eq!(RequestHeader::parse(&raw), Err(HeaderError::Reserved(1)));
    }

    #[test]
    fn config_space_layout() {
        let raw = ConfigSpace {
            num_queues: 2,
            caps: CAP_EXCLUSIVE_GET | CAP_PUT_FILL,
            capacity_pages: 1 << 20,
        }
        .to_bytes();
        assert_eq!(&raw[0..4], b"TMEM");
        assert_eq!(u16::from_le_bytes([raw[4], raw[5]]), 1);
        assert_eq!(u16::from_le_bytes([raw[6], raw[7]]), 2);
        assert_eq!(u32::from_le_bytes(le_array(&raw[8..12])), 4096);
        assert_eq!(u32::from_le_bytes(le_array(&raw[12..16])), 3);
        assert_eq!(u64::from_le_bytes(le_array(&raw[16..24])), 1 << 20);
        assert_eq!(&raw[24..32], &[0u8; 8]);
    }
}
