//! The builtin monitor: Tegmen's own KVM VMM, for hosts with hardware
//! virtualization (where QEMU is not needed).
//!
//! [`Vm::new`] opens `/dev/kvm`, makes the VM (in-kernel irqchip and PIT),
//! its memfd-backed RAM, loads the kernel through its PVH entry
//! ([`boot`]), and sets up one vCPU per configured CPU ([`cpu`]).
//! [`Vm::run`] runs one thread per vCPU until the guest resets (i8042),
//! triple-faults, powers off, exits in a way the monitor does not handle
//! (stopped with the reason and the guest RIP, never left hanging), or the
//! host stops it.
//!
//! Port I/O the monitor answers: the 8250 serial port at 0x3f8 (IRQ 4,
//! written to the console file), the i8042 controller's reset command, and
//! the boot mark port [`BOOT_MARK_PORT`]: the first write there records the
//! time since the monitor started.

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod fs;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod net;
pub mod virtio_mmio;
pub mod vsock;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use devices::PioDevices;
use virtio_mmio::{Interrupt, MmioTransport, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

/// The guest writes here when it is ready (the agent does, once it serves).
pub const BOOT_MARK_PORT: u16 = 0x440;
/// The IRQ of the first virtio-mmio device; the n-th gets this + n.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// At most this many virtio-mmio devices (IRQs 5..=23 of the IOAPIC).
pub const VIRTIO_MAX_DEVICES: usize = 19;

/// The kernel command line: `base`, then one `virtio_mmio.device=` entry
/// per device, announcing its registers and IRQ.
pub fn full_cmdline(base: &str, devices: usize) -> String {
    let mut c = base.trim().to_string();
    for n in 0..devices {
        let addr = layout::MMIO_DEVICES_START + n as u64 * layout::MMIO_DEVICE_SIZE;
        let irq = VIRTIO_FIRST_IRQ + n as u32;
        c.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    c.trim_start().to_string()
}

/// The virtio-mmio devices, each in its 4 KiB window from
/// [`layout::MMIO_DEVICES_START`].
struct MmioBus {
    devices: Vec<Mutex<MmioTransport>>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let rel = addr.checked_sub(layout::MMIO_DEVICES_START)?;
        let index = (rel / layout::MMIO_DEVICE_SIZE) as usize;
        self.devices.get(index).map(|d| (d, rel % layout::MMIO_DEVICE_SIZE))
    }

    /// False where no device is at `addr` (the guest reads all ones, as on
    /// a real bus).
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// False where no device is at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Errors making or running a VM; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("/dev/kvm is unusable: {0}")]
    Kvm(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel {0}")]
    Kernel(String),
    #[error("initramfs {0}")]
    Initramfs(String),
    #[error("device: {0}")]
    Device(String),
    #[error("vCPU: {0}")]
    Vcpu(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// An uncompressed ELF `vmlinux` with a PVH entry point.
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// Where the serial console's output goes (appended); none: dropped.
    pub console: Option<PathBuf>,
    /// The syscall allow-lists the monitor's threads run under once
    /// [`Vm::run`] starts the guest ([`crate::seccomp`]): the process's
    /// list on every thread, then each vCPU thread, device worker and the
    /// calling thread narrowed to its own. Anything but `Off` filters the
    /// whole process for good, so it is for a process running one VM
    /// (`tegmen-vmm`), not for a test harness.
    pub seccomp: crate::seccomp::Mode,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset through the i8042 controller (Linux's
    /// `reboot=k`, and what a guest's `reboot` or power-off comes to here).
    Reset,
    /// A triple fault or an explicit KVM shutdown/reset event. On AMD, KVM
    /// resets the vCPU before it reports a triple fault, so `rip` is then
    /// the reset vector, 0xfff0, not where the fault happened.
    Shutdown { vcpu: u8, rip: u64 },
    /// A vCPU exit the monitor does not handle.
    Unhandled { vcpu: u8, reason: String, rip: u64 },
    /// `KVM_RUN` failed.
    Failed { vcpu: u8, error: String },
    /// The host stopped it ([`Vm::run`]'s timeout).
    Stopped,
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub reason: StopReason,
    /// Time from [`Vm::new`] to the first write to [`BOOT_MARK_PORT`].
    pub boot_mark: Option<Duration>,
    /// Time from [`Vm::new`] to the first vCPU entering the guest
    /// (`KVM_RUN`): the monitor's own start-up cost.
    pub first_entry: Option<Duration>,
}

/// What the vCPU threads share.
struct Shared {
    stop: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    stopped: Condvar,
    boot_mark: OnceLock<Duration>,
    first_entry: OnceLock<Duration>,
    started: Instant,
}

impl Shared {
    /// Records the first reason; every vCPU then leaves its loop.
    fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            log::info!("VM stops: {reason:?}");
            *r = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.stopped.notify_all();
    }
}

pub struct Vm {
    // Kept open for the VM's life.
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    pio: Arc<PioDevices>,
    /// virtio-mmio windows announced, and the devices in them so far.
    slots: usize,
    transports: Vec<Mutex<MmioTransport>>,
    shared: Arc<Shared>,
    seccomp: crate::seccomp::Mode,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Vm, Error> {
        Vm::with_devices(config, Vec::new())
    }

    /// A VM with `devices` on virtio-mmio transports, announced to the
    /// kernel on its command line.
    pub fn with_devices(config: &VmConfig, devices: Vec<Box<dyn VirtioDevice>>) -> Result<Vm, Error> {
        let mut vm = Vm::prepare(config, devices.len())?;
        for device in devices {
            vm.attach(device)?;
        }
        Ok(vm)
    }

    /// The VM with its kernel loaded and `slots` virtio-mmio windows
    /// announced on the command line, for devices [`Vm::attach`]ed later
    /// (after the monitor has entered its sandbox, say). A window left
    /// empty reads as no device.
    pub fn prepare(config: &VmConfig, slots: usize) -> Result<Vm, Error> {
        let started = Instant::now();
        if slots > VIRTIO_MAX_DEVICES {
            return Err(Error::Config(format!(
                "{slots} virtio devices; at most {VIRTIO_MAX_DEVICES}"
            )));
        }
        if config.vcpus == 0 {
            return Err(Error::Config("at least one vCPU is needed".into()));
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm(format!("opening /dev/kvm: {e}")))?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(Error::Kvm(format!("KVM API version {api}, 12 expected")));
        }
        let vm = kvm.create_vm().map_err(|e| Error::Kvm(format!("KVM_CREATE_VM: {e}")))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| Error::Kvm(format!("KVM_SET_TSS_ADDR: {e}")))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm(format!("KVM_CREATE_IRQCHIP: {e}")))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Kvm(format!("KVM_CREATE_PIT2: {e}")))?;

        let mem = memory::create(config.memory_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(format!("host address of region {slot}: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, which
            // is as long as the VM (both are fields of `Vm`, and the vCPU
            // threads end before `run` returns).
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| Error::Kvm(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
        }

        let cmdline = boot::cmdline(&full_cmdline(&config.cmdline, slots))?;
        let size = u64::from(config.memory_mib) << 20;
        let entry = boot::load(&mem, &config.kernel, config.initramfs.as_deref(), &cmdline, size)?;
        mptable::write(&mem, config.vcpus)?;

        let pio = Arc::new(PioDevices::new(&vm, config.console.as_deref())?);
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::Vcpu(format!("KVM_CREATE_VCPU {id}: {e}")))?;
            cpu::setup(&kvm, &vcpu, &mem, &entry, id, config.vcpus)?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            pio,
            slots,
            transports: Vec::new(),
            seccomp: config.seccomp,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                reason: Mutex::new(None),
                stopped: Condvar::new(),
                boot_mark: OnceLock::new(),
                first_entry: OnceLock::new(),
                started,
            }),
        })
    }

    /// Puts `device` in the next announced virtio-mmio window: its IRQ
    /// line as an irqfd, its queue notifications as ioeventfds.
    pub fn attach(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), Error> {
        let n = self.transports.len();
        if n >= self.slots {
            return Err(Error::Config(format!(
                "{} virtio-mmio windows were announced, all taken",
                self.slots
            )));
        }
        let irq = VIRTIO_FIRST_IRQ + n as u32;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&irqfd, irq)
            .map_err(|e| Error::Device(format!("irqfd on IRQ {irq}: {e}")))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt)
            .map_err(|e| Error::Device(format!("queue eventfds: {e}")))?;
        // Notifications of queue q reach its kick without a VM exit.
        let notify = layout::MMIO_DEVICES_START + n as u64 * layout::MMIO_DEVICE_SIZE + virtio_mmio::reg::QUEUE_NOTIFY;
        for q in 0..transport.num_queues() {
            let kick = transport.kick(q).expect("one kick per queue");
            self.vm
                .register_ioevent(kick, &IoEventAddress::Mmio(notify), q as u32)
                .map_err(|e| Error::Device(format!("ioeventfd of device {n} queue {q}: {e}")))?;
        }
        self.transports.push(Mutex::new(transport));
        Ok(())
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The eventfd that the driver's notifications of queue `queue` of
    /// virtio device `device` signal (a copy).
    pub fn queue_kick(&self, device: usize, queue: usize) -> Option<EventFd> {
        let d = self.transports.get(device)?;
        let t = d.lock().unwrap_or_else(|p| p.into_inner());
        t.kick(queue).and_then(|k| k.try_clone().ok())
    }

    /// Runs the vCPUs until the VM stops, or `timeout` passes (then it is
    /// stopped: [`StopReason::Stopped`]).
    pub fn run(mut self, timeout: Option<Duration>) -> Result<RunOutcome, Error> {
        extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // A no-op handler: the signal only makes KVM_RUN return EINTR.
        register_signal_handler(SIGRTMIN(), kick).map_err(|e| Error::Vcpu(format!("signal handler: {e}")))?;

        let mmio = Arc::new(MmioBus {
            devices: std::mem::take(&mut self.transports),
        });
        let lists = confine(self.seccomp)?;
        let mut threads = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let (shared, pio, mmio) = (self.shared.clone(), self.pio.clone(), mmio.clone());
            let list = lists.as_ref().map(|l| l.vcpu.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(list) = list {
                        if !crate::seccomp::apply_to_this_thread(&list) {
                            shared.stop(StopReason::Failed {
                                vcpu: id as u8,
                                error: "cannot install the vCPU thread's seccomp list".into(),
                            });
                            return;
                        }
                    }
                    vcpu_loop(vcpu, id as u8, &shared, &pio, &mmio)
                })
                .map_err(|e| Error::Vcpu(format!("starting the thread of vCPU {id}: {e}")))?;
            threads.push(t);
        }
        if let Some(l) = &lists {
            // This thread only waits, kicks the vCPUs and tears down now.
            if !crate::seccomp::apply_to_this_thread(&l.control) {
                self.shared.stop(StopReason::Failed {
                    vcpu: 0,
                    error: "cannot install the control thread's seccomp list".into(),
                });
            }
        }

        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut reason = self.shared.reason.lock().unwrap_or_else(|p| p.into_inner());
            while reason.is_none() {
                let wait = match deadline {
                    Some(d) => match d.checked_duration_since(Instant::now()) {
                        Some(left) => left,
                        None => break,
                    },
                    None => Duration::from_secs(3600),
                };
                reason = self
                    .shared
                    .stopped
                    .wait_timeout(reason, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        self.shared.stop(StopReason::Stopped);
        // Kick every vCPU out of KVM_RUN until its thread has ended (a kick
        // that lands just before KVM_RUN is retried).
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for t in threads {
            let _ = t.join();
        }
        let reason = self
            .shared
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StopReason::Stopped);
        // The VM's file descriptors close with `self`.
        let _ = &self.vm;
        Ok(RunOutcome {
            reason,
            boot_mark: self.shared.boot_mark.get().copied(),
            first_entry: self.shared.first_entry.get().copied(),
        })
    }
}

/// The lists of the threads that narrow themselves once the VM runs.
struct ThreadLists {
    vcpu: seccompiler::BpfProgram,
    control: seccompiler::BpfProgram,
}

/// Installs the monitor's process list in `mode` on every thread (before
/// any guest code runs), has device workers started confined from now on,
/// and returns the lists the vCPU threads and the caller then add (none
/// for [`Mode::Off`](crate::seccomp::Mode::Off)).
fn confine(mode: crate::seccomp::Mode) -> Result<Option<ThreadLists>, Error> {
    use crate::seccomp::{program, Kind};
    let compile = |kind: Kind| -> Result<Option<seccompiler::BpfProgram>, Error> {
        program(kind, mode).map_err(|e| Error::Seccomp(e.to_string()))
    };
    let (Some(vcpu), Some(control)) = (compile(Kind::VmmVcpu)?, compile(Kind::VmmControl)?) else {
        log::warn!("seccomp: off, tegmen-vmm runs with every syscall");
        return Ok(None);
    };
    let mut workers = Vec::new();
    for kind in [Kind::VsockBackend, Kind::FsBackend, Kind::NetBackend] {
        workers.extend(compile(kind)?.map(|p| (kind, p)));
    }
    crate::seccomp::install(Kind::Vmm, mode).map_err(|e| Error::Seccomp(e.to_string()))?;
    worker::confine_workers(workers).map_err(Error::Seccomp)?;
    log::info!("seccomp: vCPU, control and device worker threads narrow themselves ({mode})");
    Ok(Some(ThreadLists { vcpu, control }))
}

fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
}

fn vcpu_loop(mut vcpu: VcpuFd, id: u8, shared: &Shared, pio: &PioDevices, mmio: &MmioBus) {
    let mut read_logged = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let _ = shared.first_entry.set(shared.started.elapsed());
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                shared.stop(StopReason::Failed {
                    vcpu: id,
                    error: format!("KVM_RUN: {e}"),
                });
                break;
            }
        };
        let unhandled = match exit {
            VcpuExit::IoOut(port, data) => {
                match pio.write(port, data) {
                    devices::PioAction::None => {}
                    devices::PioAction::Reset => shared.stop(StopReason::Reset),
                    devices::PioAction::BootMark => {
                        let at = shared.started.elapsed();
                        if shared.boot_mark.set(at).is_ok() {
                            log::info!(
                                "boot mark: the guest's agent is up {} ms after the start",
                                at.as_millis()
                            );
                        }
                    }
                }
                None
            }
            VcpuExit::IoIn(port, data) => {
                pio.read(port, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                let len = data.len();
                if !mmio.read(addr, data) && !read_logged {
                    // Reads are harmless: logged once, answered with all ones.
                    read_logged = true;
                    log::warn!(
                        "vCPU {id}: MMIO read of {len} bytes at {addr:#x}: no device there (all ones; logged once)"
                    );
                }
                None
            }
            // Guest RAM and the in-kernel APIC never exit; a write anywhere
            // else but a device is a broken or hostile guest, stopped here
            // rather than left to spin on a device that is not there.
            VcpuExit::MmioWrite(addr, data) => (!mmio.write(addr, data))
                .then(|| format!("MMIO write of {} bytes at {addr:#x}: no device there", data.len())),
            VcpuExit::Shutdown => {
                let rip = rip(&vcpu);
                shared.stop(StopReason::Shutdown { vcpu: id, rip });
                None
            }
            VcpuExit::SystemEvent(kind, _) => {
                let rip = rip(&vcpu);
                log::info!("vCPU {id}: system event {kind}");
                shared.stop(StopReason::Shutdown { vcpu: id, rip });
                None
            }
            VcpuExit::Intr => None,
            other => Some(format!("{other:?}")),
        };
        if let Some(reason) = unhandled {
            let rip = rip(&vcpu);
            log::error!("vCPU {id}: unhandled exit {reason} at RIP {rip:#x}; stopping the VM");
            shared.stop(StopReason::Unhandled { vcpu: id, reason, rip });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_announces_each_device() {
        assert_eq!(full_cmdline("console=ttyS0", 0), "console=ttyS0");
        assert_eq!(
            full_cmdline(" console=ttyS0 reboot=k ", 2),
            "console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(full_cmdline("", 1), "virtio_mmio.device=4K@0xd0000000:5");
    }
}
