//! Per-guest budgets: what each guest holds, its cap (`max`), its weight,
//! and from those its fair share of the RAM budget.
//!
//! One record per guest, on a cache line of its own, updated with relaxed
//! atomics where the shards already change a guest's bytes (an index table
//! grows, an object is stored, spilled or freed): no lock, and a guest's
//! updates touch only its own line. A guest's use is what the stats report
//! for it: RAM = its index tables, its objects' records and their RAM
//! payload slots; spill = its objects' slots in the file. Allocator slack,
//! shard tables and holes belong to no guest.
//!
//! Fair share: `mem_limit * weight / (sum of the weights of the guests that
//! hold something)`. Only guests holding pages count, so an idle or
//! disconnected device leaves its part to the others (the scheme is work
//! conserving), and a guest that starts swapping gets its part back as the
//! others' pages spill. The shares are worked out when they are needed (on
//! the slow path: making room, a refused put, stats) by reading every
//! record, which costs one load per device.
//!
//! Records are fixed at [`MAX_GUESTS`]; guest ids from `MAX_GUESTS - 1` on
//! share the last one (weight 1, no cap, and it cannot be set): the daemon
//! numbers its devices from 0, so only a daemon with that many devices
//! would meet it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::PAGE_SIZE;

/// Guest records; ids at and past `MAX_GUESTS - 1` share the last.
pub const MAX_GUESTS: usize = 256;

const WORDS: usize = MAX_GUESTS / 64;

/// A multiple of every weight up to 2^16 would be exact; weights past that
/// round a little. Used to compare `ram / weight` without dividing.
const MAX_WEIGHT_PRODUCT: u64 = 1 << 32;

/// The most one stored page adds to its guest's account: a raw page's
/// payload (in RAM with its slot header, or in the file rounded up to spill
/// units), its object record and its index entry.
pub const PAGE_COST: u64 = PAGE_SIZE as u64 + PAGE_SIZE as u64 / 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("guest {guest}: caps and weights can be set for guests 0 to {} only", MAX_GUESTS - 2)]
    OutOfRange { guest: u32 },
    #[error("weight must be at least 1")]
    ZeroWeight,
    #[error("guest {guest} has its room set apart (a blk disk): it takes no max")]
    Reserved { guest: u32 },
}

/// One guest's budget as the stats show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestBudget {
    /// RAM held for the guest: index tables, object records, payload slots.
    pub ram_bytes: u64,
    /// The guest's slots in the spill file.
    pub spill_bytes: u64,
    /// Cap on `ram_bytes + spill_bytes`; none when absent.
    pub max_bytes: Option<u64>,
    pub weight: u32,
    /// Its part of the RAM budget while it holds pages (0 while it holds none).
    pub fair_share_bytes: u64,
    /// Puts refused because the guest was at its max.
    pub max_rejects: u64,
    /// Puts refused because the guest was over its share while both tiers
    /// were full and others had not reached theirs.
    pub share_rejects: u64,
}

/// Guests, as a set of record numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mask([u64; WORDS]);

impl Mask {
    fn insert(&mut self, slot: usize) {
        self.0[slot / 64] |= 1 << (slot % 64);
    }

    #[cfg(test)]
    pub fn insert_guest(&mut self, guest: u32) {
        self.insert(slot_of(guest));
    }

    pub fn contains(&self, guest: u32) -> bool {
        let slot = slot_of(guest);
        self.0[slot / 64] & (1 << (slot % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
}

fn slot_of(guest: u32) -> usize {
    (guest as usize).min(MAX_GUESTS - 1)
}

#[repr(align(64))]
struct Slot {
    ram: AtomicU64,
    /// Of `ram`, the payloads in RAM: what spilling can free.
    payload: AtomicU64,
    spill: AtomicU64,
    /// `u64::MAX`: no cap.
    max: AtomicU64,
    weight: AtomicU32,
    max_rejects: AtomicU64,
    share_rejects: AtomicU64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            ram: AtomicU64::new(0),
            payload: AtomicU64::new(0),
            spill: AtomicU64::new(0),
            max: AtomicU64::new(u64::MAX),
            weight: AtomicU32::new(1),
            max_rejects: AtomicU64::new(0),
            share_rejects: AtomicU64::new(0),
        }
    }
}

impl Slot {
    fn held(&self) -> u64 {
        self.ram
            .load(Ordering::Relaxed)
            .saturating_add(self.spill.load(Ordering::Relaxed))
    }
}

pub struct Shares {
    slots: Box<[Slot]>,
    /// One past the highest record ever used: the scans stop there.
    high: AtomicUsize,
    /// A spill write found the file full; cleared when a slot is freed.
    spill_full: AtomicBool,
    spill_limit: AtomicU64,
    kept: AtomicU64,
}

impl Default for Shares {
    fn default() -> Self {
        Shares {
            slots: (0..MAX_GUESTS).map(|_| Slot::default()).collect(),
            high: AtomicUsize::new(0),
            spill_full: AtomicBool::new(false),
            spill_limit: AtomicU64::new(0),
            kept: AtomicU64::new(0),
        }
    }
}

/// Signed change of a byte count.
fn add(counter: &AtomicU64, delta: i64) {
    // Two's complement: adding the wrapped value subtracts.
    counter.fetch_add(delta as u64, Ordering::Relaxed);
}

impl Shares {
    /// Host bytes of the records (fixed: part of the store's overhead).
    pub fn heap_bytes(&self) -> u64 {
        (self.slots.len() * std::mem::size_of::<Slot>()) as u64
    }

    fn slot(&self, guest: u32) -> &Slot {
        let i = slot_of(guest);
        if i >= self.high.load(Ordering::Relaxed) {
            self.high.fetch_max(i + 1, Ordering::Relaxed);
        }
        &self.slots[i]
    }

    fn used_slots(&self) -> &[Slot] {
        &self.slots[..self.high.load(Ordering::Relaxed).min(MAX_GUESTS)]
    }

    /// RAM held for `guest` grew (or, negative, shrank) by `delta` bytes.
    pub fn ram(&self, guest: u32, delta: i64) {
        if delta != 0 {
            add(&self.slot(guest).ram, delta);
        }
    }

    /// Of the guest's RAM, its payloads grew (or shrank) by `delta` bytes
    /// (counted in [`Shares::ram`] too).
    pub fn payload(&self, guest: u32, delta: i64) {
        if delta != 0 {
            add(&self.slot(guest).payload, delta);
        }
    }

    /// The guest's spill slots grew (or shrank) by `delta` bytes.
    pub fn spill(&self, guest: u32, delta: i64) {
        if delta != 0 {
            add(&self.slot(guest).spill, delta);
        }
    }

    pub fn set_max(&self, guest: u32, max: Option<u64>) -> Result<(), ShareError> {
        self.settable(guest)?
            .max
            .store(max.unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(())
    }

    pub fn set_weight(&self, guest: u32, weight: u32) -> Result<(), ShareError> {
        if weight == 0 {
            return Err(ShareError::ZeroWeight);
        }
        self.settable(guest)?.weight.store(weight, Ordering::Relaxed);
        Ok(())
    }

    fn settable(&self, guest: u32) -> Result<&Slot, ShareError> {
        if slot_of(guest) == MAX_GUESTS - 1 {
            return Err(ShareError::OutOfRange { guest });
        }
        Ok(self.slot(guest))
    }

    /// Whether one more page would take `guest` past its max. Two relaxed
    /// loads of the guest's own record: the hot-path check.
    ///
    /// Puts of one guest on several queues may pass it together, so the cap
    /// can be passed by a page per queue, and by the growth of one of the
    /// guest's own index tables.
    pub fn at_max(&self, guest: u32) -> bool {
        let s = &self.slots[slot_of(guest)];
        let max = s.max.load(Ordering::Relaxed);
        max != u64::MAX && s.held().saturating_add(PAGE_COST) > max
    }

    pub fn count_max_reject(&self, guest: u32) {
        self.slots[slot_of(guest)]
            .max_rejects
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_share_reject(&self, guest: u32) {
        self.slots[slot_of(guest)]
            .share_rejects
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The RAM the guests can have and the sum of the weights of those
    /// holding something (counting `also`, a guest about to store, whether
    /// it holds anything or not). The RAM is the limit less what the store
    /// holds for no guest (shard tables, allocator slack, the fixed part),
    /// so the shares add up to what the guests can actually be given, and
    /// when RAM is full some guest is at or over its share.
    fn pool(&self, limit: u64, used: u64, also: Option<usize>) -> (u64, u64) {
        let (mut ram, mut total) = (0u64, 0u64);
        for (i, s) in self.used_slots().iter().enumerate() {
            ram = ram.saturating_add(s.ram.load(Ordering::Relaxed));
            if s.held() > 0 || Some(i) == also {
                total += u64::from(s.weight.load(Ordering::Relaxed));
            }
        }
        let unowned = used.saturating_sub(ram);
        (self.usable(limit).saturating_sub(unowned), total)
    }

    fn share(pool: u64, weight: u32, total: u64) -> u64 {
        if total == 0 {
            return 0;
        }
        (u128::from(pool) * u128::from(weight) / u128::from(total)) as u64
    }

    /// Guests whose RAM is above their fair share (RAM budget `limit`, of
    /// which `used` is in use): where room is taken first. When none is
    /// (RAM counts as full before every byte is given out: holes left by
    /// pages just spilled are freed a chunk at a time), the guest with the
    /// most RAM payload per unit of weight: the one nearest to going over.
    pub fn over_share(&self, limit: u64, used: u64) -> Mask {
        let (pool, total) = self.pool(limit, used, None);
        let mut mask = Mask::default();
        let mut nearest: Option<(u128, usize)> = None;
        for (i, s) in self.used_slots().iter().enumerate() {
            let ram = s.ram.load(Ordering::Relaxed);
            let weight = s.weight.load(Ordering::Relaxed);
            if ram > Self::share(pool, weight, total) {
                mask.insert(i);
            }
            let payload = s.payload.load(Ordering::Relaxed);
            // ram / weight, compared without division.
            let per_weight = u128::from(ram) * u128::from(MAX_WEIGHT_PRODUCT / u64::from(weight.max(1)));
            if payload > 0 && !nearest.is_some_and(|(best, _)| per_weight <= best) {
                nearest = Some((per_weight, i));
            }
        }
        if let (true, Some((_, i))) = (mask.is_empty(), nearest) {
            mask.insert(i);
        }
        mask
    }

    /// Whether `guest` holds more RAM than its fair share.
    pub fn is_over(&self, guest: u32, limit: u64, used: u64) -> bool {
        let (pool, total) = self.pool(limit, used, None);
        let Some(s) = self.used_slots().get(slot_of(guest)) else {
            return false;
        };
        s.ram.load(Ordering::Relaxed) > Self::share(pool, s.weight.load(Ordering::Relaxed), total)
    }

    /// Whether `guest` must give way: it is over its fair share, and the
    /// room left is less than what the guests under their share may still
    /// claim. The room is the free RAM plus what can be freed by spilling
    /// the over-share guests' RAM payloads (as far as the spill file has
    /// space; metadata never spills). So the RAM that guests within their
    /// share are owed can always be made free, and when both tiers fill
    /// up, the over-share guests' puts are the ones refused.
    pub fn must_yield(&self, guest: u32, limit: u64, used: u64) -> bool {
        let me = slot_of(guest);
        let (pool, total) = self.pool(limit, used, Some(me));
        let (mut claim, mut spilled, mut movable) = (0u64, 0u64, 0u64);
        let mut over = false;
        for (i, s) in self.used_slots().iter().enumerate() {
            let ram = s.ram.load(Ordering::Relaxed);
            spilled = spilled.saturating_add(s.spill.load(Ordering::Relaxed));
            let share = Self::share(pool, s.weight.load(Ordering::Relaxed), total);
            if i == me {
                over = ram.saturating_add(PAGE_COST) > share;
            }
            if ram > share || i == me && over {
                movable = movable.saturating_add(s.payload.load(Ordering::Relaxed));
            } else if i != me && s.held() > 0 {
                claim = claim.saturating_add(share - ram);
            }
        }
        // Alone, or with everyone else at their share: nobody to make way for.
        if !over || claim == 0 {
            return false;
        }
        let spill_free = if self.spill_full() {
            0
        } else {
            self.spill_limit.load(Ordering::Relaxed).saturating_sub(spilled)
        };
        let room = self
            .usable(limit)
            .saturating_sub(used)
            .saturating_add(spill_free.min(movable));
        room < claim.saturating_add(PAGE_COST)
    }

    /// What of `limit` pages can be given: the store keeps `kept` bytes
    /// free for compaction to move payloads into.
    fn usable(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.kept.load(Ordering::Relaxed))
    }

    /// RAM the store keeps free below its limit (see [`Shares::usable`]).
    pub fn set_kept(&self, bytes: u64) {
        self.kept.store(bytes, Ordering::Relaxed);
    }

    /// The spill file's limit (0: no spill tier), for [`Shares::must_yield`].
    pub fn set_spill_limit(&self, bytes: u64) {
        self.spill_limit.store(bytes, Ordering::Relaxed);
    }

    pub fn spill_full(&self) -> bool {
        self.spill_full.load(Ordering::Relaxed)
    }

    pub fn set_spill_full(&self) {
        if !self.spill_full() {
            self.spill_full.store(true, Ordering::Relaxed);
        }
    }

    /// A spill slot was given back: the file may take a page again.
    pub fn spill_freed(&self) {
        if self.spill_full() {
            self.spill_full.store(false, Ordering::Relaxed);
        }
    }

    /// `guest`'s budget for the stats, with its share of the RAM budget
    /// `limit` (of which `used` is in use).
    pub fn view(&self, guest: u32, limit: u64, used: u64) -> GuestBudget {
        let s = &self.slots[slot_of(guest)];
        let held = s.held() > 0;
        let (pool, total) = self.pool(limit, used, None);
        let weight = s.weight.load(Ordering::Relaxed);
        let max = s.max.load(Ordering::Relaxed);
        GuestBudget {
            ram_bytes: s.ram.load(Ordering::Relaxed),
            spill_bytes: s.spill.load(Ordering::Relaxed),
            max_bytes: (max != u64::MAX).then_some(max),
            weight,
            fair_share_bytes: if held { Self::share(pool, weight, total) } else { 0 },
            max_rejects: s.max_rejects.load(Ordering::Relaxed),
            share_rejects: s.share_rejects.load(Ordering::Relaxed),
        }
    }

    /// Guest ids with a record that holds something or was set (for the stats).
    pub fn listed(&self) -> impl Iterator<Item = u32> + '_ {
        self.used_slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.held() > 0
                    || s.max.load(Ordering::Relaxed) != u64::MAX
                    || s.weight.load(Ordering::Relaxed) != 1
            })
            .map(|(i, _)| i as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_weights_of_the_guests_holding_pages() {
        let s = Shares::default();
        let limit = 1200;
        s.set_weight(0, 1).unwrap();
        s.set_weight(1, 2).unwrap();
        s.set_weight(2, 3).unwrap();
        // Nobody holds anything: no share, nobody over.
        assert_eq!(s.view(0, limit, 0).fair_share_bytes, 0);
        assert!(s.over_share(limit, 0).is_empty());
        s.ram(0, 500);
        // Alone, guest 0 may have it all.
        assert_eq!(s.view(0, limit, 0).fair_share_bytes, 1200);
        s.ram(1, 100);
        // Guest 2 holds nothing: its weight does not count.
        assert_eq!(s.view(0, limit, 0).fair_share_bytes, 400);
        assert_eq!(s.view(1, limit, 0).fair_share_bytes, 800);
        let over = s.over_share(limit, 0);
        assert!(over.contains(0) && !over.contains(1) && !over.contains(2));
        s.spill(2, 4096);
        assert_eq!(s.view(0, limit, 0).fair_share_bytes, 200);
        assert_eq!(s.view(2, limit, 0).fair_share_bytes, 600);
        s.ram(0, -500);
        s.ram(1, -100);
        s.spill(2, -4096);
        assert!(s.listed().all(|g| s.view(g, limit, 0).ram_bytes == 0));
    }

    #[test]
    fn a_cap_counts_ram_and_spill_and_one_more_page() {
        let s = Shares::default();
        assert!(!s.at_max(3), "no cap");
        s.set_max(3, Some(2 * PAGE_SIZE as u64 + PAGE_COST)).unwrap();
        s.ram(3, PAGE_SIZE as i64);
        assert!(!s.at_max(3));
        s.spill(3, PAGE_SIZE as i64);
        assert!(!s.at_max(3), "a third page reaches the cap, not past it");
        s.ram(3, 1);
        assert!(s.at_max(3));
        s.set_max(3, None).unwrap();
        assert!(!s.at_max(3));
        assert_eq!(s.view(3, 1 << 20, 0).max_bytes, None);
        assert_eq!(s.set_weight(3, 0), Err(ShareError::ZeroWeight));
        assert_eq!(
            s.set_max(MAX_GUESTS as u32 - 1, Some(1)),
            Err(ShareError::OutOfRange { guest: 255 })
        );
        assert_eq!(
            s.set_weight(u32::MAX, 2),
            Err(ShareError::OutOfRange { guest: u32::MAX })
        );
    }

    #[test]
    fn an_over_share_guest_yields_to_the_claims_of_the_others() {
        let s = Shares::default();
        let limit = 100 * PAGE_SIZE as u64;
        // Attacker 0 holds 70 pages' worth, victim 1 holds 20 (its share is 50).
        s.ram(0, 70 * PAGE_SIZE as i64);
        s.ram(1, 20 * PAGE_SIZE as i64);
        let used = 95 * PAGE_SIZE as u64;
        assert!(
            s.must_yield(0, limit, used),
            "5 pages free, the victim may claim 30"
        );
        assert!(!s.must_yield(1, limit, used), "the victim is under its share");
        assert!(
            !s.must_yield(0, limit, 60 * PAGE_SIZE as u64),
            "40 free: room for both"
        );
        // With the victim's weight raised to 4 its claim grows.
        s.set_weight(1, 4).unwrap();
        assert!(s.must_yield(0, limit, 60 * PAGE_SIZE as u64));
        // Payloads that can spill to a file with room count as room...
        s.set_spill_limit(1 << 20);
        s.payload(0, 70 * PAGE_SIZE as i64);
        assert!(!s.must_yield(0, limit, used));
        // ...as far as the file has room.
        s.spill(0, (1 << 20) - 10 * PAGE_SIZE as i64);
        assert!(s.must_yield(0, limit, used));
        s.spill(0, -(1 << 19));
        assert!(!s.must_yield(0, limit, used));
        s.set_spill_full();
        assert!(s.must_yield(0, limit, used));
        s.spill_freed();
        assert!(!s.must_yield(0, limit, used));
    }
}
