//! The filters are tried for real: a forked child installs a role's filters
//! and makes one syscall, and the parent looks at how the child ended. The
//! child makes no allocation and takes no lock between the fork and its
//! end, so the test threads around it cannot wedge it.

use assert_matches::assert_matches;

use super::{creds::LookupError, seccomp::Programs, *};

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Killed(i32),
}

/// Forks; the child installs the refusing filter and `role`'s allow-list,
/// runs `body` and exits with what it returns.
fn confined(programs: &Programs, role: Role, body: fn() -> i32) -> End {
    let (refuse, allow) = (programs.refusal(), programs.allow_list(role));
    // SAFETY: the child only installs the filters (prctl and seccomp on
    // memory made before the fork), runs `body`, which makes raw syscalls
    // only, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = match seccompiler::apply_filter(refuse).and(seccompiler::apply_filter(allow)) {
            Ok(()) => body(),
            Err(_) => 100,
        };
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(code) }
    }
    let mut status = 0;
    // SAFETY: waits for our own child, writing to a live local.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        End::Killed(libc::WTERMSIG(status))
    } else {
        End::Exited(libc::WEXITSTATUS(status))
    }
}

fn programs(mode: SandboxMode) -> Programs {
    Programs::compile(mode).unwrap()
}

/// A TCP socket: on no role's list.
fn make_tcp_socket() -> i32 {
    // SAFETY: socket(2) with plain integers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        0
    } else {
        1
    }
}

#[test]
fn a_forbidden_syscall_kills_the_process_in_every_role() {
    let programs = programs(SandboxMode::On);
    for role in Role::ALL {
        assert_eq!(
            confined(&programs, role, make_tcp_socket),
            End::Killed(libc::SIGSYS),
            "{role}: socket(AF_INET) must kill"
        );
    }
}

#[test]
fn log_mode_lets_a_forbidden_syscall_run() {
    let programs = programs(SandboxMode::Log);
    assert_eq!(confined(&programs, Role::Worker, make_tcp_socket), End::Exited(0));
}

#[test]
fn an_allowed_syscall_runs() {
    let programs = programs(SandboxMode::On);
    for role in Role::ALL {
        let end = confined(&programs, role, || {
            // SAFETY: getpid and sched_yield take nothing and cannot fail.
            unsafe {
                libc::getpid();
                libc::sched_yield()
            }
        });
        assert_eq!(end, End::Exited(0), "{role}");
    }
}

#[test]
fn opening_a_file_is_refused_with_eacces_in_every_role() {
    let programs = programs(SandboxMode::On);
    for role in Role::ALL {
        let end = confined(&programs, role, || {
            // SAFETY: open(2) of a NUL-terminated literal.
            let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            // SAFETY: reads this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            if fd < 0 && errno == libc::EACCES {
                0
            } else {
                1
            }
        });
        assert_eq!(end, End::Exited(0), "{role}: open must fail with EACCES");
    }
}

#[test]
fn a_thread_may_be_created_but_not_a_process() {
    let programs = programs(SandboxMode::On);
    let fork = || {
        // SAFETY: a raw clone without CLONE_THREAD is a fork; if it were
        // let through, the copy leaves at once with _exit.
        let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: ends the copy.
            unsafe { libc::_exit(0) }
        }
        0
    };
    for role in [Role::Main, Role::Device, Role::Control] {
        assert_eq!(
            confined(&programs, role, fork),
            End::Killed(libc::SIGSYS),
            "{role}"
        );
    }
}

#[test]
fn prctl_only_names_a_thread_or_sets_no_new_privs() {
    let programs = programs(SandboxMode::On);
    let name = || {
        // SAFETY: prctl with a NUL-terminated literal name.
        let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c"named".as_ptr()) };
        rc.abs()
    };
    assert_eq!(confined(&programs, Role::Device, name), End::Exited(0));
    let dumpable = || {
        // SAFETY: prctl with plain integers.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }.abs()
    };
    assert_eq!(
        confined(&programs, Role::Device, dumpable),
        End::Killed(libc::SIGSYS)
    );
}

#[test]
fn ioctl_is_limited_to_fionbio_and_fionread() {
    let programs = programs(SandboxMode::On);
    let winsize = || {
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to a live local.
        unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
        0
    };
    assert_eq!(
        confined(&programs, Role::ControlClient, winsize),
        End::Killed(libc::SIGSYS)
    );
}

#[test]
fn a_narrowed_role_allows_no_more_than_the_filter_it_inherits() {
    for role in Role::ALL {
        if let Some(parent) = role.parent() {
            let inherited = allowed_syscalls(parent);
            for name in allowed_syscalls(role) {
                assert!(
                    inherited.contains(&name),
                    "{role} needs {name}, which its creator ({parent}) does not allow"
                );
            }
        }
    }
}

#[test]
fn workers_cannot_accept_spawn_or_receive_descriptors() {
    let worker = allowed_syscalls(Role::Worker);
    for name in [
        "accept4", "clone", "clone3", "recvmsg", "unlinkat", "seccomp", "prctl",
    ] {
        assert!(!worker.contains(&name), "a worker allows {name}");
    }
}

#[test]
fn root_resolves_by_name_and_by_id() {
    let root = Credentials {
        uid: Some(0),
        gid: Some(0),
    };
    assert_eq!(Credentials::resolve(Some("root"), None), Ok(root));
    assert_eq!(Credentials::resolve(Some("0"), None), Ok(root));
    assert_eq!(Credentials::resolve(Some("root"), Some("0")), Ok(root));
    assert_eq!(
        Credentials::resolve(None, Some("4242")),
        Ok(Credentials {
            uid: None,
            gid: Some(4242)
        })
    );
    assert_eq!(Credentials::resolve(None, None), Ok(Credentials::default()));
}

#[test]
fn unknown_names_are_refused() {
    assert_matches!(
        Credentials::resolve(Some("no-such-user-tmem"), None),
        Err(LookupError::NoUser(u)) if u == "no-such-user-tmem"
    );
    assert_matches!(
        Credentials::resolve(None, Some("no-such-group-tmem")),
        Err(LookupError::NoGroup(g)) if g == "no-such-group-tmem"
    );
    assert_matches!(Credentials::resolve(Some("a\0b"), None), Err(LookupError::Nul(_)));
    assert_matches!(
        Credentials::resolve(Some("4000000000"), None),
        Err(LookupError::NoPrimaryGroup(4_000_000_000))
    );
}

/// In a forked child, enters the Landlock domain that allows removing files
/// under `allowed`, then runs `body`. `None` on a kernel without Landlock.
fn landlocked(allowed: &std::path::Path, body: impl Fn() -> i32) -> Option<End> {
    let ruleset = landlock::Ruleset::new(&[allowed.to_owned()]).unwrap();
    // SAFETY: as in `confined`; the ruleset's descriptor was made before the
    // fork, and restricting allocates nothing.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = match ruleset.restrict(Role::Main) {
            Ok(status) if status.fully_enforced() => body(),
            Ok(_) => 99,
            Err(_) => 100,
        };
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(code) }
    }
    let mut status = 0;
    // SAFETY: waits for our own child, writing to a live local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    match libc::WEXITSTATUS(status) {
        99 => None,
        code => Some(End::Exited(code)),
    }
}

#[test]
fn landlock_allows_only_removing_files_beside_the_sockets() {
    let sockets = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let ours = sockets.path().join("vm0.sock");
    let theirs = elsewhere.path().join("file");
    std::fs::write(&ours, b"").unwrap();
    std::fs::write(&theirs, b"").unwrap();
    let paths = [ours.clone(), theirs.clone()]
        .map(|p| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).unwrap());
    let end = landlocked(sockets.path(), || {
        // SAFETY: unlink and open of NUL-terminated paths made before the fork.
        let (removed, refused, opened) = unsafe {
            (
                libc::unlink(paths[0].as_ptr()),
                libc::unlink(paths[1].as_ptr()),
                libc::open(paths[1].as_ptr(), libc::O_RDONLY),
            )
        };
        i32::from(removed != 0) | i32::from(refused == 0) << 1 | i32::from(opened >= 0) << 2
    });
    match end {
        None => eprintln!("this kernel has no Landlock; nothing to check"),
        Some(end) => {
            assert_eq!(
                end,
                End::Exited(0),
                "bits: 1 ours kept, 2 theirs removed, 4 opened"
            );
            assert!(!ours.exists() && theirs.exists());
        }
    }
}
