//! The device behind the report ports: records what each vCPU says about itself.

use std::sync::Mutex;

use vcpu_actor::{DeviceError, IoOutcome};
use vmm_core::{BusAccess, BusDevice};

use super::ports;

/// What one vCPU reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidReport {
    /// The vCPU that wrote (KVM vCPU id = APIC ID).
    pub vcpu_id: u32,
    /// CPUID leaf 0x1 EBX, if reported.
    pub leaf1_ebx: Option<u32>,
    /// CPUID leaf 0xB EDX, if reported.
    pub leafb_edx: Option<u32>,
}

impl CpuidReport {
    /// The initial APIC ID in leaf 0x1 EBX\[31:24\].
    pub fn leaf1_apic_id(&self) -> Option<u32> {
        self.leaf1_ebx.map(|ebx| ebx >> 24)
    }
}

/// At most this many vCPUs are recorded (a guest decides how many write).
const MAX_REPORTS: usize = 4096;

/// The report-port device ([`ports::REPORT_BASE`], [`ports::REPORT_LEN`] ports).
#[derive(Debug, Default)]
pub struct CpuidReports {
    reports: Mutex<Vec<CpuidReport>>,
}

impl CpuidReports {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reports so far, one per vCPU that wrote, ordered by vCPU id.
    pub fn reports(&self) -> Vec<CpuidReport> {
        let mut r = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.sort_by_key(|r| r.vcpu_id);
        r
    }

    /// Vcpus whose both values are in.
    pub fn complete(&self) -> usize {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r.leaf1_ebx.is_some() && r.leafb_edx.is_some())
            .count()
    }
}

impl BusDevice for CpuidReports {
    fn read(&self, _access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Err(DeviceError(format!(
                "report ports take 4-byte writes, got {}",
                data.len()
            )));
        };
        let value = u32::from_le_bytes(bytes);
        let port = access.base + access.offset;
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let pos = reports.iter().position(|r| r.vcpu_id == access.vcpu_id);
        let report = match pos {
            Some(i) => &mut reports[i],
            None if reports.len() < MAX_REPORTS => {
                reports.push(CpuidReport {
                    vcpu_id: access.vcpu_id,
                    ..Default::default()
                });
                let last = reports.len() - 1;
                &mut reports[last]
            }
            None => return Err(DeviceError("too many vCPUs reporting".into())),
        };
        match u16::try_from(port) {
            Ok(ports::CPUID_LEAF1_EBX) => report.leaf1_ebx = Some(value),
            Ok(ports::CPUID_LEAFB_EDX) => report.leafb_edx = Some(value),
            _ => return Err(DeviceError(format!("no report at port {port:#x}"))),
        }
        Ok(IoOutcome::Handled)
    }
}
