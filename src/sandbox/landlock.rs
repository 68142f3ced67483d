//! The Landlock ruleset: every filesystem access right the kernel knows of
//! (up to ABI 6) is handled, and the only one granted is removing files in
//! the directories of the daemon's sockets, which it does at shutdown. TCP
//! bind and connect are handled and never granted, and abstract Unix
//! sockets and signals are scoped to the daemon itself.
//!
//! Everything else the daemon uses after set-up (its sockets, the spill
//! file, eventfds, guest memory passed over the vhost-user socket) is
//! reached through descriptors it already holds, which Landlock does not
//! restrict. A kernel without Landlock, or with an older ABI, gets what it
//! supports, and the daemon says so in its log.

use std::{fmt, path::PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    RestrictionStatus, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::{Role, SandboxError};

/// The newest ABI whose rights are handled: the ruleset means the same on
/// every kernel that has it, whatever version of the crate is built.
const ABI_HANDLED: ABI = ABI::V6;

pub(super) struct Ruleset(RulesetCreated);

impl Ruleset {
    pub(super) fn new(socket_dirs: &[PathBuf]) -> Result<Self, SandboxError> {
        let mut ruleset = landlock::Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI_HANDLED))
            .and_then(|r| r.handle_access(AccessNet::from_all(ABI_HANDLED)))
            .and_then(|r| r.scope(Scope::from_all(ABI_HANDLED)))
            .and_then(|r| r.create())
            .map_err(SandboxError::Landlock)?;
        for dir in socket_dirs {
            let fd = PathFd::new(dir).map_err(|source| SandboxError::LandlockPath {
                path: dir.clone(),
                source,
            })?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, AccessFs::RemoveFile))
                .map_err(SandboxError::Landlock)?;
        }
        Ok(Ruleset(ruleset))
    }

    /// Puts the calling thread in the ruleset's domain.
    pub(super) fn restrict(&self, role: Role) -> Result<Status, SandboxError> {
        let copy = self
            .0
            .try_clone()
            .map_err(|source| SandboxError::CloneRuleset { role, source })?;
        copy.restrict_self()
            .map(Status)
            .map_err(|source| SandboxError::Restrict { role, source })
    }
}

/// How far the kernel enforced the ruleset, for the log.
pub(super) struct Status(RestrictionStatus);

impl Status {
    pub(super) fn fully_enforced(&self) -> bool {
        matches!(self.0.ruleset, RulesetStatus::FullyEnforced)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let abi = match self.0.landlock {
            LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as u32),
            _ => None,
        };
        match (&self.0.ruleset, abi) {
            (RulesetStatus::FullyEnforced, _) => {
                write!(
                    f,
                    "sandbox: seccomp filters and Landlock (fully enforced) in place"
                )
            }
            (RulesetStatus::PartiallyEnforced, Some(abi)) => write!(
                f,
                "sandbox: seccomp filters in place; Landlock partly enforced: this kernel has \
                 Landlock ABI {abi}, the ruleset is written for ABI {}",
                ABI_HANDLED as u32
            ),
            (RulesetStatus::PartiallyEnforced, None) => {
                write!(f, "sandbox: seccomp filters in place; Landlock partly enforced")
            }
            (RulesetStatus::NotEnforced, _) => write!(
                f,
                "sandbox: seccomp filters in place; Landlock is not available on this kernel \
                 ({}), so filesystem access is confined by seccomp alone",
                match self.0.landlock {
                    LandlockStatus::NotEnabled => "built in but not enabled at boot",
                    LandlockStatus::NotImplemented => "not built in",
                    _ => "not usable",
                }
            ),
        }
    }
}
