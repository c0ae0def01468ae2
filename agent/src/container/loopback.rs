//! Bringing up `lo` in a container's new network namespace.
//!
//! A pod's network namespace in the guest is its sandbox container's; on
//! a node CNI's loopback plugin brings `lo` up there, so the agent does
//! it when the spec asks with the [`LOOPBACK_ANNOTATION`] annotation (the
//! shim sets it on a pod's sandbox container; `tegmen` does not, as runc
//! leaves `lo` down).

use std::os::fd::AsRawFd;

/// `"up"`: bring `lo` up in the container's network namespace.
pub const LOOPBACK_ANNOTATION: &str = "io.tegmen.guest.loopback";

/// Sets IFF_UP on `lo` in the network namespace of process `pid`, from a
/// thread of its own (setns changes only the calling thread's namespace,
/// and the thread ends right after).
pub fn bring_up(pid: i32) -> std::io::Result<()> {
    std::thread::spawn(move || -> std::io::Result<()> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        // SAFETY: setns on a namespace fd we own, for this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a datagram socket, only used for the interface ioctls.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a zeroed ifreq is valid; the name is NUL-terminated.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
        let result = unsafe {
            if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        // SAFETY: closing the socket we made.
        unsafe { libc::close(sock) };
        result
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the loopback thread panicked")))
}
