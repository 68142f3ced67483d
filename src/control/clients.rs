//! The control clients being served, and the cap on how many.
//!
//! A place is held from accept to disconnect. A client is *busy* from the
//! moment the first byte of a request line reaches its socket until its
//! reply is written, and each of those phases has a deadline, so a busy
//! place frees itself in bounded time. An idle client (between requests, or
//! one that never sends) costs a place only until someone needs it: when
//! every place is taken, the client idle longest is disconnected to make
//! room. So a newcomer is turned away only while every other client is in
//! the middle of a request.

use std::{
    fmt,
    net::Shutdown,
    os::unix::{io::AsRawFd, net::UnixStream},
    sync::Arc,
    time::Instant,
};

use log::info;
use parking_lot::Mutex;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AdmitError {
    #[error("too many control clients: all {0} are in the middle of a request; try again")]
    Full(usize),
    #[error("the daemon is shutting down")]
    Closed,
    #[error("cannot keep a handle on the client's socket")]
    Clone(#[source] std::io::Error),
}

/// The table of clients. Shared by the accept loop and the client threads.
pub struct Clients {
    max: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    closed: bool,
    slots: Vec<Slot>,
}

struct Slot {
    id: u64,
    /// A second handle on the client's socket, to shut it down from outside
    /// its thread: that wakes the thread from a blocked read or write.
    socket: UnixStream,
    /// `None` while a request is under way.
    idle_since: Option<Instant>,
}

impl Clients {
    pub fn new(max: usize) -> Arc<Clients> {
        Arc::new(Clients {
            max,
            table: Mutex::new(Table::default()),
        })
    }

    /// Gives `socket` a place, idle. With every place taken, the client idle
    /// longest is disconnected first; with none idle, the newcomer is refused.
    pub fn admit(self: &Arc<Self>, socket: &UnixStream) -> Result<Place, AdmitError> {
        let handle = socket.try_clone().map_err(AdmitError::Clone)?;
        let mut table = self.table.lock();
        if table.closed {
            return Err(AdmitError::Closed);
        }
        if table.slots.len() >= self.max {
            let longest_idle = table
                .slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| !request_waiting(&slot.socket))
                .filter_map(|(i, slot)| Some((i, slot.idle_since?)))
                .min_by_key(|&(_, since)| since);
            let Some((victim, since)) = longest_idle else {
                return Err(AdmitError::Full(self.max));
            };
            let slot = table.slots.swap_remove(victim);
            let _ = slot.socket.shutdown(Shutdown::Both);
            info!(
                "control: closed a client idle for {:.1?} to make room for a new one",
                since.elapsed()
            );
        }
        let id = table.next_id;
        table.next_id += 1;
        table.slots.push(Slot {
            id,
            socket: handle,
            idle_since: Some(Instant::now()),
        });
        Ok(Place {
            clients: self.clone(),
            id,
        })
    }

    /// Disconnects every client and admits no more. Their threads are not
    /// waited for: one may be inside a store call that never returns.
    pub fn close_all(&self) {
        let mut table = self.table.lock();
        table.closed = true;
        for slot in table.slots.drain(..) {
            let _ = slot.socket.shutdown(Shutdown::Both);
        }
    }

    /// Clients holding a place.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().slots.len()
    }

    /// Marks a client busy; `false` if it no longer holds a place.
    fn mark_busy(&self, id: u64) -> bool {
        let mut table = self.table.lock();
        match table.slots.iter_mut().find(|slot| slot.id == id) {
            Some(slot) => {
                slot.idle_since = None;
                true
            }
            None => false,
        }
    }
}

/// Whether a request has reached a client's socket that its thread has not
/// yet seen. Such a client is about to be busy, and counts as busy already.
fn request_waiting(socket: &UnixStream) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int, to a live local.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    rc == 0 && queued > 0
}

/// One client's place; given back when dropped.
pub struct Place {
    clients: Arc<Clients>,
    id: u64,
}

impl Place {
    /// A request has begun. `false` if the client has just been disconnected,
    /// to make room or because the server is stopping; its socket is shut
    /// down already.
    pub fn busy(&self) -> bool {
        self.clients.mark_busy(self.id)
    }

    /// The request is answered; the client waits for its next one. A client
    /// idle already keeps the time it became so: its thread marks it idle
    /// again before its first wait, and threads start in no set order, so
    /// resetting the time would let a newer client look the longest idle.
    pub fn idle(&self) {
        let mut table = self.clients.table.lock();
        if let Some(slot) = table.slots.iter_mut().find(|slot| slot.id == self.id) {
            slot.idle_since.get_or_insert_with(Instant::now);
        }
    }

    /// How long this client has been idle, if it is.
    #[cfg(test)]
    fn idle_for(&self) -> Option<std::time::Duration> {
        let table = self.clients.table.lock();
        let slot = table.slots.iter().find(|slot| slot.id == self.id)?;
        slot.idle_since.map(|since| since.elapsed())
    }
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.clients.table.lock().slots.retain(|slot| slot.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        time::Duration,
    };

    use assert_matches::assert_matches;

    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// Whether the table has shut down the daemon's end of this connection.
    fn was_closed(theirs: &mut UnixStream) -> bool {
        theirs.set_nonblocking(true).unwrap();
        matches!(theirs.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn places_up_to_the_cap_then_the_longest_idle_makes_room() {
        let clients = Clients::new(2);
        let (a, mut a_peer) = pair();
        let (b, mut b_peer) = pair();
        let (c, mut c_peer) = pair();
        let place_a = clients.admit(&a).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let place_b = clients.admit(&b).unwrap();
        assert_eq!(clients.len(), 2);
        assert!(place_a.idle_for().unwrap() > place_b.idle_for().unwrap());
        // `a` has been idle longest: it goes, `c` takes its place.
        let place_c = clients.admit(&c).unwrap();
        assert_eq!(clients.len(), 2);
        assert!(was_closed(&mut a_peer));
        assert!(!was_closed(&mut b_peer));
        assert!(!was_closed(&mut c_peer));
        // The evicted client learns it when its next request begins.
        assert!(!place_a.busy());
        assert!(place_b.busy());
        drop(place_a);
        assert_eq!(clients.len(), 2, "an evicted place is not given back twice");
        drop(place_c);
        assert_eq!(clients.len(), 1);
    }

    /// Each client's thread marks it idle before its first wait, in
    /// whatever order the threads run; the oldest connection stays the one
    /// idle longest.
    #[test]
    fn marking_an_idle_client_idle_again_keeps_its_age() {
        let clients = Clients::new(2);
        let (a, mut a_peer) = pair();
        let (b, _b_peer) = pair();
        let (c, _c_peer) = pair();
        let place_a = clients.admit(&a).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let place_b = clients.admit(&b).unwrap();
        place_b.idle();
        std::thread::sleep(Duration::from_millis(2));
        place_a.idle();
        assert!(place_a.idle_for().unwrap() > place_b.idle_for().unwrap());
        let _place_c = clients.admit(&c).unwrap();
        assert!(was_closed(&mut a_peer), "the oldest connection makes room");
        assert!(place_b.busy());
    }

    #[test]
    fn a_newcomer_is_refused_only_when_every_client_is_busy() {
        let clients = Clients::new(2);
        let (a, _a_peer) = pair();
        let (b, _b_peer) = pair();
        let (c, _c_peer) = pair();
        let place_a = clients.admit(&a).unwrap();
        let place_b = clients.admit(&b).unwrap();
        assert!(place_a.busy() && place_b.busy());
        assert_matches!(clients.admit(&c), Err(AdmitError::Full(2)));
        assert_eq!(clients.len(), 2);
        place_b.idle();
        let _place_c = clients.admit(&c).unwrap();
        assert!(!place_b.busy(), "b was idle, so b made room");
        drop(place_a);
        let (d, _d_peer) = pair();
        assert!(clients.admit(&d).is_ok(), "a place given back is free again");
    }

    #[test]
    fn a_client_whose_request_has_arrived_is_not_closed_to_make_room() {
        let clients = Clients::new(1);
        let (a, mut a_peer) = pair();
        let place_a = clients.admit(&a).unwrap();
        // Its thread has not looked yet, so the table still has it idle.
        a_peer.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
        let (b, _b_peer) = pair();
        assert_matches!(clients.admit(&b), Err(AdmitError::Full(1)));
        assert!(place_a.busy());
    }

    #[test]
    fn close_all_disconnects_everyone_and_admits_no_more() {
        let clients = Clients::new(4);
        let (a, mut a_peer) = pair();
        let place_a = clients.admit(&a).unwrap();
        assert!(place_a.busy());
        clients.close_all();
        assert!(was_closed(&mut a_peer));
        assert_eq!(clients.len(), 0);
        let (b, _b_peer) = pair();
        assert_matches!(clients.admit(&b), Err(AdmitError::Closed));
    }
}
