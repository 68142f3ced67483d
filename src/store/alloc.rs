//! Size-class allocator over chunks, in the spirit of zsmalloc.
//!
//! Compressed payloads are rounded up to a class (every [`CLASS_STEP`] bytes up
//! to one page) and packed into chunks of one to eight host pages holding slots
//! of one class only; the chunk length per class is the one that wastes least
//! at its tail. A free slot stores the index of the next free slot in its first
//! two bytes, so free space costs no memory beyond itself. Chunks with a free
//! slot are on a doubly linked list per class; a chunk that empties is given
//! back to the host at once.
//!
//! The owner (one object shard) holds a lock around every call, so nothing here
//! is shared between threads.

use super::PAGE_SIZE;

pub const CLASS_STEP: usize = 32;
pub const NUM_CLASSES: usize = PAGE_SIZE / CLASS_STEP;
const MAX_CHUNK_PAGES: usize = 8;
const NIL: u32 = u32::MAX;
const NO_SLOT: u16 = u16::MAX;

/// The class that holds `len` bytes (`1..=PAGE_SIZE`).
pub fn class_of(len: usize) -> usize {
    len.clamp(1, PAGE_SIZE).div_ceil(CLASS_STEP) - 1
}

pub fn class_size(class: usize) -> usize {
    (class + 1) * CLASS_STEP
}

/// Bytes of one chunk of `class`: the page count with the least tail waste.
pub fn chunk_len(class: usize) -> usize {
    let size = class_size(class);
    let waste = |pages: usize| (pages * PAGE_SIZE) % size * MAX_CHUNK_PAGES / pages;
    let pages = (1..=MAX_CHUNK_PAGES).min_by_key(|&p| waste(p)).unwrap_or(1);
    pages * PAGE_SIZE
}

/// Where a payload lives in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub chunk: u32,
    pub slot: u16,
}

impl Loc {
    pub fn pack(self) -> u64 {
        (u64::from(self.chunk) << 16) | u64::from(self.slot)
    }

    pub fn unpack(v: u64) -> Loc {
        Loc {
            chunk: (v >> 16) as u32,
            slot: v as u16,
        }
    }
}

struct Chunk {
    data: Box<[u8]>,
    prev: u32,
    next: u32,
    used: u16,
    /// Slots at and above `bump` have never been handed out.
    bump: u16,
    free_head: u16,
    class: u8,
    listed: bool,
}

pub struct SizeClassAlloc {
    chunks: Vec<Chunk>,
    spare_ids: Vec<u32>,
    /// Head of the list of chunks with a free slot, per class.
    partial: Vec<u32>,
    chunk_bytes: u64,
}

impl Default for SizeClassAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl SizeClassAlloc {
    pub fn new() -> Self {
        SizeClassAlloc {
            chunks: Vec::new(),
            spare_ids: Vec::new(),
            partial: vec![NIL; NUM_CLASSES],
            chunk_bytes: 0,
        }
    }

    /// Host bytes held: chunks plus this allocator's own tables.
    pub fn heap_bytes(&self) -> u64 {
        self.chunk_bytes
            + (self.chunks.capacity() * std::mem::size_of::<Chunk>()
                + self.spare_ids.capacity() * 4
                + self.partial.capacity() * 4) as u64
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Bytes a new allocation of `len` would take from the host (0 if a slot is free).
    pub fn growth_for(&self, len: usize) -> usize {
        let class = class_of(len);
        if self.partial[class] != NIL {
            0
        } else {
            chunk_len(class)
        }
    }

    /// Takes a slot for `len` bytes, adding a chunk if its class has no free slot.
    pub fn alloc(&mut self, len: usize) -> Loc {
        let class = class_of(len);
        let mut id = self.partial[class];
        if id == NIL {
            id = self.new_chunk(class);
        }
        let size = class_size(class);
        let chunk = &mut self.chunks[id as usize];
        let slot = if chunk.free_head != NO_SLOT {
            let s = chunk.free_head;
            let at = usize::from(s) * size;
            chunk.free_head = u16::from_ne_bytes([chunk.data[at], chunk.data[at + 1]]);
            s
        } else {
            let s = chunk.bump;
            chunk.bump += 1;
            s
        };
        chunk.used += 1;
        let full = chunk.free_head == NO_SLOT && usize::from(chunk.bump) * size + size > chunk.data.len();
        if full {
            self.unlink(id);
        }
        Loc { chunk: id, slot }
    }

    /// Returns a slot; the chunk goes back to the host when it empties.
    pub fn free(&mut self, loc: Loc) {
        let id = loc.chunk;
        let chunk = &mut self.chunks[id as usize];
        let size = class_size(usize::from(chunk.class));
        let at = usize::from(loc.slot) * size;
        chunk.data[at..at + 2].copy_from_slice(&chunk.free_head.to_ne_bytes());
        chunk.free_head = loc.slot;
        chunk.used -= 1;
        if chunk.used == 0 {
            if chunk.listed {
                self.unlink(id);
            }
            let chunk = &mut self.chunks[id as usize];
            self.chunk_bytes -= chunk.data.len() as u64;
            chunk.data = Box::default();
            self.spare_ids.push(id);
        } else if !chunk.listed {
            self.link(id);
        }
    }

    pub fn bytes(&self, loc: Loc, len: usize) -> &[u8] {
        let chunk = &self.chunks[loc.chunk as usize];
        let at = usize::from(loc.slot) * class_size(usize::from(chunk.class));
        &chunk.data[at..at + len]
    }

    pub fn bytes_mut(&mut self, loc: Loc, len: usize) -> &mut [u8] {
        let chunk = &mut self.chunks[loc.chunk as usize];
        let at = usize::from(loc.slot) * class_size(usize::from(chunk.class));
        &mut chunk.data[at..at + len]
    }

    fn new_chunk(&mut self, class: usize) -> u32 {
        let len = chunk_len(class);
        let chunk = Chunk {
            data: vec![0u8; len].into_boxed_slice(),
            prev: NIL,
            next: NIL,
            used: 0,
            bump: 0,
            free_head: NO_SLOT,
            class: class as u8,
            listed: false,
        };
        self.chunk_bytes += len as u64;
        let id = match self.spare_ids.pop() {
            Some(id) => {
                self.chunks[id as usize] = chunk;
                id
            }
            None => {
                self.chunks.push(chunk);
                (self.chunks.len() - 1) as u32
            }
        };
        self.link(id);
        id
    }

    fn link(&mut self, id: u32) {
        let class = usize::from(self.chunks[id as usize].class);
        let head = self.partial[class];
        if head != NIL {
            self.chunks[head as usize].prev = id;
        }
        let chunk = &mut self.chunks[id as usize];
        chunk.prev = NIL;
        chunk.next = head;
        chunk.listed = true;
        self.partial[class] = id;
    }

    fn unlink(&mut self, id: u32) {
        let chunk = &mut self.chunks[id as usize];
        let (prev, next, class) = (chunk.prev, chunk.next, usize::from(chunk.class));
        chunk.listed = false;
        chunk.prev = NIL;
        chunk.next = NIL;
        if prev == NIL {
            self.partial[class] = next;
        } else {
            self.chunks[prev as usize].next = next;
        }
        if next != NIL {
            self.chunks[next as usize].prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn classes_cover_every_length() {
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(32), 0);
        assert_eq!(class_of(33), 1);
        assert_eq!(class_of(PAGE_SIZE), NUM_CLASSES - 1);
        for len in 1..=PAGE_SIZE {
            let c = class_of(len);
            assert!(class_size(c) >= len && class_size(c) - len < CLASS_STEP);
            assert!(chunk_len(c) >= class_size(c));
        }
    }

    #[test]
    fn chunk_length_limits_tail_waste() {
        for c in 0..NUM_CLASSES {
            let waste = chunk_len(c) % class_size(c);
            assert!(waste * 100 / chunk_len(c) <= 12, "class {c} wastes {waste}");
        }
    }

    #[test]
    fn payloads_do_not_overlap_and_survive_churn() {
        let mut a = SizeClassAlloc::new();
        let mut live: HashMap<u64, (Loc, Vec<u8>)> = HashMap::new();
        let mut x = 12345u64;
        for step in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (x >> 33) as usize % PAGE_SIZE;
            if x % 3 == 0 && !live.is_empty() {
                let key = *live.keys().next().unwrap();
                let (loc, data) = live.remove(&key).unwrap();
                assert_eq!(a.bytes(loc, data.len()), &data[..]);
                a.free(loc);
            } else {
                let loc = a.alloc(len);
                let data: Vec<u8> = (0..len).map(|i| (step as usize + i) as u8).collect();
                a.bytes_mut(loc, len).copy_from_slice(&data);
                live.insert(step, (loc, data));
            }
        }
        for (loc, data) in live.values() {
            assert_eq!(a.bytes(*loc, data.len()), &data[..]);
        }
    }

    #[test]
    fn freed_slots_are_reused_and_empty_chunks_returned() {
        let mut a = SizeClassAlloc::new();
        let locs: Vec<Loc> = (0..301).map(|_| a.alloc(1000)).collect();
        let held = a.chunk_bytes();
        assert!(held >= 301 * 1024);
        assert_eq!(a.growth_for(1000), 0, "last chunk still has room");
        a.free(locs[5]);
        assert_eq!(a.alloc(1000), locs[5]);
        for loc in &locs {
            a.free(*loc);
        }
        assert_eq!(a.chunk_bytes(), 0);
        assert_eq!(a.growth_for(1000), chunk_len(class_of(1000)));
        // Chunk records are recycled, not grown.
        let before = a.chunks.len();
        for _ in 0..301 {
            a.alloc(1000);
        }
        assert_eq!(a.chunks.len(), before);
    }

    #[test]
    fn chunk_bytes_track_host_memory() {
        let mut a = SizeClassAlloc::new();
        let l1 = a.alloc(4096);
        let l2 = a.alloc(4096);
        assert_eq!(a.chunk_bytes(), 2 * 4096);
        a.free(l1);
        assert_eq!(a.chunk_bytes(), 4096);
        a.free(l2);
        assert_eq!(a.chunk_bytes(), 0);
        assert!(a.heap_bytes() > 0, "own tables are counted");
    }
}
