//! The patched guest kernel's request semantics (`db_devmgr_process`, `add_cpu_dev`,
//! `del_cpu_dev`): what a request does to the guest's CPUs and which reply fields it writes.
//! The rules are listed in the [module documentation](super).

use std::sync::atomic::Ordering;

use slog::{debug, info, warn};

use super::{lock, CpuAction, GuestUpcallServer, EINVAL, EIO, UNKNOWN_TYPE_RESULT};
use crate::protocol::{
    write_reply_apic_index, write_reply_result, MsgBuf, MsgHeader, MsgType, RawCpuPayload,
    BROADCAST_APIC_ID, CPU_REPLY_FAILURE_SIZE, CPU_REPLY_SUCCESS_SIZE,
};

/// An injected failure of one CPU of a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct InjectedFailure {
    /// How many CPUs of the request are handled before the failing one.
    pub(super) index: usize,
    /// The errno the failing CPU reports.
    pub(super) errno: i32,
}

impl InjectedFailure {
    /// Acts on the CPU at `position` of a request: the injected errno if this is the failing
    /// one, else what `act` says.
    fn or_act(
        fail: Option<Self>,
        position: usize,
        act: impl FnOnce() -> Result<(), i32>,
    ) -> Result<(), i32> {
        match fail {
            Some(f) if f.index == position => Err(f.errno),
            _ => act(),
        }
    }
}

/// The header every reply but a success ends with: size 0, the request's type echoed.
fn failure_header(request: &MsgBuf) -> MsgHeader {
    MsgHeader {
        msg_type: MsgHeader::read_from(request).msg_type,
        ..MsgHeader::new(MsgType::Connect, CPU_REPLY_FAILURE_SIZE)
    }
}

/// A callback's errno as the positive errno of the reply (0 becomes `EIO`).
fn positive_errno(errno: i32) -> i32 {
    match errno.checked_abs() {
        Some(0) | None => EIO,
        Some(e) => e,
    }
}

impl GuestUpcallServer {
    /// Handles one request message as the guest kernel does and returns the reply: a copy of
    /// the reply buffer of one long-lived connection, stale fields included.
    pub fn handle_message(&self, request: &MsgBuf) -> MsgBuf {
        let mut reply = lock(&self.inner.reply);
        self.process(request, &mut reply, None);
        *reply
    }

    /// The kernel's `db_devmgr_process`: handles `request` and writes the answer into the
    /// connection's `reply` buffer, setting only what the kernel sets.
    pub(super) fn process(
        &self,
        request: &MsgBuf,
        reply: &mut MsgBuf,
        fail: Option<InjectedFailure>,
    ) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let header = MsgHeader::read_from(request);
        let failure_header = failure_header(request);
        if !header.has_valid_magic() {
            warn!(self.inner.logger, "request with bad magic, answering with the stale result";
                "magic" => format!("{:#010x}", header.magic_version));
            failure_header.write_to(reply);
            return;
        }
        let payload = RawCpuPayload::read_from(request);
        let outcome = match header.kind() {
            Some(MsgType::AddCpu) => self.add_cpus(payload, fail),
            Some(MsgType::DelCpu) => self.del_cpus(payload, reply, fail),
            _ => {
                debug!(self.inner.logger, "no handler for message type"; "type" => header.msg_type);
                Err(-UNKNOWN_TYPE_RESULT)
            }
        };
        match outcome {
            Ok(count) => {
                // The kernel's success notification: index = count, result 0, size 4.
                write_reply_apic_index(reply, u32::from(count));
                write_reply_result(reply, 0);
                MsgHeader {
                    msg_size: CPU_REPLY_SUCCESS_SIZE,
                    ..failure_header
                }
                .write_to(reply);
            }
            Err(errno) => {
                write_reply_result(reply, -errno);
                failure_header.write_to(reply);
            }
        }
    }

    /// Refuses `request` with `-errno` without acting on it, as a failure the kernel reports
    /// after its checks: `apic_index` keeps its stale value.
    pub(super) fn refuse(&self, request: &MsgBuf, reply: &mut MsgBuf, errno: i32) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        write_reply_result(reply, -positive_errno(errno));
        failure_header(request).write_to(reply);
    }

    /// The kernel's `add_cpu_dev`: `Ok(count)` or `Err(positive errno)`.
    fn add_cpus(
        &self,
        payload: RawCpuPayload<'_>,
        fail: Option<InjectedFailure>,
    ) -> Result<u8, i32> {
        let log = &self.inner.logger;
        if let Some(id) = self.first_present(payload.apic_ids, true) {
            info!(log, "ADD_CPU refused: APIC ID already present"; "apic_id" => id);
            return Err(EINVAL);
        }
        let mut callback = lock(&self.inner.callback);
        for (position, &apic_id) in payload.apic_ids.iter().enumerate() {
            {
                let mut present = lock(&self.inner.present);
                if apic_id == BROADCAST_APIC_ID || present.contains(&apic_id) {
                    info!(log, "ADD_CPU failed part-way: cannot register"; "apic_id" => apic_id);
                    return Err(EINVAL);
                }
                present.push(apic_id);
            }
            let online =
                InjectedFailure::or_act(fail, position, || (*callback)(CpuAction::Online(apic_id)));
            if let Err(errno) = online {
                // Unregistered again; the CPUs before it stay online.
                lock(&self.inner.present).retain(|&id| id != apic_id);
                info!(log, "ADD_CPU failed part-way: CPU did not come online";
                    "apic_id" => apic_id, "errno" => errno, "online_before_it" => position);
                return Err(positive_errno(errno));
            }
            debug!(log, "CPU online"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }

    /// The first of `ids` that is present (`present` true) or absent (`present` false).
    fn first_present(&self, ids: &[u8], present: bool) -> Option<u8> {
        let now = lock(&self.inner.present);
        ids.iter().copied().find(|id| now.contains(id) == present)
    }

    /// The kernel's `del_cpu_dev`: `Ok(count)` or `Err(positive errno)`. Its two up-front
    /// refusals write `apic_index` 0 into `reply`.
    fn del_cpus(
        &self,
        payload: RawCpuPayload<'_>,
        reply: &mut MsgBuf,
        fail: Option<InjectedFailure>,
    ) -> Result<u8, i32> {
        let log = &self.inner.logger;
        let online = lock(&self.inner.present).len();
        if usize::from(payload.count) >= online {
            info!(log, "DEL_CPU refused: would leave no CPU";
                "count" => payload.count, "online" => online);
            // The kernel reports this refusal through its notification, index 0.
            write_reply_apic_index(reply, 0);
            return Err(EINVAL);
        }
        if let Some(id) = self.first_present(payload.apic_ids, false) {
            info!(log, "DEL_CPU refused: unknown APIC ID"; "apic_id" => id);
            write_reply_apic_index(reply, 0);
            return Err(EINVAL);
        }
        let mut callback = lock(&self.inner.callback);
        for (position, &apic_id) in payload.apic_ids.iter().enumerate() {
            if apic_id == self.inner.boot_apic_id {
                info!(log, "DEL_CPU failed part-way: the boot CPU cannot be removed";
                    "offline_before_it" => position);
                return Err(EINVAL);
            }
            if !lock(&self.inner.present).contains(&apic_id) {
                info!(log, "DEL_CPU failed part-way: already removed"; "apic_id" => apic_id);
                return Err(EINVAL);
            }
            let offline = InjectedFailure::or_act(fail, position, || {
                (*callback)(CpuAction::Offline(apic_id))
            });
            if let Err(errno) = offline {
                // It stays; the CPUs before it stay offline.
                info!(log, "DEL_CPU failed part-way: CPU did not go offline";
                    "apic_id" => apic_id, "errno" => errno, "offline_before_it" => position);
                return Err(positive_errno(errno));
            }
            lock(&self.inner.present).retain(|&id| id != apic_id);
            debug!(log, "CPU offline"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }
}
