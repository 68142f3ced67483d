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
    /// `SYS_` and the syscall's name.
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

/// `allow!(SYS_read)`: `read`, whatever its arguments; `allow!(SYS_read, args)`.
macro_rules! allow {
    ($nr:ident) => {
        allow!($nr, Args::Any)
    };
    ($nr:ident, $args:expr) => {
        Allow {
            name: stringify!($nr),
            nr: libc::$nr,
            args: $args,
        }
    };
}

/// What every thread does: memory, locks, time, logging to stderr, leaving.
const BASE: &[Allow] = &[
    allow!(SYS_read),
    allow!(SYS_write),
    allow!(SYS_writev),
    allow!(SYS_close),
    allow!(SYS_futex),
    allow!(SYS_mmap),
    allow!(SYS_munmap),
    allow!(SYS_mremap),
    allow!(SYS_mprotect),
    allow!(SYS_madvise),
    allow!(SYS_brk),
    allow!(SYS_rt_sigprocmask),
    allow!(SYS_rt_sigreturn),
    allow!(SYS_sigaltstack),
    allow!(SYS_exit),
    allow!(SYS_exit_group),
    allow!(SYS_clock_gettime),
    allow!(SYS_clock_nanosleep),
    allow!(SYS_nanosleep),
    allow!(SYS_sched_yield),
    allow!(SYS_getrandom),
    allow!(SYS_gettid),
    allow!(SYS_getpid),
    allow!(SYS_restart_syscall),
    FCNTL,
    // Refused with EACCES by the second filter (see `REFUSED`), never run.
    allow!(SYS_openat),
];

/// Syscalls that fail with EACCES instead of killing the process: glibc
/// opens files in /sys and /proc on its own (the CPU count when malloc
/// makes an arena, the overcommit policy when it shrinks a heap) and copes
/// when it cannot. Opening a file by path never succeeds in the sandbox.
#[cfg(target_arch = "x86_64")]
const REFUSED: &[Allow] = &[allow!(SYS_openat), allow!(SYS_open)];
#[cfg(not(target_arch = "x86_64"))]
const REFUSED: &[Allow] = &[allow!(SYS_openat)];

/// Creating a thread (which then names itself) and letting it narrow its
/// filter.
const SPAWN: &[Allow] = &[
    allow!(SYS_clone, Args::HasBits(0, libc::CLONE_THREAD as u64)),
    allow!(SYS_clone3),
    allow!(SYS_set_robust_list),
    allow!(SYS_rseq),
    allow!(SYS_sched_getaffinity),
    allow!(
        SYS_prctl,
        Args::OneOf(0, &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64])
    ),
    allow!(
        SYS_seccomp,
        Args::OneOf(0, &[libc::SECCOMP_SET_MODE_FILTER as u64])
    ),
];

/// Reading, writing, growing and punching the spill file through its
/// descriptor.
const SPILL: &[Allow] = &[
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_fallocate),
    allow!(SYS_fdatasync),
    allow!(SYS_fsync),
];

/// Removing a socket file at shutdown, once sure it is still ours.
#[cfg(target_arch = "x86_64")]
const REMOVE_SOCKET: &[Allow] = &[
    allow!(SYS_unlinkat),
    allow!(SYS_unlink),
    allow!(SYS_newfstatat),
    allow!(SYS_lstat),
    allow!(SYS_statx),
];
#[cfg(not(target_arch = "x86_64"))]
const REMOVE_SOCKET: &[Allow] = &[allow!(SYS_unlinkat), allow!(SYS_newfstatat), allow!(SYS_statx)];

/// The flags and requests a descriptor's users set and ask.
const FCNTL: Allow = allow!(
    SYS_fcntl,
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
    SYS_ioctl,
    Args::OneOf(1, &[libc::FIONBIO as u64, libc::FIONREAD as u64])
);

const MAIN: &[Allow] = &[allow!(SYS_rt_sigtimedwait), allow!(SYS_shutdown)];
const WATCHDOG: &[Allow] = &[allow!(SYS_rt_sigtimedwait)];
#[cfg(target_arch = "x86_64")]
const WORKER: &[Allow] = &[allow!(SYS_epoll_pwait), allow!(SYS_epoll_wait)];
#[cfg(not(target_arch = "x86_64"))]
const WORKER: &[Allow] = &[allow!(SYS_epoll_pwait)];
const DEVICE: &[Allow] = &[
    allow!(SYS_accept4),
    allow!(SYS_recvmsg),
    allow!(SYS_sendmsg),
    allow!(SYS_shutdown),
    allow!(SYS_epoll_create1),
    allow!(SYS_epoll_ctl),
    allow!(SYS_eventfd2),
    allow!(SYS_fstat),
    IOCTL,
];
#[cfg(target_arch = "x86_64")]
const CONTROL_CLIENT: &[Allow] = &[
    allow!(SYS_poll),
    allow!(SYS_ppoll),
    allow!(SYS_recvfrom),
    allow!(SYS_sendto),
    allow!(SYS_getsockopt),
    allow!(SYS_setsockopt),
    allow!(SYS_shutdown),
    allow!(SYS_geteuid),
    IOCTL,
];
#[cfg(not(target_arch = "x86_64"))]
const CONTROL_CLIENT: &[Allow] = &[
    allow!(SYS_ppoll),
    allow!(SYS_recvfrom),
    allow!(SYS_sendto),
    allow!(SYS_getsockopt),
    allow!(SYS_setsockopt),
    allow!(SYS_shutdown),
    allow!(SYS_geteuid),
    IOCTL,
];
const CONTROL: &[Allow] = &[
    allow!(SYS_accept4),
    allow!(SYS_socketpair, Args::OneOf(0, &[libc::AF_UNIX as u64])),
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
        Role::Recompress => vec![],
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
    let mut names: Vec<_> = lists(role)
        .into_iter()
        .flatten()
        .map(|a| a.name.trim_start_matches("SYS_"))
        .collect();
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
