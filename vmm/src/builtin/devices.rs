//! The port I/O devices of the builtin monitor: the 8250 serial console
//! (vm-superio, interrupt through an irqfd on IRQ 4), the i8042
//! controller's reset line, and the boot mark port.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use kvm_ioctls::VmFd;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{Error, BOOT_MARK_PORT};

pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

/// Raises the serial port's interrupt through its irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    None,
    Reset,
    BootMark,
}

type Console = Box<dyn Write + Send>;

pub struct PioDevices {
    serial: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>>,
    /// Ports with no device that the guest touched, each logged once (at
    /// most [`MAX_LOGGED_PORTS`] of them).
    unhandled: Mutex<std::collections::BTreeSet<u16>>,
}

/// How many distinct unhandled ports are logged: a guest cannot fill the
/// log by walking all 65536.
pub const MAX_LOGGED_PORTS: usize = 32;

impl PioDevices {
    /// The serial port writes to `console` (appended), or nowhere.
    pub fn new(vm: &VmFd, console: Option<&Path>) -> Result<PioDevices, Error> {
        let out: Console = match console {
            Some(p) => Box::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::Device(format!("console {}: {e}", p.display())))?,
            ),
            None => Box::new(std::io::sink()),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("serial eventfd: {e}")))?;
        vm.register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|e| Error::Device(format!("serial irqfd on IRQ {SERIAL_IRQ}: {e}")))?;
        Ok(PioDevices {
            serial: Mutex::new(Serial::new(IrqTrigger(irq), out)),
            unhandled: Mutex::new(Default::default()),
        })
    }

    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        let Some(&value) = data.first() else {
            return PioAction::None;
        };
        match port {
            SERIAL_PORT..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = serial.write((port - SERIAL_PORT) as u8, value) {
                    log::debug!("serial write: {e:?}");
                }
                PioAction::None
            }
            I8042_COMMAND if value == I8042_RESET => PioAction::Reset,
            BOOT_MARK_PORT => PioAction::BootMark,
            I8042_DATA | I8042_COMMAND => PioAction::None,
            _ => {
                self.note_unhandled(port, "write", data.len());
                PioAction::None
            }
        }
    }

    fn note_unhandled(&self, port: u16, what: &str, len: usize) {
        let mut seen = self.unhandled.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < MAX_LOGGED_PORTS && seen.insert(port) {
            log::warn!("port {what} of {len} bytes at {port:#x}: no device there (ignored; logged once per port)");
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_PORT..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                let v = serial.read((port - SERIAL_PORT) as u8);
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = v;
                }
            }
            // The i8042 has no data and is never busy.
            I8042_DATA | I8042_COMMAND => data.fill(0),
            // Nothing there.
            _ => {
                self.note_unhandled(port, "read", data.len());
                data.fill(0xff)
            }
        }
    }
}
