//! Architecture-specific setup. Only x86-64 exists: [`x86_64`] holds everything that knows x86
//! registers and firmware tables (see its documentation for the map, and for where ACPI,
//! x2APIC and vCPU state save/restore go). The rest of the crate (the VM, the vCPU manager,
//! Linux boot) calls it and holds no x86 detail of its own.

pub mod x86_64;
