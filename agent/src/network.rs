//! The guest side of pod networking: the NICs the host wired to the pod's
//! interfaces get what those interfaces had (MTU, addresses, routes,
//! permanent neighbours), in the guest's own network namespace, which the
//! sandbox container and so the whole pod share.
//!
//! NICs are found by MAC (the host gives each the MAC of the interface it
//! stands for). IPv4, with the classic interface ioctls; an IPv6 address
//! or route is skipped with a log line for now.

use std::net::Ipv4Addr;

use tegmen_agent_api::agent::ConfigureNetworkRequest;

/// Finds the name of the interface with MAC `mac` (any case).
fn name_by_mac(mac: &str) -> Result<String, String> {
    let want = mac.to_ascii_lowercase();
    let dir = std::fs::read_dir("/sys/class/net").map_err(|e| format!("/sys/class/net: {e}"))?;
    for e in dir.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(&want) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no network interface has MAC {mac}"))
}

/// `a.b.c.d/len` (IPv4) or `None` for IPv6; an error for anything else.
fn parse_v4_cidr(s: &str) -> Result<Option<(Ipv4Addr, u8)>, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not address/prefix"))?;
    let len: u8 = len.parse().map_err(|_| format!("{s:?}: bad prefix length"))?;
    if addr.contains(':') {
        if len > 128 {
            return Err(format!("{s:?}: bad prefix length"));
        }
        return Ok(None);
    }
    let ip: Ipv4Addr = addr.parse().map_err(|_| format!("{s:?}: bad address"))?;
    if len > 32 {
        return Err(format!("{s:?}: bad prefix length"));
    }
    Ok(Some((ip, len)))
}

fn netmask(len: u8) -> Ipv4Addr {
    if len == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(len)))
    }
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how
    // the ioctls take an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Sock(libc::c_int);

impl Sock {
    fn new() -> Result<Sock, String> {
        // SAFETY: a datagram socket, only used for ioctls.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        Ok(Sock(fd))
    }

    fn ifreq(name: &str) -> Result<libc::ifreq, String> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(format!("interface name {name:?} too long"));
        }
        // SAFETY: a zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl<T>(&self, what: &str, request: libc::c_ulong, arg: &mut T) -> Result<(), String> {
        // SAFETY: every request used here reads or writes one `T`.
        if unsafe { libc::ioctl(self.0, request, arg as *mut T) } != 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Sock {
    /// Sets IFF_UP on `name`.
    fn up(&self, name: &str) -> Result<(), String> {
        let mut r = Sock::ifreq(name)?;
        self.ioctl(&format!("{name}: flags"), libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(&format!("{name}: up"), libc::SIOCSIFFLAGS, &mut r)
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: closing the socket we made.
        unsafe { libc::close(self.0) };
    }
}

/// Brings `lo` up in this process's network namespace.
pub fn loopback_up() -> Result<(), String> {
    Sock::new()?.up("lo")
}

/// Applies `req` in this process's network namespace.
pub fn configure(req: &ConfigureNetworkRequest) -> Result<(), String> {
    let sock = Sock::new()?;
    // The pod's `lo`, as CNI's loopback plugin leaves it on a node.
    sock.up("lo")?;
    for nic in &req.interfaces {
        let name = name_by_mac(&nic.mac)?;
        if nic.mtu > 0 {
            let mut r = Sock::ifreq(&name)?;
            r.ifr_ifru.ifru_mtu = nic.mtu as libc::c_int;
            sock.ioctl(&format!("{name}: MTU {}", nic.mtu), libc::SIOCSIFMTU, &mut r)?;
        }
        let mut first = true;
        for a in &nic.addresses {
            let Some((ip, len)) = parse_v4_cidr(a)? else {
                log::warn!("{name}: IPv6 address {a} skipped (not supported yet)");
                continue;
            };
            if !first {
                log::warn!("{name}: address {a} skipped (one IPv4 address per NIC for now)");
                continue;
            }
            first = false;
            let mut r = Sock::ifreq(&name)?;
            r.ifr_ifru.ifru_addr = sockaddr_in(ip);
            sock.ioctl(&format!("{name}: address {a}"), libc::SIOCSIFADDR, &mut r)?;
            let mut r = Sock::ifreq(&name)?;
            r.ifr_ifru.ifru_netmask = sockaddr_in(netmask(len));
            sock.ioctl(&format!("{name}: netmask of {a}"), libc::SIOCSIFNETMASK, &mut r)?;
        }
        sock.up(&name)?;
    }
    for n in &req.neighbors {
        let name = name_by_mac(&n.device_mac)?;
        let Ok(ip) = n.ip.parse::<Ipv4Addr>() else {
            log::warn!("{name}: neighbour {} skipped (IPv4 only for now)", n.ip);
            continue;
        };
        let mac = parse_mac(&n.mac)?;
        // SAFETY: a zeroed arpreq is valid.
        let mut a: libc::arpreq = unsafe { std::mem::zeroed() };
        a.arp_pa = sockaddr_in(ip);
        a.arp_ha.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in a.arp_ha.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
        a.arp_flags = libc::ATF_PERM | libc::ATF_COM;
        for (d, s) in a.arp_dev.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        sock.ioctl(&format!("{name}: neighbour {}", n.ip), libc::SIOCSARP, &mut a)?;
    }
    // Routes on the link first: a gateway must be reachable when its route
    // goes in (CNIs that give a /32 and a link route to the gateway).
    let mut routes: Vec<_> = req.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    for r in routes {
        let name = name_by_mac(&r.device_mac)?;
        let (dst, len) = if r.destination.is_empty() {
            (Ipv4Addr::UNSPECIFIED, 0)
        } else {
            match parse_v4_cidr(&r.destination)? {
                Some(d) => d,
                None => {
                    log::warn!("{name}: IPv6 route {} skipped (not supported yet)", r.destination);
                    continue;
                }
            }
        };
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(
                r.gateway
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("route {}: bad gateway {:?}", r.destination, r.gateway))?,
            )
        };
        // SAFETY: a zeroed rtentry is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(dst);
        rt.rt_genmask = sockaddr_in(netmask(len));
        rt.rt_flags = libc::RTF_UP;
        if let Some(g) = gateway {
            rt.rt_gateway = sockaddr_in(g);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        if len == 32 {
            rt.rt_flags |= libc::RTF_HOST;
        }
        let mut dev: Vec<libc::c_char> = name.bytes().map(|b| b as libc::c_char).collect();
        dev.push(0);
        rt.rt_dev = dev.as_mut_ptr();
        let what = if r.destination.is_empty() {
            "default"
        } else {
            r.destination.as_str()
        };
        match sock.ioctl(&format!("{name}: route {what}"), libc::SIOCADDRT, &mut rt) {
            // The kernel's own subnet route is there already.
            Err(e) if e.ends_with("File exists (os error 17)") => {}
            other => other?,
        }
    }
    Ok(())
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_masks() {
        assert_eq!(
            parse_v4_cidr("10.1.2.3/24").unwrap(),
            Some(("10.1.2.3".parse().unwrap(), 24))
        );
        assert_eq!(parse_v4_cidr("fd00::1/64").unwrap(), None);
        for bad in ["10.1.2.3", "10.1.2.3/33", "x/24", "10.1.2.3/abc", "fd00::1/129"] {
            assert!(parse_v4_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(parse_mac("02:42:0A:fc:01:02").unwrap(), [2, 0x42, 10, 0xfc, 1, 2]);
        assert!(parse_mac("02:42").is_err());
        assert!(name_by_mac("ff:ff:ff:ff:ff:fe")
            .unwrap_err()
            .contains("no network interface"));
    }
}
