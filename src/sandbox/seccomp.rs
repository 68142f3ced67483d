//! The seccomp-BPF allow-list of each [`Role`], and its compilation.
//!
//! A role whose threads create threads of another role (the device thread
//! creates the queue workers, say) allows everything those need as well:
//! a new thread runs under its creator's filter until it adds its own.
//! docs/design.md says why each syscall is on its list.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use super::{Role, SandboxError, SandboxMode};

/// One allowed syscall, with the arguments it may take.
#[derive(Clone, Copy, Debug)]
struct Allow {
    name: &'static str,
    nr: c_long,
    args: Args,
}

#[derive(Clone, Copy, Debug)]
enum Args {
    Any,
    /// Argument `index` is one of `values`.
    OneOf(u8, &'static [u64]),
    /// Argument `index` has all the bits of `mask` set.
    HasBits(u8, u64),
}

macro_rules! allow {
    ($name:ident) => {
        Allow {
            name: stringify!($name),
            nr: paste_nr!($name),
            args: Args::Any,
        }
    };
    ($name:ident, $args:expr) => {
        Allow {
            name: stringify!($name),
            nr: paste_nr!($name),
            args: $args,
        }
    };
}

macro_rules! paste_nr {
    (read) => {
        libc::SYS_read
    };
    (write) => {
        libc::SYS_write
    };
    (writev) => {
        libc::SYS_writev
    };
    (close) => {
        libc::SYS_close
    };
    (futex) => {
        libc::SYS_futex
    };
    (mmap) => {
        libc::SYS_mmap
    };
    (munmap) => {
        libc::SYS_munmap
    };
    (mremap) => {
        libc::SYS_mremap
    };
    (mprotect) => {
        libc::SYS_mprotect
    };
    (madvise) => {
        libc::SYS_madvise
    };
    (brk) => {
        libc::SYS_brk
    };
    (rt_sigprocmask) => {
        libc::SYS_rt_sigprocmask
    };
    (rt_sigreturn) => {
        libc::SYS_rt_sigreturn
    };
    (rt_sigtimedwait) => {
        libc::SYS_rt_sigtimedwait
    };
    (sigaltstack) => {
        libc::SYS_sigaltstack
    };
    (exit) => {
        libc::SYS_exit
    };
    (exit_group) => {
        libc::SYS_exit_group
    };
    (clock_gettime) => {
        libc::SYS_clock_gettime
    };
    (clock_nanosleep) => {
        libc::SYS_clock_nanosleep
    };
    (nanosleep) => {
        libc::SYS_nanosleep
    };
    (sched_yield) => {
        libc::SYS_sched_yield
    };
    (sched_getaffinity) => {
        libc::SYS_sched_getaffinity
    };
    (getrandom) => {
        libc::SYS_getrandom
    };
    (gettid) => {
        libc::SYS_gettid
    };
    (getpid) => {
        libc::SYS_getpid
    };
    (geteuid) => {
        libc::SYS_geteuid
    };
    (restart_syscall) => {
        libc::SYS_restart_syscall
    };
    (clone) => {
        libc::SYS_clone
    };
    (clone3) => {
        libc::SYS_clone3
    };
    (set_robust_list) => {
        libc::SYS_set_robust_list
    };
    (rseq) => {
        libc::SYS_rseq
    };
    (prctl) => {
        libc::SYS_prctl
    };
    (seccomp) => {
        libc::SYS_seccomp
    };
    (shutdown) => {
        libc::SYS_shutdown
    };
    (unlinkat) => {
        libc::SYS_unlinkat
    };
    (newfstatat) => {
        libc::SYS_newfstatat
    };
    (statx) => {
        libc::SYS_statx
    };
    (fstat) => {
        libc::SYS_fstat
    };
    (accept4) => {
        libc::SYS_accept4
    };
    (recvmsg) => {
        libc::SYS_recvmsg
    };
    (sendmsg) => {
        libc::SYS_sendmsg
    };
    (recvfrom) => {
        libc::SYS_recvfrom
    };
    (sendto) => {
        libc::SYS_sendto
    };
    (socketpair) => {
        libc::SYS_socketpair
    };
    (getsockopt) => {
        libc::SYS_getsockopt
    };
    (setsockopt) => {
        libc::SYS_setsockopt
    };
    (epoll_create1) => {
        libc::SYS_epoll_create1
    };
    (epoll_ctl) => {
        libc::SYS_epoll_ctl
    };
    (epoll_pwait) => {
        libc::SYS_epoll_pwait
    };
    (eventfd2) => {
        libc::SYS_eventfd2
    };
    (fcntl) => {
        libc::SYS_fcntl
    };
    (ioctl) => {
        libc::SYS_ioctl
    };
    (ppoll) => {
        libc::SYS_ppoll
    };
    (pread64) => {
        libc::SYS_pread64
    };
    (pwrite64) => {
        libc::SYS_pwrite64
    };
    (fallocate) => {
        libc::SYS_fallocate
    };
    (fdatasync) => {
        libc::SYS_fdatasync
    };
    (fsync) => {
        libc::SYS_fsync
    };
    (unlink) => {
        libc::SYS_unlink
    };
    (lstat) => {
        libc::SYS_lstat
    };
    (poll) => {
        libc::SYS_poll
    };
    (openat) => {
        libc::SYS_openat
    };
    (open) => {
        libc::SYS_open
    };
    (epoll_wait) => {
        libc::SYS_epoll_wait
    };
}

/// What every thread does: memory, locks, time, logging to stderr, leaving.
const BASE: &[Allow] = &[
    allow!(read),
    allow!(write),
    allow!(writev),
    allow!(close),
    allow!(futex),
    allow!(mmap),
    allow!(munmap),
    allow!(mremap),
    allow!(mprotect),
    allow!(madvise),
    allow!(brk),
    allow!(rt_sigprocmask),
    allow!(rt_sigreturn),
    allow!(sigaltstack),
    allow!(exit),
    allow!(exit_group),
    allow!(clock_gettime),
    allow!(clock_nanosleep),
    allow!(nanosleep),
    allow!(sched_yield),
    allow!(getrandom),
    allow!(gettid),
    allow!(getpid),
    allow!(restart_syscall),
    FCNTL,
    // Refused with EACCES by the second filter (see `REFUSED`), never run.
    allow!(openat),
];

/// Syscalls that fail with EACCES instead of killing the process: glibc
/// opens files in /sys and /proc on its own (the CPU count when malloc
/// makes an arena, the overcommit policy when it shrinks a heap) and copes
/// when it cannot. Opening a file by path never succeeds in the sandbox.
#[cfg(target_arch = "x86_64")]
const REFUSED: &[Allow] = &[allow!(openat), allow!(open)];
#[cfg(not(target_arch = "x86_64"))]
const REFUSED: &[Allow] = &[allow!(openat)];

/// Creating a thread (which then names itself) and letting it narrow its
/// filter.
const SPAWN: &[Allow] = &[
    allow!(clone, Args::HasBits(0, libc::CLONE_THREAD as u64)),
    allow!(clone3),
    allow!(set_robust_list),
    allow!(rseq),
    allow!(sched_getaffinity),
    allow!(
        prctl,
        Args::OneOf(0, &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64])
    ),
    allow!(seccomp, Args::OneOf(0, &[libc::SECCOMP_SET_MODE_FILTER as u64])),
];

/// Reading, writing, growing and punching the spill file through its
/// descriptor.
const SPILL: &[Allow] = &[
    allow!(pread64),
    allow!(pwrite64),
    allow!(fallocate),
    allow!(fdatasync),
    allow!(fsync),
];

/// Removing a socket file at shutdown, once sure it is still ours.
#[cfg(target_arch = "x86_64")]
const REMOVE_SOCKET: &[Allow] = &[
    allow!(unlinkat),
    allow!(unlink),
    allow!(newfstatat),
    allow!(lstat),
    allow!(statx),
];
#[cfg(not(target_arch = "x86_64"))]
const REMOVE_SOCKET: &[Allow] = &[allow!(unlinkat), allow!(newfstatat), allow!(statx)];

/// The flags and requests a descriptor's users set and ask.
const FCNTL: Allow = allow!(
    fcntl,
    Args::OneOf(
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ]
    )
);
// The requests are `c_ulong` on glibc and `c_int` on other C libraries.
#[allow(clippy::unnecessary_cast)]
const IOCTL: Allow = allow!(
    ioctl,
    Args::OneOf(1, &[libc::FIONBIO as u64, libc::FIONREAD as u64])
);

const MAIN: &[Allow] = &[allow!(rt_sigtimedwait), allow!(shutdown)];
const WATCHDOG: &[Allow] = &[allow!(rt_sigtimedwait)];
#[cfg(target_arch = "x86_64")]
const WORKER: &[Allow] = &[allow!(epoll_pwait), allow!(epoll_wait)];
#[cfg(not(target_arch = "x86_64"))]
const WORKER: &[Allow] = &[allow!(epoll_pwait)];
const DEVICE: &[Allow] = &[
    allow!(accept4),
    allow!(recvmsg),
    allow!(sendmsg),
    allow!(shutdown),
    allow!(epoll_create1),
    allow!(epoll_ctl),
    allow!(eventfd2),
    allow!(fstat),
    FCNTL,
    IOCTL,
];
#[cfg(target_arch = "x86_64")]
const CONTROL_CLIENT: &[Allow] = &[
    allow!(poll),
    allow!(ppoll),
    allow!(recvfrom),
    allow!(sendto),
    allow!(getsockopt),
    allow!(setsockopt),
    allow!(shutdown),
    allow!(geteuid),
    FCNTL,
    IOCTL,
];
#[cfg(not(target_arch = "x86_64"))]
const CONTROL_CLIENT: &[Allow] = &[
    allow!(ppoll),
    allow!(recvfrom),
    allow!(sendto),
    allow!(getsockopt),
    allow!(setsockopt),
    allow!(shutdown),
    allow!(geteuid),
    FCNTL,
    IOCTL,
];
const CONTROL: &[Allow] = &[
    allow!(accept4),
    allow!(socketpair, Args::OneOf(0, &[libc::AF_UNIX as u64])),
];

/// The lists that make up `role`'s allow-list, its children's included.
fn lists(role: Role) -> Vec<&'static [Allow]> {
    let own: Vec<&'static [Allow]> = match role {
        Role::Main => vec![MAIN, REMOVE_SOCKET, SPAWN],
        Role::Watchdog => vec![WATCHDOG],
        Role::Device => vec![DEVICE, REMOVE_SOCKET, SPAWN, SPILL],
        Role::Worker => vec![WORKER, SPILL],
        Role::Control => vec![CONTROL, SPAWN],
        Role::ControlClient => vec![CONTROL_CLIENT, SPILL],
        Role::Writeback => vec![SPILL],
    };
    let mut all = vec![BASE];
    all.extend(own);
    for child in Role::ALL.into_iter().filter(|c| c.parent() == Some(role)) {
        all.extend(lists(child));
    }
    all
}

/// The names of the syscalls `role` allows, sorted, for the docs and tests.
pub fn allowed_syscalls(role: Role) -> Vec<&'static str> {
    let mut names: Vec<_> = lists(role).into_iter().flatten().map(|a| a.name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The compiled filters of every role: its allow-list, and the filter that
/// refuses [`REFUSED`].
pub(super) struct Programs {
    allow: BTreeMap<Role, BpfProgram>,
    refuse: BpfProgram,
}

impl Programs {
    pub(super) fn compile(mode: SandboxMode) -> Result<Self, SandboxError> {
        let mismatch = match mode {
            SandboxMode::Log => SeccompAction::Log,
            SandboxMode::On | SandboxMode::Off => SeccompAction::KillProcess,
        };
        let mut allow = BTreeMap::new();
        for role in Role::ALL {
            allow.insert(role, program(role, &lists(role), mismatch.clone())?);
        }
        let refuse = compile(
            Role::Main,
            &[REFUSED],
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?;
        Ok(Programs { allow, refuse })
    }

    /// Installs `role`'s filters on the calling thread. A thread that
    /// narrows an inherited filter has the refusing one already.
    pub(super) fn apply(&self, role: Role) -> Result<(), SandboxError> {
        let seccomp = |source| SandboxError::Seccomp { role, source };
        if role.parent().is_none() {
            seccompiler::apply_filter(&self.refuse).map_err(seccomp)?;
        }
        // Every role is compiled in `compile`.
        match self.allow.get(&role) {
            Some(program) => seccompiler::apply_filter(program).map_err(seccomp),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    pub(super) fn allow_list(&self, role: Role) -> &BpfProgram {
        &self.allow[&role]
    }

    #[cfg(test)]
    pub(super) fn refusal(&self) -> &BpfProgram {
        &self.refuse
    }
}

/// `role`'s allow-list: its syscalls allowed, anything else met with
/// `mismatch`.
fn program(
    role: Role,
    lists: &[&'static [Allow]],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    compile(role, lists, mismatch, SeccompAction::Allow)
}

/// A filter whose syscalls (with their arguments) meet `matched`, and any
/// other `mismatch`.
fn compile(
    role: Role,
    lists: &[&'static [Allow]],
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let err = |source| SandboxError::Compile { role, source };
    // A syscall on several lists is allowed if any of them allows it; `None`
    // is allowed whatever its arguments.
    let mut rules: BTreeMap<c_long, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for allow in lists.iter().copied().flatten() {
        let conditions = match allow.args {
            Args::Any => None,
            Args::OneOf(index, values) => Some(
                values
                    .iter()
                    .map(|&v| {
                        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                            .and_then(|c| SeccompRule::new(vec![c]))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?,
            ),
            Args::HasBits(index, mask) => Some(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                mask,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(err)?]),
        };
        let entry = rules.entry(allow.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), conditions) {
            (Some(have), Some(more)) => have.extend(more),
            _ => *entry = None,
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}
