//! What PID 1 does when it cannot go on: say why on the console, then reboot
//! the guest. The host runs the VM so that a guest reboot ends it (QEMU
//! `-no-reboot`), so the supervisor sees the VM end and finds the reason in
//! the console log. PID 1 never just exits: that would be a kernel panic
//! with the reason lost.

use nix::sys::reboot::{reboot, RebootMode};

pub fn fatal(message: &str) -> ! {
    eprintln!("tegmen-agent: fatal: {message}");
    eprintln!("tegmen-agent: rebooting the guest");
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; nothing else is left to do.
    loop {
        std::thread::park();
    }
}

/// A panic in any thread of PID 1 is fatal for the guest.
pub fn install_panic_hook() {
    if std::process::id() != 1 {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        fatal(&format!("panic: {info}"));
    }));
}
