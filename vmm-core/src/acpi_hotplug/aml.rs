//! The hotplug AML that goes into the DSDT ([`HotplugAml`]): the processor container
//! `\_SB_.CPUS` with the controller's registers, one `ACPI0007` device per possible vCPU,
//! the scan method, and the GED `\_SB_.GED0` whose `_EVT` calls it. The ASL it corresponds
//! to is in [the module docs](super).

use acpi_tables::aml::{
    Acquire, Add, And, Concat, Device, EISAName, Else, Equal, Field, FieldAccessType, FieldEntry,
    FieldLockRule, FieldUpdateRule, If, Interrupt, LessThan, Local, Memory32Fixed, Method,
    MethodCall, Mutex, Name, Notify, OpRegion, OpRegionSpace, Or, Path, Release, ResourceTemplate,
    Return, ShiftLeft, Store, ToBuffer, While, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::{regs, AcpiHotplugError, AcpiHotplugLayout};
use crate::arch::x86_64::acpi::{AcpiCpu, MAX_XAPIC_ID};

// The AML fields follow the register block: `CSEL`, 32 reserved bits (the status bits' byte
// field starts there), `CNXT`, `CCNT`.
const _: () = assert!(regs::SEL == 0 && regs::STAT == 4 && regs::NEXT == 8 && regs::COUNT == 12);

/// The most processor devices: their names are `C000`..`CFFF`.
pub const MAX_CPUS: usize = 0x1000;

/// Already-encoded AML (lets the builders' borrowed trees be built piece by piece).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(a: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Raw(v)
}

/// `body` between `Acquire (CPLK, 0xFFFF)` and `Release (CPLK)`: the controller's `SEL` and
/// the registers it selects belong to one method at a time.
fn locked(body: &[&dyn Aml]) -> Raw {
    let mut v = Vec::new();
    Acquire::new("CPLK".into(), 0xffff).to_aml_bytes(&mut v);
    for term in body {
        term.to_aml_bytes(&mut v);
    }
    Release::new("CPLK".into()).to_aml_bytes(&mut v);
    Raw(v)
}

/// The name of the processor device of vCPU `index`: `C` and three hex digits.
pub fn cpu_device_name(index: usize) -> String {
    format!("C{index:03X}")
}

/// The DSDT objects for ACPI CPU hotplug of `cpus` (in vCPU index order) with the devices at
/// `layout`. Hand it to [`build_tables`](crate::arch::x86_64::acpi::build_tables).
#[derive(Debug, Clone)]
pub struct HotplugAml {
    cpus: Vec<AcpiCpu>,
    layout: AcpiHotplugLayout,
}

impl HotplugAml {
    /// The AML for `cpus` at `layout`.
    ///
    /// # Errors
    ///
    /// [`AcpiHotplugError::Cpus`] for no vCPU or more than [`MAX_CPUS`].
    pub fn new(cpus: &[AcpiCpu], layout: AcpiHotplugLayout) -> Result<Self, AcpiHotplugError> {
        if cpus.is_empty() || cpus.len() > MAX_CPUS {
            return Err(AcpiHotplugError::Cpus {
                count: cpus.len(),
                max: MAX_CPUS,
            });
        }
        Ok(Self {
            cpus: cpus.to_vec(),
            layout,
        })
    }

    /// `\_SB_.CPUS.CSTA(index)`: 0xF when the controller says enabled, else 0.
    fn csta() -> Raw {
        let cpen = Path::new("CPEN");
        let csel = Path::new("CSEL");
        let status = locked(&[
            &Store::new(&csel, &acpi_tables::aml::Arg(0)),
            &Store::new(&Local(0), &ZERO),
            &If::new(
                &Equal::new(&cpen, &ONE),
                vec![&Store::new(&Local(0), &0x0fu8)],
            ),
        ]);
        raw(&Method::new(
            "CSTA".into(),
            1,
            false,
            vec![&status, &Return::new(&Local(0))],
        ))
    }

    /// `\_SB_.CPUS.CEJX(index)`: writes the eject command for the CPU.
    fn cejx() -> Raw {
        let csel = Path::new("CSEL");
        let cejf = Path::new("CEJF");
        let eject = locked(&[
            &Store::new(&csel, &acpi_tables::aml::Arg(0)),
            &Store::new(&cejf, &ONE),
        ]);
        raw(&Method::new("CEJX".into(), 1, false, vec![&eject]))
    }

    /// `\_SB_.CPUS.CMAT(uid, apic_id)`: the CPU's MADT entry, Enabled when the controller
    /// says so, else Online Capable (as the MADT lists a CPU that was not present at boot).
    /// A Local APIC entry (type 0, 8 bytes) for APIC IDs up to 254, a Local x2APIC entry
    /// (type 9, 16 bytes) above, as in the MADT. Built from 64-bit integers: the DSDT is
    /// revision 2.
    fn cmat() -> Raw {
        let (arg0, arg1) = (acpi_tables::aml::Arg(0), acpi_tables::aml::Arg(1));
        let csta = MethodCall::new("CSTA".into(), vec![&arg0]);
        let max_xapic = MAX_XAPIC_ID + 1;
        // Local APIC: type 0, length 8, UID, APIC ID, then the 32-bit flags.
        let uid16 = ShiftLeft::new(&ZERO, &arg0, &16u8);
        let apic24 = ShiftLeft::new(&ZERO, &arg1, &24u8);
        let flags32 = ShiftLeft::new(&ZERO, &Local(1), &32u8);
        let head = Or::new(&ZERO, &0x0800u16, &uid16);
        let tail = Or::new(&ZERO, &apic24, &flags32);
        let lapic = Or::new(&ZERO, &head, &tail);
        let lapic_buf = ToBuffer::new(&ZERO, &lapic);
        // Local x2APIC: type 9, length 16, 2 reserved, APIC ID; flags, UID.
        let apic32 = ShiftLeft::new(&ZERO, &arg1, &32u8);
        let uid32 = ShiftLeft::new(&ZERO, &arg0, &32u8);
        let x2_lo = Or::new(&ZERO, &0x1009u16, &apic32);
        let x2_hi = Or::new(&ZERO, &Local(1), &uid32);
        let x2 = Concat::new(&ZERO, &x2_lo, &x2_hi);
        raw(&Method::new(
            "CMAT".into(),
            2,
            false,
            vec![
                &Store::new(&Local(1), &2u8),
                &If::new(&csta, vec![&Store::new(&Local(1), &ONE)]),
                &If::new(
                    &LessThan::new(&arg1, &max_xapic),
                    vec![&Return::new(&lapic_buf)],
                ),
                &Return::new(&x2),
            ],
        ))
    }

    /// The processor device of vCPU `index`.
    fn cpu_device(index: usize, cpu: &AcpiCpu) -> Raw {
        let uid = index as u64;
        let sta_call = MethodCall::new("CSTA".into(), vec![&uid]);
        let sta_ret = Return::new(&sta_call);
        let sta = Method::new("_STA".into(), 0, false, vec![&sta_ret]);
        let apic_id = u64::from(cpu.apic_id);
        let mat_call = MethodCall::new("CMAT".into(), vec![&uid, &apic_id]);
        let mat_ret = Return::new(&mat_call);
        let mat = Method::new("_MAT".into(), 0, false, vec![&mat_ret]);
        let ej0_call = MethodCall::new("CEJX".into(), vec![&uid]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&ej0_call]);
        let hid = Name::new("_HID".into(), &"ACPI0007");
        let uid_name = Name::new("_UID".into(), &uid);
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid_name, &sta, &mat];
        // The boot processor cannot be ejected: it has no _EJ0.
        if index != 0 {
            children.push(&ej0);
        }
        raw(&Device::new(Path::new(&cpu_device_name(index)), children))
    }

    /// `\_SB_.CPUS.CTFY(index, event)`: `Notify` on the processor device of `index`.
    fn ctfy(count: usize) -> Raw {
        let (arg0, arg1) = (acpi_tables::aml::Arg(0), acpi_tables::aml::Arg(1));
        let ifs: Vec<Raw> = (0..count)
            .map(|i| {
                let index = i as u64;
                let dev = Path::new(&cpu_device_name(i));
                raw(&If::new(
                    &Equal::new(&arg0, &index),
                    vec![&Notify::new(&dev, &arg1)],
                ))
            })
            .collect();
        let children: Vec<&dyn Aml> = ifs.iter().map(|r| r as &dyn Aml).collect();
        raw(&Method::new("CTFY".into(), 2, false, children))
    }

    /// `\_SB_.CPUS.CSCN()`: for each CPU with an event (the controller's `NEXT`), notify it
    /// (1: device check, for an insert; 3: eject request, for a removal) and acknowledge the
    /// event; at most `CCNT` rounds.
    fn cscn() -> Raw {
        let (cnxt, csel, ccnt) = (Path::new("CNXT"), Path::new("CSEL"), Path::new("CCNT"));
        let (cins, crmv) = (Path::new("CINS"), Path::new("CRMV"));
        let notify_insert = MethodCall::new("CTFY".into(), vec![&Local(0), &ONE]);
        let notify_remove = MethodCall::new("CTFY".into(), vec![&Local(0), &3u8]);
        let (is_remove, ack_remove) = (Equal::new(&crmv, &ONE), Store::new(&crmv, &ONE));
        let on_remove = raw(&If::new(&is_remove, vec![&notify_remove, &ack_remove]));
        let (is_insert, ack_insert) = (Equal::new(&cins, &ONE), Store::new(&cins, &ONE));
        let on_insert = raw(&If::new(&is_insert, vec![&notify_insert, &ack_insert]));
        let none = u64::from(regs::NEXT_NONE);
        let body = raw(&While::new(
            &LessThan::new(&Local(1), &ccnt),
            vec![
                &Store::new(&Local(0), &cnxt),
                &If::new(
                    &Equal::new(&Local(0), &none),
                    vec![&Store::new(&Local(1), &ccnt)],
                ),
                &Else::new(vec![
                    &Store::new(&csel, &Local(0)),
                    &on_insert,
                    &Else::new(vec![&on_remove]),
                    &Add::new(&Local(1), &Local(1), &ONE),
                ]),
            ],
        ));
        let scan = locked(&[&Store::new(&Local(1), &ZERO), &body]);
        raw(&Method::new("CSCN".into(), 0, true, vec![&scan]))
    }

    fn cpus_device(&self) -> Raw {
        let base = self.layout.controller_base;
        let len = regs::LEN;
        let hid = Name::new("_HID".into(), &"ACPI0010");
        let cid = Name::new("_CID".into(), &EISAName::new("PNP0A05"));
        let mem = Memory32Fixed::new(true, base, len);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem]));
        let base64 = u64::from(base);
        let len64 = u64::from(len);
        let region = OpRegion::new("CPHR".into(), OpRegionSpace::SystemMemory, &base64, &len64);
        let dword_fields = Field::new(
            "CPHR".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Named(*b"CSEL", 32),
                FieldEntry::Reserved(32),
                FieldEntry::Named(*b"CNXT", 32),
                FieldEntry::Named(*b"CCNT", 32),
            ],
        );
        let status_bits = Field::new(
            "CPHR".into(),
            FieldAccessType::Byte,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Reserved(32),
                FieldEntry::Named(*b"CPEN", 1),
                FieldEntry::Named(*b"CINS", 1),
                FieldEntry::Named(*b"CRMV", 1),
                FieldEntry::Named(*b"CEJF", 1),
            ],
        );
        let lock = Mutex::new("CPLK".into(), 0);
        let (csta, cejx, cmat) = (Self::csta(), Self::cejx(), Self::cmat());
        let devices: Vec<Raw> = self
            .cpus
            .iter()
            .enumerate()
            .map(|(i, c)| Self::cpu_device(i, c))
            .collect();
        let (ctfy, cscn) = (Self::ctfy(self.cpus.len()), Self::cscn());
        let mut children: Vec<&dyn Aml> = vec![
            &hid,
            &cid,
            &crs,
            &region,
            &dword_fields,
            &status_bits,
            &lock,
            &csta,
            &cejx,
            &cmat,
        ];
        children.extend(devices.iter().map(|d| d as &dyn Aml));
        children.push(&ctfy);
        children.push(&cscn);
        raw(&Device::new("_SB_.CPUS".into(), children))
    }

    fn ged_device(&self) -> Raw {
        let hid = Name::new("_HID".into(), &"ACPI0013");
        let uid = Name::new("_UID".into(), &ZERO);
        // Edge-triggered, active high, exclusive: an irqfd pulse.
        let irq = Interrupt::new(true, true, false, false, self.layout.gsi);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
        let base = u64::from(self.layout.ged_base);
        let len = 4u64;
        let region = OpRegion::new("GDRG".into(), OpRegionSpace::SystemMemory, &base, &len);
        let gdat = Path::new("GDAT");
        let field = Field::new(
            "GDRG".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![FieldEntry::Named(*b"GDAT", 32)],
        );
        let scan = MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
        let cpu_bit = u64::from(super::ged::events::CPU_HOTPLUG);
        let evt = raw(&Method::new(
            "_EVT".into(),
            1,
            true,
            vec![
                &Store::new(&Local(0), &gdat),
                // Write 1 to clear what was seen: an event raised meanwhile stays pending.
                &Store::new(&gdat, &Local(0)),
                &If::new(&And::new(&ZERO, &Local(0), &cpu_bit), vec![&scan]),
            ],
        ));
        raw(&Device::new(
            "_SB_.GED0".into(),
            vec![&hid, &uid, &crs, &region, &field, &evt],
        ))
    }
}

impl Aml for HotplugAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        self.cpus_device().to_aml_bytes(sink);
        self.ged_device().to_aml_bytes(sink);
    }
}
