//! The client end of the control socket, used by `tmemctl` and the device
//! benchmark.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::message::{Answer, Cap, ConfigView, Reply, Request, Stats};
use crate::{size::ByteSize, store::GuestBudget};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
    #[error("daemon closed the connection without replying")]
    Closed,
    #[error("cannot encode JSON")]
    Encode(#[source] serde_json::Error),
    #[error("daemon sent a reply that is not a reply")]
    BadReply(#[source] serde_json::Error),
    #[error("daemon answered {request} with a reply to another request")]
    Mismatch { request: &'static str },
    #[error("daemon refused the request: {0}")]
    Refused(String),
}

/// A connection to the daemon's control socket.
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let reader = BufReader::new(stream.try_clone().map_err(ClientError::Io)?);
        Ok(ControlClient {
            writer: stream,
            reader,
        })
    }

    /// Sends one request; returns its answer, or the daemon's refusal as
    /// [`ClientError::Refused`].
    pub fn call(&mut self, request: &Request) -> Result<Answer, ClientError> {
        let mut line = serde_json::to_string(request).map_err(ClientError::Encode)?;
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // A daemon that turns a client away says why and closes, maybe
            // before the request is through; the reason is still there to read.
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                return Err(ClientError::Io(e));
            }
        }
        let mut reply = String::new();
        if self.reader.read_line(&mut reply).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::Closed);
        }
        match serde_json::from_str(&reply).map_err(ClientError::BadReply)? {
            Reply::Ok(answer) => Ok(answer),
            Reply::Error(message) => Err(ClientError::Refused(message)),
        }
    }

    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.call(&Request::Stats {})? {
            Answer::Stats(stats) => Ok(stats),
            _ => Err(ClientError::Mismatch { request: "stats" }),
        }
    }

    pub fn config(&mut self) -> Result<ConfigView, ClientError> {
        match self.call(&Request::GetConfig {})? {
            Answer::Config(config) => Ok(config),
            _ => Err(ClientError::Mismatch {
                request: "get-config",
            }),
        }
    }

    /// Sets the store's RAM budget; returns the settings then in force.
    pub fn set_mem_limit(&mut self, size: ByteSize) -> Result<ConfigView, ClientError> {
        match self.call(&Request::SetConfig {
            mem_limit: Some(size),
        })? {
            Answer::Config(config) => Ok(config),
            _ => Err(ClientError::Mismatch {
                request: "set-config",
            }),
        }
    }

    /// Returns how many pages were written.
    pub fn writeback(&mut self, pages: u64) -> Result<u64, ClientError> {
        match self.call(&Request::Writeback { pages })? {
            Answer::Written(written) => Ok(written),
            _ => Err(ClientError::Mismatch { request: "writeback" }),
        }
    }

    /// Returns how many pages were dropped.
    pub fn drop_pool(&mut self, device: u32, pool: u32) -> Result<u64, ClientError> {
        match self.call(&Request::DropPool { device, pool })? {
            Answer::Dropped(dropped) => Ok(dropped),
            _ => Err(ClientError::Mismatch { request: "drop-pool" }),
        }
    }

    /// Sets a device's cap and/or weight; returns its budget then.
    pub fn set_device(
        &mut self,
        device: u32,
        max: Option<Cap>,
        weight: Option<u32>,
    ) -> Result<GuestBudget, ClientError> {
        match self.call(&Request::SetDevice { device, max, weight })? {
            Answer::Budget(budget) => Ok(budget),
            _ => Err(ClientError::Mismatch {
                request: "set-device",
            }),
        }
    }
}
