//! Serving one request: parse the chain, act on the store, write the answer
//! and the status byte back into guest memory, and time it.

use std::time::Instant;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    backend::{Kind, TmemBackend},
    blk::Disk,
    blk_request::{self, BlkOp, BlkRejection, BlkStatus},
    request::{self, DescTable, Rejection, Request},
    worker::Worker,
};
use crate::{
    protocol::{Op, Status, PAGE_SIZE},
    stats::OpClass,
    store::{GetOutcome, PutOutcome, StoreError},
};

/// What a served request leaves for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Only the status byte.
    Status(Status),
    /// A GET's page, then OK.
    Page,
}

impl Answer {
    fn status(self) -> Status {
        match self {
            Answer::Status(s) => s,
            Answer::Page => Status::Ok,
        }
    }
}

impl TmemBackend {
    /// Serves one chain; returns the used length (bytes written).
    pub(super) fn handle_chain<C>(
        &self,
        queue: usize,
        table: DescTable,
        chain: DescriptorChain<C>,
        mem: &GuestMemoryMmap,
        worker: &mut Worker,
    ) -> u32
    where
        C: std::ops::Deref,
        C::Target: vm_memory::GuestMemory,
    {
        let start = Instant::now();
        if let Some(rejection) = request::indirect_with_next(mem, table, chain.head_index()) {
            // Nowhere the driver would look for a status: answer nothing.
            self.log_error(queue, &rejection.error);
            return 0;
        }
        if let Kind::Blk(disk) = &self.kind {
            return self.handle_blk_chain(queue, disk, chain, mem, worker, start);
        }
        let parsed = request::parse(chain, mem);
        let req = match parsed {
            Ok(req) => req,
            Err(Rejection { error, status }) => {
                self.log_error(queue, &error);
                return match status {
                    Some(addr) if mem.write_obj(Status::Invalid as u8, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let answer = self.execute(queue, &req, mem, worker);
        let used = match mem.write_obj(answer.status() as u8, req.status) {
            Ok(()) if answer == Answer::Page => PAGE_SIZE as u32 + 1,
            Ok(()) => 1,
            Err(e) => {
                self.log_error(queue, &e);
                0
            }
        };
        if let Some(recorder) = self.telemetry().latency.get(queue) {
            recorder.record(OpClass::of(req.header.op), start.elapsed());
        }
        used
    }

    /// Serves one chain of a blk device; returns the used length.
    fn handle_blk_chain<C>(
        &self,
        queue: usize,
        disk: &Disk,
        chain: DescriptorChain<C>,
        mem: &GuestMemoryMmap,
        worker: &mut Worker,
        start: Instant,
    ) -> u32
    where
        C: std::ops::Deref,
        C::Target: vm_memory::GuestMemory,
    {
        let req = match blk_request::parse(chain, mem, disk.capacity()) {
            Ok(req) => req,
            Err(BlkRejection { error, status }) => {
                self.log_error(queue, &error);
                return match status {
                    Some(addr) if mem.write_obj(error.status() as u8, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = match disk.execute(&self.store, self.guest(), &req, mem, &mut worker.page) {
            Ok(done) => done,
            Err(e) => {
                self.log_error(queue, &e);
                (BlkStatus::IoErr, 0)
            }
        };
        let used = match mem.write_obj(status as u8, req.status) {
            Ok(()) => written + 1,
            Err(e) => {
                self.log_error(queue, &e);
                0
            }
        };
        let class = match req.op {
            BlkOp::Write { .. } => Some(OpClass::Put),
            BlkOp::Read { .. } => Some(OpClass::Get),
            BlkOp::Discard { .. } | BlkOp::WriteZeroes { .. } => Some(OpClass::Invalidate),
            BlkOp::Flush | BlkOp::GetId { .. } => None,
        };
        if let (Some(class), Some(recorder)) = (class, self.telemetry().latency.get(queue)) {
            recorder.record(class, start.elapsed());
        }
        used
    }

    fn put_answer(&self, queue: usize, outcome: Result<PutOutcome, StoreError>) -> Answer {
        Answer::Status(match outcome {
            Ok(PutOutcome::Stored) => Status::Ok,
            Ok(PutOutcome::Rejected) => Status::Rejected,
            Err(e) => {
                self.log_error(queue, &e);
                Status::IoError
            }
        })
    }

    /// Acts on a validated request.
    fn execute(&self, queue: usize, req: &Request, mem: &GuestMemoryMmap, worker: &mut Worker) -> Answer {
        let h = &req.header;
        let guest = self.guest();
        match h.op {
            Op::Put => {
                if let Err(e) = req.read_page(mem, &mut worker.page) {
                    self.log_error(queue, &e);
                    return Answer::Status(Status::Invalid);
                }
                self.put_answer(queue, self.store.put(guest, h.pool, h.index, &worker.page))
            }
            Op::PutFill => self.put_answer(queue, self.store.put_fill(guest, h.pool, h.index, h.arg)),
            Op::Get => {
                match self
                    .store
                    .get(guest, h.pool, h.index, &mut worker.page, h.exclusive())
                {
                    Ok(GetOutcome::Found) => match req.write_page(mem, &worker.page) {
                        Ok(()) => Answer::Page,
                        Err(e) => {
                            self.log_error(queue, &e);
                            Answer::Status(Status::IoError)
                        }
                    },
                    Ok(GetOutcome::NotFound) => Answer::Status(Status::NotFound),
                    Err(e) => {
                        self.log_error(queue, &e);
                        Answer::Status(Status::IoError)
                    }
                }
            }
            Op::InvalidatePage => {
                self.store.invalidate_page(guest, h.pool, h.index);
                Answer::Status(Status::Ok)
            }
            Op::InvalidatePool => {
                self.store.invalidate_pool(guest, h.pool);
                Answer::Status(Status::Ok)
            }
        }
    }
}
