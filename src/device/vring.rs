//! The vring type the device hands vhost-user-backend: its own `VringRwLock`,
//! with one difference in how a kick is read.
//!
//! vhost-user-backend's worker reads a ring's kick eventfd when epoll reports
//! it, and ends the worker thread if that read fails. It can fail without
//! anything being wrong: epoll reports the old kick fd of a ring, and before
//! the worker reads it the VMM stops the ring (GET_VRING_BASE) and hands a
//! new, still empty kick fd (SET_VRING_KICK), as it does on every guest
//! reboot. The read then finds nothing (EAGAIN), the worker thread ends, and
//! the ring is never served again: the guest's next request hangs until its
//! driver declares the device dead. Here an empty kick is read as a spurious
//! one, which the virtio spec allows and the queue worker tolerates (it finds
//! no work and waits again).

use std::{fs::File, io};

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::GuestAddressSpace;

/// A `VringRwLock` whose empty kick reads as a spurious kick.
#[derive(Clone)]
pub struct TmemVring<M: GuestAddressSpace>(VringRwLock<M>);

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for TmemVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for TmemVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for TmemVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        VringRwLock::new(mem, max_queue_size).map(TmemVring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(&self, desc_table: u64, avail_ring: u64, used_ring: u64) -> Result<(), VirtQueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.0.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        match self.0.read_kick() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(self.0.get_ref().is_enabled()),
            other => other,
        }
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, IntoRawFd};

    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn vring() -> TmemVring<GuestMemoryAtomic<GuestMemoryMmap>> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        TmemVring::new(GuestMemoryAtomic::new(mem), 256).unwrap()
    }

    fn nonblocking_kick(v: &TmemVring<GuestMemoryAtomic<GuestMemoryMmap>>) -> EventFd {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: the dup is a fresh fd that only this File owns.
        let file = unsafe { File::from_raw_fd(fd.try_clone().unwrap().into_raw_fd()) };
        v.set_kick(Some(file));
        fd
    }

    /// The stale-event case: epoll said "readable", but the kick fd is a new,
    /// empty one. The plain VringRwLock fails here, which ends its worker.
    #[test]
    fn an_empty_kick_reads_as_a_spurious_one() {
        let v = vring();
        let _kick = nonblocking_kick(&v);
        v.set_enabled(true);
        assert!(
            v.0.read_kick().is_err(),
            "the wrapped ring fails on an empty kick"
        );
        assert!(v.read_kick().unwrap());
        v.set_enabled(false);
        assert!(!v.read_kick().unwrap());
    }

    #[test]
    fn a_real_kick_is_consumed() {
        let v = vring();
        let kick = nonblocking_kick(&v);
        v.set_enabled(true);
        kick.write(1).unwrap();
        assert!(v.read_kick().unwrap());
        assert_eq!(
            kick.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the kick was consumed"
        );
    }
}
