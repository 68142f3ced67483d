//! `--user` and `--group`: who the daemon becomes once set-up is over.
//!
//! Names are resolved when the command line is validated, so a typo stops
//! the daemon before it binds anything. The change itself is made by each
//! thread for itself, with the raw syscalls: Linux credentials are
//! per-thread, and glibc's `setuid` would have every other thread make the
//! change from a signal handler, under a seccomp filter that does not
//! allow it.

use std::{ffi::CString, io};

use thiserror::Error;

/// The user and group to become; `None` keeps the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credentials {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A name or id given for `--user` or `--group` that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("no user {0:?}")]
    NoUser(String),
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("user id {0} has no entry in the user database, so its group is unknown; give --group")]
    NoPrimaryGroup(u32),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("cannot look up {0:?}")]
    Failed(String, #[source] Errno),
}

/// An errno from a lookup; unlike `io::Error`, comparable.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{}", io::Error::from_raw_os_error(*.0))]
pub struct Errno(pub i32);

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot set the supplementary groups to {0}")]
    SetGroups(u32, #[source] io::Error),
    #[error("cannot change the group to {0}")]
    SetGid(u32, #[source] io::Error),
    #[error("cannot change the user to {0}")]
    SetUid(u32, #[source] io::Error),
}

impl Credentials {
    /// `user` and `group` as names or numeric ids. A user without a group
    /// takes the user's primary group.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Self, LookupError> {
        let user = user.map(lookup_user).transpose()?;
        let gid = match group {
            Some(group) => Some(lookup_group(group)?),
            None => match user {
                Some((uid, None)) => return Err(LookupError::NoPrimaryGroup(uid)),
                Some((_, gid)) => gid,
                None => None,
            },
        };
        Ok(Credentials {
            uid: user.map(|(uid, _)| uid),
            gid,
        })
    }

    /// Makes the calling thread's real, effective and saved ids these, and
    /// its only supplementary group the group.
    pub fn drop_privileges(&self) -> Result<(), CredentialsError> {
        if let Some(gid) = self.gid {
            let groups = [gid as libc::gid_t];
            // SAFETY: setgroups reads one gid from a live array; it changes
            // only this thread's credentials.
            let rc = unsafe { libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) };
            check(rc).map_err(|e| CredentialsError::SetGroups(gid, e))?;
            // SAFETY: setresgid takes plain integers; this thread only.
            let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
            check(rc).map_err(|e| CredentialsError::SetGid(gid, e))?;
        }
        if let Some(uid) = self.uid {
            // SAFETY: setresuid takes plain integers; this thread only.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
            check(rc).map_err(|e| CredentialsError::SetUid(uid, e))?;
        }
        Ok(())
    }
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A user's id and, if it is in the user database, its primary group.
fn lookup_user(user: &str) -> Result<(u32, Option<u32>), LookupError> {
    if let Ok(uid) = user.parse::<u32>() {
        let found = lookup(user, |pw: *mut libc::passwd, buf, out| {
            // SAFETY: getpwuid_r fills the entry and the buffer it is given.
            unsafe { libc::getpwuid_r(uid, pw, buf.as_mut_ptr(), buf.len(), out) }
        })?;
        return Ok((uid, found.map(|pw| pw.pw_gid)));
    }
    let name = CString::new(user).map_err(|_| LookupError::Nul(user.to_owned()))?;
    let found = lookup(user, |pw: *mut libc::passwd, buf, out| {
        // SAFETY: as above, with a NUL-terminated name.
        unsafe { libc::getpwnam_r(name.as_ptr(), pw, buf.as_mut_ptr(), buf.len(), out) }
    })?;
    match found {
        Some(pw) => Ok((pw.pw_uid, Some(pw.pw_gid))),
        None => Err(LookupError::NoUser(user.to_owned())),
    }
}

fn lookup_group(group: &str) -> Result<u32, LookupError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| LookupError::Nul(group.to_owned()))?;
    let found = lookup(group, |gr: *mut libc::group, buf, out| {
        // SAFETY: getgrnam_r fills the entry and the buffer it is given.
        unsafe { libc::getgrnam_r(name.as_ptr(), gr, buf.as_mut_ptr(), buf.len(), out) }
    })?;
    found
        .map(|gr| gr.gr_gid)
        .ok_or_else(|| LookupError::NoGroup(group.to_owned()))
}

/// Runs a `get*_r` lookup with a buffer that grows until the entry fits.
/// Only the entry's ids are used after the buffer is gone.
fn lookup<T>(
    what: &str,
    call: impl Fn(*mut T, &mut [libc::c_char], *mut *mut T) -> libc::c_int,
) -> Result<Option<T>, LookupError> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: the entry is a plain C struct for which zeroed memory is a
        // valid value; the lookup overwrites it.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut out: *mut T = std::ptr::null_mut();
        match call(&mut entry, &mut buf, &mut out) {
            0 if out.is_null() => return Ok(None),
            0 => return Ok(Some(entry)),
            libc::ERANGE if size < 1 << 20 => size *= 4,
            rc => return Err(LookupError::Failed(what.to_owned(), Errno(rc))),
        }
    }
}
