//! Packing compressed payloads into large chunks, with compaction.
//!
//! Like zsmalloc, payloads of any length share large chunks, so host memory
//! follows the compressed bytes rather than whole pages. Unlike zsmalloc we do
//! not round payloads up to size classes: with one allocator per object shard,
//! a half-empty chunk per class per shard cost more than the rounding saved
//! (about 10% on a 190 MB corpus). Instead payloads are appended, byte-packed,
//! to one of a few open chunks, each behind a 4-byte header naming its object
//! (or, once freed, the hole's length). Freed payloads leave holes; the owner
//! compacts the sparsest chunk, moving its live payloads into the open chunks
//! and giving the chunk back to the host, when holes add up or RAM is short.
//!
//! The owner (one object shard) holds a lock around every call.

use super::PAGE_SIZE;

/// Fifteen raw pages with their headers fill a chunk exactly (the most that
/// keeps offsets in 16 bits); compressed payloads are shorter and pack into
/// the open chunks' tails. Longer chunks abandon fewer tails: 15 pages beat
/// 8 on all three corpora in docs/design.md (python +0.1%, sort +0.5%, mix
/// +0.8% ratio), and 4 lost 1-3%.
pub const CHUNK: usize = 15 * (PAGE_SIZE + HDR);
pub const HDR: usize = 4;
/// Open chunks take new payloads; several, so short payloads fill tails.
const OPEN: usize = 4;
const FREE_BIT: u32 = 1 << 31;
/// Chunk ids a shard may use: with the 16-bit offset they fill the 40-bit
/// location of an object record (1 TB of chunks per shard).
pub const MAX_CHUNKS: usize = 1 << 24;
const NIL: u32 = u32::MAX;

/// Where a payload lives in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub chunk: u32,
    /// Offset of the payload (its header is just before it).
    pub off: u32,
}

impl Loc {
    /// 40 bits: chunk id (below [`MAX_CHUNKS`]) above a 16-bit offset (chunks are under 64 KiB).
    pub fn pack(self) -> u64 {
        (u64::from(self.chunk) << 16) | u64::from(self.off)
    }

    pub fn unpack(v: u64) -> Loc {
        Loc {
            chunk: (v >> 16) as u32,
            off: u32::from(v as u16),
        }
    }
}

/// 16 bytes: a thin pointer (`None` once the chunk went back) and 16-bit
/// counts, which a chunk under 64 KiB needs no more than.
struct Chunk {
    data: Option<Box<[u8; CHUNK]>>,
    /// Bytes handed out from the start (headers included).
    used: u16,
    /// Bytes of live payloads and their headers.
    live: u16,
    open: bool,
}

impl Chunk {
    fn data(&self) -> &[u8] {
        self.data.as_deref().map_or(&[], |d| &d[..])
    }

    fn data_mut(&mut self) -> &mut [u8] {
        self.data.as_deref_mut().map_or(&mut [], |d| &mut d[..])
    }
}

const _: () = assert!(std::mem::size_of::<Chunk>() == 16 && CHUNK <= u16::MAX as usize);

/// Chunk records to add when the table is full: a quarter more (at least
/// 4), not double, so its slack stays small.
fn table_step(cap: usize) -> usize {
    (cap / 4).max(4)
}

pub struct ChunkAlloc {
    chunks: Vec<Chunk>,
    spare_ids: Vec<u32>,
    open: [u32; OPEN],
    chunk_bytes: u64,
    live_bytes: u64,
    /// Unused room at the end of the open chunks (not garbage: still usable).
    open_room: u64,
}

impl Default for ChunkAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkAlloc {
    pub fn new() -> Self {
        ChunkAlloc {
            chunks: Vec::new(),
            spare_ids: Vec::new(),
            open: [NIL; OPEN],
            chunk_bytes: 0,
            live_bytes: 0,
            open_room: 0,
        }
    }

    /// Host bytes held: chunks plus this allocator's own tables.
    pub fn heap_bytes(&self) -> u64 {
        self.chunk_bytes
            + (self.chunks.capacity() * std::mem::size_of::<Chunk>() + self.spare_ids.capacity() * 4) as u64
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Bytes held in holes and abandoned chunk tails: what compaction can win back.
    pub fn garbage(&self) -> u64 {
        self.chunk_bytes - self.live_bytes - self.open_room
    }

    fn room(&self, id: u32) -> usize {
        CHUNK - self.chunks[id as usize].used as usize
    }

    /// The open chunk a payload of `len` bytes goes to, if one has room (first fit).
    fn open_fit(&self, len: usize) -> Option<u32> {
        self.open
            .iter()
            .copied()
            .find(|&id| id != NIL && self.room(id) >= HDR + len)
    }

    /// Whether a new chunk still gets an id that packs into a record's location.
    pub fn can_grow(&self) -> bool {
        !self.spare_ids.is_empty() || self.chunks.len() < MAX_CHUNKS
    }

    /// Bytes a new payload of `len` would take from the host (0 if an open chunk has room).
    pub fn growth_for(&self, len: usize) -> usize {
        if self.open_fit(len).is_some() {
            0
        } else if self.spare_ids.is_empty() && self.chunks.len() == self.chunks.capacity() {
            CHUNK + table_step(self.chunks.capacity()) * std::mem::size_of::<Chunk>()
        } else {
            CHUNK
        }
    }

    /// Stores `len` bytes for object `id`, adding a chunk if no open one has room.
    pub fn alloc(&mut self, len: usize, id: u32) -> Loc {
        debug_assert!(len <= PAGE_SIZE && id & FREE_BIT == 0);
        let chunk = match self.open_fit(len) {
            Some(c) => c,
            None => self.open_new_chunk(),
        };
        let need = (HDR + len) as u16;
        let c = &mut self.chunks[chunk as usize];
        let at = usize::from(c.used);
        c.data_mut()[at..at + HDR].copy_from_slice(&id.to_le_bytes());
        c.used += need;
        c.live += need;
        self.live_bytes += u64::from(need);
        self.open_room -= u64::from(need);
        Loc {
            chunk,
            off: (at + HDR) as u32,
        }
    }

    /// Marks a payload free; a chunk that empties goes back to the host.
    pub fn free(&mut self, loc: Loc, len: usize) {
        let need = (HDR + len) as u16;
        let c = &mut self.chunks[loc.chunk as usize];
        let at = loc.off as usize - HDR;
        c.data_mut()[at..at + HDR].copy_from_slice(&(FREE_BIT | len as u32).to_le_bytes());
        c.live -= need;
        self.live_bytes -= u64::from(need);
        if c.live == 0 {
            // An empty chunk goes back even if open: spilling must free RAM.
            if c.open {
                self.close(loc.chunk);
            }
            self.release(loc.chunk);
        }
    }

    pub fn bytes(&self, loc: Loc, len: usize) -> &[u8] {
        let at = loc.off as usize;
        &self.chunks[loc.chunk as usize].data()[at..at + len]
    }

    pub fn bytes_mut(&mut self, loc: Loc, len: usize) -> &mut [u8] {
        let at = loc.off as usize;
        &mut self.chunks[loc.chunk as usize].data_mut()[at..at + len]
    }

    /// The chunk with the fewest live bytes, if compacting it pays (at most
    /// three quarters live, counting an open chunk's unused room as live: it
    /// is not waste). An open chunk chosen here is closed first.
    /// Whether chunk `id` holds data and takes no new payloads: a chunk a
    /// compaction that stopped part-way can go on draining.
    pub fn closed(&self, id: u32) -> bool {
        self.chunks
            .get(id as usize)
            .is_some_and(|c| c.data.is_some() && !c.open)
    }

    pub fn sparsest(&mut self) -> Option<u32> {
        let pick = self
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.data.is_some())
            .map(|(i, c)| {
                let room = if c.open { CHUNK - c.used as usize } else { 0 };
                (i as u32, c.live as usize + room)
            })
            .filter(|&(_, keep)| keep <= CHUNK * 3 / 4)
            .min_by_key(|&(_, keep)| keep)
            .map(|(i, _)| i)?;
        if self.chunks[pick as usize].open {
            self.close(pick);
        }
        Some(pick)
    }

    /// Takes a chunk out of the open set; its unused room becomes garbage.
    fn close(&mut self, id: u32) {
        let room = self.room(id) as u64;
        self.open_room -= room;
        self.chunks[id as usize].open = false;
        if let Some(slot) = self.open.iter_mut().find(|s| **s == id) {
            *slot = NIL;
        }
    }

    /// The first live payload whose header is at or after `from` in `chunk`:
    /// (object id, its Loc). Walking needs no lengths from the caller: a live
    /// payload is returned, a hole's header holds its length.
    pub fn next_live(&self, chunk: u32, from: u32) -> Option<(u32, Loc)> {
        let c = &self.chunks[chunk as usize];
        let mut at = from as usize;
        while at + HDR <= c.used as usize {
            let mut h = [0u8; HDR];
            h.copy_from_slice(&c.data()[at..at + HDR]);
            let h = u32::from_le_bytes(h);
            let loc = Loc {
                chunk,
                off: (at + HDR) as u32,
            };
            if h & FREE_BIT != 0 {
                at += HDR + (h & !FREE_BIT) as usize;
            } else {
                return Some((h, loc));
            }
        }
        None
    }

    /// Moves one payload of `len` bytes (object `id`) out of its chunk into an
    /// open chunk, returning the new place. The caller has reserved any growth.
    pub fn relocate(&mut self, from: Loc, len: usize, id: u32) -> Loc {
        let mut tmp = [0u8; PAGE_SIZE];
        tmp[..len].copy_from_slice(self.bytes(from, len));
        let to = self.alloc(len, id);
        self.bytes_mut(to, len).copy_from_slice(&tmp[..len]);
        self.free(from, len);
        to
    }

    fn open_new_chunk(&mut self) -> u32 {
        // Retire the open chunk with the least room; its tail becomes garbage.
        let slot = (0..OPEN)
            .min_by_key(|&i| match self.open[i] {
                NIL => 0,
                id => self.room(id) + 1,
            })
            .unwrap_or(0);
        let old = self.open[slot];
        if old != NIL {
            self.close(old);
            if self.chunks[old as usize].live == 0 {
                self.release(old);
            }
        }
        let chunk = Chunk {
            // Zeroed by the allocator (fresh pages come from the host as
            // they are touched); the length is CHUNK, so the conversion holds.
            data: vec![0u8; CHUNK].into_boxed_slice().try_into().ok(),
            used: 0,
            live: 0,
            open: true,
        };
        self.chunk_bytes += CHUNK as u64;
        self.open_room += CHUNK as u64;
        let id = match self.spare_ids.pop() {
            Some(id) => {
                self.chunks[id as usize] = chunk;
                id
            }
            None => {
                if self.chunks.len() == self.chunks.capacity() {
                    self.chunks.reserve_exact(table_step(self.chunks.capacity()));
                }
                self.chunks.push(chunk);
                (self.chunks.len() - 1) as u32
            }
        };
        self.open[slot] = id;
        id
    }

    fn release(&mut self, id: u32) {
        let c = &mut self.chunks[id as usize];
        self.chunk_bytes -= c.data().len() as u64;
        c.data = None;
        c.used = 0;
        self.spare_ids.push(id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn check_totals(a: &ChunkAlloc) {
        let live: u64 = a.chunks.iter().map(|c| u64::from(c.live)).sum();
        assert_eq!(live, a.live_bytes);
        let held: u64 = a.chunks.iter().map(|c| c.data().len() as u64).sum();
        assert_eq!(held, a.chunk_bytes);
    }

    #[test]
    fn locations_pack_into_a_records_40_bits() {
        const { assert!(CHUNK <= 1 << 16) };
        let loc = Loc {
            chunk: (MAX_CHUNKS - 1) as u32,
            off: (CHUNK - 1) as u32,
        };
        assert!(loc.pack() < 1 << crate::store::slab::LOC_BITS);
        assert_eq!(Loc::unpack(loc.pack()), loc);
    }

    #[test]
    fn payloads_are_packed_without_rounding() {
        let mut a = ChunkAlloc::new();
        for id in 0..90 {
            a.alloc(333, id);
        }
        assert_eq!(a.chunk_bytes(), CHUNK as u64);
        assert_eq!(a.live_bytes, 90 * (333 + HDR as u64));
        assert_eq!(a.garbage(), 0);
        assert_eq!(a.growth_for(100), 0);
        check_totals(&a);
    }

    #[test]
    fn payloads_survive_churn_and_relocation() {
        let mut a = ChunkAlloc::new();
        let mut live: HashMap<u32, (Loc, Vec<u8>)> = HashMap::new();
        let mut x = 12345u64;
        for id in 0..20_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (x >> 33) as usize % PAGE_SIZE;
            if x % 3 == 0 && !live.is_empty() {
                let key = *live.keys().next().unwrap();
                let (loc, data) = live.remove(&key).unwrap();
                assert_eq!(a.bytes(loc, data.len()), &data[..]);
                a.free(loc, data.len());
            } else {
                let loc = a.alloc(len, id);
                let data: Vec<u8> = (0..len).map(|i| (id as usize + i) as u8).collect();
                a.bytes_mut(loc, len).copy_from_slice(&data);
                live.insert(id, (loc, data));
            }
            if id % 1000 == 999 {
                // Compact the sparsest chunk the way an object shard does.
                if let Some(src) = a.sparsest() {
                    let mut from = 0;
                    while let Some((oid, loc)) = a.next_live(src, from) {
                        let len = live[&oid].1.len();
                        from = loc.off + len as u32;
                        let to = a.relocate(loc, len, oid);
                        live.get_mut(&oid).unwrap().0 = to;
                    }
                    assert!(
                        a.chunks[src as usize].data.is_none(),
                        "compacted chunk is returned"
                    );
                }
            }
        }
        check_totals(&a);
        for (loc, data) in live.values() {
            assert_eq!(a.bytes(*loc, data.len()), &data[..]);
        }
    }

    #[test]
    fn freeing_everything_returns_the_memory() {
        let mut a = ChunkAlloc::new();
        let locs: Vec<Loc> = (0..200).map(|id| a.alloc(3000, id)).collect();
        assert!(a.chunk_bytes() >= 200 * 3004);
        for loc in &locs {
            a.free(*loc, 3000);
        }
        assert_eq!(a.chunk_bytes(), 0);
        assert_eq!(a.garbage(), 0);
        let before = a.chunks.len();
        for id in 0..200 {
            a.alloc(3000, id);
        }
        assert_eq!(a.chunks.len(), before, "chunk records are recycled");
        check_totals(&a);
    }

    #[test]
    fn holes_count_as_garbage_and_tails_fill() {
        let mut a = ChunkAlloc::new();
        let big: Vec<Loc> = (0..7).map(|id| a.alloc(4096, id)).collect();
        // 7 raw pages leave room for an eighth; a 1000-byte payload fits there.
        let room_before = a.open_room;
        a.alloc(1000, 99);
        assert_eq!(a.chunk_bytes(), CHUNK as u64);
        assert_eq!(a.open_room, room_before - 1004);
        a.free(big[3], 4096);
        assert_eq!(a.garbage(), 4100);
    }
}
