//! Who may talk to the control socket: the daemon's own user and root,
//! judged by the credentials the kernel recorded when the peer connected.
//!
//! The socket's mode (0600) already keeps other users out, but a mode can be
//! widened, and a connected socket can be handed to another process. The
//! credentials cannot be forged: they are the connecting process's, taken
//! by the kernel at `connect(2)`.

use std::{fmt, io, os::unix::io::AsRawFd};

use thiserror::Error;

/// The identity of a connected peer, as the kernel recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    /// The effective uid at the time it connected.
    pub uid: u32,
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot read the client's credentials")]
    Credentials(#[source] io::Error),
    #[error("the kernel returned {len} bytes of credentials, expected {expected}")]
    ShortCredentials { len: usize, expected: usize },
    #[error("uid {} (pid {}) may not use this control socket: only {} may", peer.uid, peer.pid, Allowed(*daemon_uid))]
    Refused { peer: Peer, daemon_uid: u32 },
}

/// Who is admitted, in words.
struct Allowed(u32);

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("root"),
            uid => write!(f, "uid {uid} and root"),
        }
    }
}

/// The peer's credentials, from `SO_PEERCRED`.
pub fn peer_of(socket: &impl AsRawFd) -> Result<Peer, PeerError> {
    // Anything the kernel does not fill in stays an identity that is refused.
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let expected = std::mem::size_of::<libc::ucred>();
    let mut len = expected as libc::socklen_t;
    // SAFETY: `cred` is a live, writable ucred and `len` holds its size, so the
    // kernel writes at most that many bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PeerError::Credentials(io::Error::last_os_error()));
    }
    if len as usize != expected {
        return Err(PeerError::ShortCredentials {
            len: len as usize,
            expected,
        });
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// Admits the daemon's own user and root; refuses everyone else.
pub fn admit(peer: Peer, daemon_uid: u32) -> Result<Peer, PeerError> {
    if peer.uid == daemon_uid || peer.uid == 0 {
        Ok(peer)
    } else {
        Err(PeerError::Refused { peer, daemon_uid })
    }
}

/// The uid peers are compared with: the effective one, as `SO_PEERCRED`
/// reports theirs.
pub fn daemon_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use assert_matches::assert_matches;

    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer { pid: 4242, uid }
    }

    #[test]
    fn the_daemons_user_and_root_are_admitted() {
        assert_eq!(admit(peer(1000), 1000).unwrap(), peer(1000));
        assert_eq!(admit(peer(0), 1000).unwrap(), peer(0));
        assert_eq!(admit(peer(0), 0).unwrap(), peer(0));
    }

    #[test]
    fn any_other_uid_is_refused_and_named() {
        for (uid, daemon) in [(1001, 1000), (65534, 0), (1000, 0), (u32::MAX, 1000)] {
            let err = admit(peer(uid), daemon).unwrap_err();
            assert_matches!(err, PeerError::Refused { peer: p, daemon_uid } if p.uid == uid && daemon_uid == daemon);
            let text = err.to_string();
            assert!(text.contains(&format!("uid {uid} (pid 4242)")), "{text}");
            let allowed = match daemon {
                0 => "only root may".to_owned(),
                _ => format!("only uid {daemon} and root may"),
            };
            assert!(text.ends_with(&allowed), "{text}");
        }
    }

    #[test]
    fn credentials_come_from_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = peer_of(&a).unwrap();
        assert_eq!(me.uid, daemon_uid());
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(admit(me, daemon_uid()).is_ok());
    }

    #[test]
    fn a_socket_without_a_peer_has_no_credentials() {
        let err = peer_of(&std::fs::File::open("/dev/null").unwrap()).unwrap_err();
        assert_matches!(err, PeerError::Credentials(_));
    }
}
