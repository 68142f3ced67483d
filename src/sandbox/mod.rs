//! Confinement of the daemon once it is set up: each thread drops root (with
//! `--user`/`--group`), sets `PR_SET_NO_NEW_PRIVS`, enters a Landlock domain
//! that grants no filesystem access beyond removing its own sockets, and
//! installs a seccomp-BPF allow-list for its role.
//!
//! All three are per-thread in Linux, and a thread inherits them from the
//! thread that creates it. So the programs and the ruleset are made once,
//! by [`prepare`], before the daemon starts its first thread; each thread
//! the daemon starts then calls [`enter`] with its [`Role`] before it does
//! anything else, and the main thread calls it once set-up is over. A role
//! whose threads are created by an already confined thread (a control
//! client, a queue worker, the shutdown watchdog) only narrows the
//! inherited filter: seccomp filters stack, and every syscall must pass all
//! of them.
//!
//! - `seccomp`: the allow-list of each role and its compilation.
//! - `landlock`: the filesystem ruleset.
//! - `creds`: `--user`/`--group`, resolved and dropped.

mod creds;
mod landlock;
mod seccomp;

use std::{
    cell::Cell,
    fmt, io,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
};

use log::{error, info, warn};
use thiserror::Error;

pub use self::{
    creds::{Credentials, CredentialsError, LookupError},
    seccomp::allowed_syscalls,
};

/// What the sandbox does, from `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// A syscall outside its thread's allow-list kills the process.
    #[default]
    On,
    /// The same confinement, but a syscall outside the allow-list is only
    /// logged by the kernel (audit, `dmesg`) and then runs: for finding
    /// what a new code path needs.
    Log,
    /// No confinement at all, for debugging.
    Off,
}

/// The sandbox part of the daemon's [`Config`](crate::config::Config).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    /// Who the daemon becomes once its sockets are bound.
    pub credentials: Credentials,
}

/// The kinds of thread the daemon runs, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main thread once set-up is over: waits for signals, then stops
    /// the others and removes the control socket.
    Main,
    /// Started by the main thread at the first signal; ends the process.
    Watchdog,
    /// A device's thread: accepts a VMM and creates the vhost-user threads
    /// (the connection's request handler and the queue workers), which
    /// inherit its filter.
    Device,
    /// A queue worker: serves requests from its virtqueue.
    Worker,
    /// The control socket's accept thread, which creates the client threads.
    Control,
    /// One control client's thread.
    ControlClient,
    /// The background writer: spills the coldest pages.
    Writeback,
    /// The recompressor (`--compression auto`): re-encodes cold pages in
    /// RAM and trains dictionaries; memory and CPU only.
    Recompress,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Main,
        Role::Watchdog,
        Role::Device,
        Role::Worker,
        Role::Control,
        Role::ControlClient,
        Role::Writeback,
        Role::Recompress,
    ];

    /// The role of the thread that creates this one, when that thread is
    /// already confined: then only the narrower filter is added.
    pub fn parent(self) -> Option<Role> {
        match self {
            Role::Watchdog => Some(Role::Main),
            Role::Worker => Some(Role::Device),
            Role::ControlClient => Some(Role::Control),
            Role::Main | Role::Device | Role::Control | Role::Writeback | Role::Recompress => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Watchdog => "watchdog",
            Role::Device => "device",
            Role::Worker => "worker",
            Role::Control => "control",
            Role::ControlClient => "control-client",
            Role::Writeback => "writeback",
            Role::Recompress => "recompress",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter of the {role} threads")]
    Compile {
        role: Role,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of a {role} thread")]
    Seccomp {
        role: Role,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot build the Landlock ruleset")]
    Landlock(#[source] ::landlock::RulesetError),
    #[error("cannot open {path} for the Landlock ruleset")]
    LandlockPath {
        path: PathBuf,
        #[source]
        source: ::landlock::PathFdError,
    },
    #[error("cannot enter the Landlock domain in a {role} thread")]
    Restrict {
        role: Role,
        #[source]
        source: ::landlock::RulesetError,
    },
    #[error("cannot keep a copy of the Landlock ruleset for a {role} thread")]
    CloneRuleset {
        role: Role,
        #[source]
        source: io::Error,
    },
    #[error("cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot change credentials in a {role} thread")]
    Credentials {
        role: Role,
        #[source]
        source: CredentialsError,
    },
    #[error("the sandbox is already prepared")]
    Prepared,
}

/// What [`enter`] applies, made by [`prepare`].
struct Sandbox {
    credentials: Credentials,
    programs: seccomp::Programs,
    ruleset: landlock::Ruleset,
    /// Whether the Landlock status has been logged (once, not per thread).
    reported: AtomicBool,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

thread_local! {
    /// Whether this thread has entered its role; for roles entered lazily.
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Makes the filters and the ruleset for the whole process. Call it once,
/// before starting any thread that calls [`enter`]; `socket_dirs` are the
/// directories of the sockets the daemon will remove when it stops. With
/// [`SandboxMode::Off`] it does nothing, and so [`enter`] does nothing.
pub fn prepare(config: &SandboxConfig, socket_dirs: &[PathBuf]) -> Result<(), SandboxError> {
    if config.mode == SandboxMode::Off {
        warn!("--sandbox off: the daemon runs without seccomp, Landlock or no_new_privs");
        return Ok(());
    }
    let sandbox = Sandbox {
        credentials: config.credentials,
        programs: seccomp::Programs::compile(config.mode)?,
        ruleset: landlock::Ruleset::new(socket_dirs)?,
        reported: AtomicBool::new(false),
    };
    SANDBOX.set(sandbox).map_err(|_| SandboxError::Prepared)
}

/// Confines the calling thread to `role`. Does nothing unless [`prepare`]
/// has made a sandbox, so the daemon's modules can call it from their
/// threads also when they run inside tests.
pub fn enter(role: Role) -> Result<(), SandboxError> {
    let Some(sandbox) = SANDBOX.get() else {
        return Ok(());
    };
    if role.parent().is_none() {
        sandbox
            .credentials
            .drop_privileges()
            .map_err(|source| SandboxError::Credentials { role, source })?;
        set_no_new_privs()?;
        let status = sandbox.ruleset.restrict(role)?;
        if !sandbox.reported.swap(true, Ordering::Relaxed) {
            if status.fully_enforced() {
                info!("{status}");
            } else {
                warn!("{status}");
            }
        }
    }
    sandbox.programs.apply(role)?;
    ENTERED.with(|e| e.set(true));
    Ok(())
}

/// [`enter`] for a thread whose start the daemon does not control (a
/// vhost-user-backend queue worker): the first call confines it, later ones
/// cost a thread-local read.
pub fn enter_once(role: Role) {
    if !ENTERED.with(Cell::get) {
        enter_or_exit(role);
    }
}

/// [`enter`] at the start of a thread, which has nobody to return an error
/// to: a thread that cannot be confined ends the process rather than run
/// unconfined.
pub fn enter_or_exit(role: Role) {
    if let Err(e) = enter(role) {
        error!("sandbox: {}; exiting", crate::error_chain(&e));
        std::process::exit(1);
    }
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers and
    // changes only this thread's credentials.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SandboxError::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
