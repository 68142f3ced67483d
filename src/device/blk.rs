//! The virtio-blk device kind: a disk of a fixed size over the page store,
//! for guests and VMMs that have no tmem driver. Its 4 KiB blocks are the
//! store's pages, in pool 0 of the device's guest, at index byte offset / 4096.
//!
//! - Reads of a block never written (or discarded) give zeros; reads never
//!   take the page away.
//! - A write of a whole, aligned block is one put. A write of part of a block
//!   (a sub-page or unaligned request) reads the block, changes its part and
//!   puts it back, holding the block's lock (one of [`LOCK_STRIPES`], by
//!   block index) so that two queues changing different sectors of one block
//!   both keep their sectors. Whole-block writes take the same lock, so a
//!   read-modify-write never puts back a block older than one it overlapped.
//! - DISCARD drops the whole blocks of its ranges (parts of blocks are left
//!   as they are, which the spec allows); WRITE_ZEROES drops the whole blocks
//!   and zeroes the parts. FLUSH has nothing to do: the store is volatile by
//!   design, like zram.
//! - Room is never lacking: the daemon gives the device's guest a
//!   [`crate::store::Reservation`] of its whole size, so a put is never
//!   rejected; if one fails anyway (a spill I/O error) the request is IOERR.

use std::mem::offset_of;

use parking_lot::Mutex;
use virtio_bindings::bindings::{
    virtio_blk::{
        virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    },
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use vm_memory::GuestMemoryMmap;

use super::{
    blk_request::{
        BlkOp, BlkRequest, BlkStatus, Range, HEADER_SIZE, MAX_RANGES, MAX_RANGE_SECTORS, SECTOR_SIZE,
    },
    request::MAX_DESCRIPTORS,
};
use crate::store::{GetOutcome, GuestId, Page, PutOutcome, Store, StoreError, PAGE_SIZE};

/// Locks for read-modify-writes, by block index. Enough that two queues
/// rarely meet on one by chance; a lock is held for one block's put.
pub const LOCK_STRIPES: usize = 256;
/// Largest data segment a driver may use (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Data segments per request (`seg_max`): a chain's descriptors, less the
/// header's and the status's.
pub const SEG_MAX: u32 = MAX_DESCRIPTORS as u32 - 2;
/// The store pool that holds the disk's blocks.
const POOL: u32 = 0;
const PAGE: u64 = PAGE_SIZE as u64;

/// Bytes of config space: `virtio_blk_config` up to the fields this device
/// offers (the secure-erase and zoned fields are not).
pub const BLK_CONFIG_SIZE: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// The virtio feature bits of the blk device.
pub fn features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0, |bits, &f| bits | 1u64 << f)
}

/// One blk device: its size, config space and block locks.
pub struct Disk {
    pages: u64,
    config: [u8; BLK_CONFIG_SIZE],
    id: [u8; 20],
    locks: Box<[Mutex<()>]>,
}

impl Disk {
    /// A disk of `size` bytes (a multiple of the page size) with `queues` queues.
    pub fn new(size: u64, queues: u16, device: u32) -> Self {
        let mut id = [0u8; 20];
        let name = format!("vhost-user-tmem-{device}");
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Disk {
            pages: size / PAGE,
            config: config_space(size / SECTOR_SIZE, queues),
            id,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.pages * (PAGE / SECTOR_SIZE)
    }

    pub fn config(&self) -> &[u8] {
        &self.config
    }

    fn lock(&self, block: u64) -> parking_lot::MutexGuard<'_, ()> {
        self.locks[block as usize % LOCK_STRIPES].lock()
    }

    /// Acts on a validated request; returns the status and the bytes written
    /// into the chain before the status byte.
    pub fn execute(
        &self,
        store: &Store,
        guest: GuestId,
        req: &BlkRequest,
        mem: &GuestMemoryMmap,
        page: &mut Page,
    ) -> Result<(BlkStatus, u32), BlkFailure> {
        let ctx = Ctx {
            disk: self,
            store,
            guest,
            req,
            mem,
        };
        match req.op {
            BlkOp::Read { offset, len } => {
                ctx.read(offset, len, page)?;
                Ok((BlkStatus::Ok, len as u32))
            }
            BlkOp::Write { offset, len } => {
                ctx.write(offset, len, page)?;
                Ok((BlkStatus::Ok, 0))
            }
            BlkOp::Flush => Ok((BlkStatus::Ok, 0)),
            BlkOp::GetId { len } => {
                req.writable
                    .write_at(mem, 0, &self.id[..len])
                    .map_err(BlkFailure::Memory)?;
                Ok((BlkStatus::Ok, len as u32))
            }
            BlkOp::Discard { count } => {
                for r in &req.ranges[..count] {
                    ctx.drop_blocks(*r, None)?;
                }
                Ok((BlkStatus::Ok, 0))
            }
            BlkOp::WriteZeroes { count } => {
                for r in &req.ranges[..count] {
                    ctx.drop_blocks(*r, Some(page))?;
                }
                Ok((BlkStatus::Ok, 0))
            }
        }
    }
}

/// Why an accepted request could not be carried out (answered IOERR).
#[derive(Debug, thiserror::Error)]
pub enum BlkFailure {
    #[error("page store failed")]
    Store(#[source] StoreError),
    #[error("page store refused a block although its room is reserved")]
    Rejected,
    #[error("cannot copy the request's data")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

struct Ctx<'a> {
    disk: &'a Disk,
    store: &'a Store,
    guest: GuestId,
    req: &'a BlkRequest,
    mem: &'a GuestMemoryMmap,
}

/// The blocks `[offset, offset + len)` touches, each with the part of it
/// touched (`start..end` within the block) and where that part is in the
/// request's data.
fn blocks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let end = offset + len;
    let first = offset / PAGE;
    let last = end.div_ceil(PAGE);
    (first..last).map(move |block| {
        let base = block * PAGE;
        let start = offset.max(base) - base;
        let stop = end.min(base + PAGE) - base;
        (
            block,
            start as usize,
            stop as usize,
            (base + start - offset) as usize,
        )
    })
}

impl Ctx<'_> {
    /// The block's contents into `page`: zeros if it holds nothing.
    fn load(&self, block: u64, page: &mut Page) -> Result<(), BlkFailure> {
        match self.store.get(self.guest, POOL, block, page, false) {
            Ok(GetOutcome::Found) => Ok(()),
            Ok(GetOutcome::NotFound) => {
                page.fill(0);
                Ok(())
            }
            Err(e) => Err(BlkFailure::Store(e)),
        }
    }

    fn store_block(&self, block: u64, page: &Page) -> Result<(), BlkFailure> {
        match self.store.put(self.guest, POOL, block, page) {
            Ok(PutOutcome::Stored) => Ok(()),
            Ok(PutOutcome::Rejected) => Err(BlkFailure::Rejected),
            Err(e) => Err(BlkFailure::Store(e)),
        }
    }

    fn read(&self, offset: u64, len: usize, page: &mut Page) -> Result<(), BlkFailure> {
        for (block, start, stop, at) in blocks(offset, len as u64) {
            self.load(block, page)?;
            self.req
                .writable
                .write_at(self.mem, at, &page[start..stop])
                .map_err(BlkFailure::Memory)?;
        }
        Ok(())
    }

    fn write(&self, offset: u64, len: usize, page: &mut Page) -> Result<(), BlkFailure> {
        for (block, start, stop, at) in blocks(offset, len as u64) {
            let _held = self.disk.lock(block);
            if stop - start < PAGE_SIZE {
                self.load(block, page)?;
            }
            self.req
                .readable
                .read_at(self.mem, HEADER_SIZE + at, &mut page[start..stop])
                .map_err(BlkFailure::Memory)?;
            self.store_block(block, page)?;
        }
        Ok(())
    }

    /// Drops the whole blocks of `range`; with `zero`, zeroes the parts of
    /// blocks at its ends too (WRITE_ZEROES), else leaves them (DISCARD).
    fn drop_blocks(&self, range: Range, zero: Option<&mut Page>) -> Result<(), BlkFailure> {
        let mut zero = zero;
        for (block, start, stop, _) in blocks(range.offset, range.len) {
            let _held = self.disk.lock(block);
            if stop - start == PAGE_SIZE {
                // A block that holds nothing reads as zeros.
                self.store.invalidate_page(self.guest, POOL, block);
            } else if let Some(page) = zero.as_deref_mut() {
                self.load(block, page)?;
                page[start..stop].fill(0);
                self.store_block(block, page)?;
            }
        }
        Ok(())
    }
}

/// The config space of a disk of `capacity` sectors.
fn config_space(capacity: u64, queues: u16) -> [u8; BLK_CONFIG_SIZE] {
    let mut c = [0u8; BLK_CONFIG_SIZE];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(virtio_blk_config, capacity), &capacity.to_le_bytes());
    put(offset_of!(virtio_blk_config, size_max), &SIZE_MAX.to_le_bytes());
    put(offset_of!(virtio_blk_config, seg_max), &SEG_MAX.to_le_bytes());
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(PAGE as u32).to_le_bytes(),
    );
    // The physical block is the logical one (2^0 of them): a page.
    put(offset_of!(virtio_blk_config, physical_block_exp), &[0]);
    put(offset_of!(virtio_blk_config, min_io_size), &1u16.to_le_bytes());
    put(offset_of!(virtio_blk_config, opt_io_size), &1u32.to_le_bytes());
    put(offset_of!(virtio_blk_config, num_queues), &queues.to_le_bytes());
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_RANGE_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &(MAX_RANGES as u32).to_le_bytes(),
    );
    let per_page = (PAGE / SECTOR_SIZE) as u32;
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &per_page.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_RANGE_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &(MAX_RANGES as u32).to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_a_range_exactly() {
        let v: Vec<_> = blocks(512, 8192).collect();
        assert_eq!(v, vec![(0, 512, 4096, 0), (1, 0, 4096, 3584), (2, 0, 512, 7680)]);
        let v: Vec<_> = blocks(8192, 4096).collect();
        assert_eq!(v, vec![(2, 0, 4096, 0)]);
        assert_eq!(blocks(4096, 0).count(), 0);
        let v: Vec<_> = blocks(4096 + 1024, 512).collect();
        assert_eq!(v, vec![(1, 1024, 1536, 0)]);
    }

    #[test]
    fn config_space_fields() {
        let d = Disk::new(1 << 30, 2, 3);
        let c = d.config();
        assert_eq!(c.len(), 60);
        assert_eq!(c[..8], ((1u64 << 30) / 512).to_le_bytes());
        assert_eq!(c[20..24], 4096u32.to_le_bytes());
        assert_eq!(c[34..36], 2u16.to_le_bytes());
        assert_eq!(c[44..48], 8u32.to_le_bytes());
        assert_eq!(c[56], 1);
        assert_eq!(d.capacity(), (1 << 30) / 512);
        assert_eq!(&d.id[..17], b"vhost-user-tmem-3");
    }

    #[test]
    fn features_offered() {
        let f = features();
        for bit in [1, 2, 6, 9, 10, 12, 13, 14, 32] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << 5), 0, "not read-only");
    }
}
