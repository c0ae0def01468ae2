//! Port-forward in the guest: the TCP ports something listens on (read
//! from `/proc/net/tcp` and `tcp6` of the agent's network namespace, the
//! pod's), and connections the host forwards to one of them.
//!
//! A forwarded connection arrives on the stream port with a
//! `tegmen-forward/1` header (`tegmen_agent_api::stream`); the agent
//! connects to the port on loopback (or on the address it is bound to)
//! and copies both ways until each side ends. At most
//! [`MAX_FORWARDS`] run at once; more are refused.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Forwarded connections open at once, at most.
pub const MAX_FORWARDS: usize = 256;
/// Listening ports reported, at most.
pub const MAX_PORTS: usize = 1024;

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// TCP state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// The listening sockets in one `/proc/net/tcp{,6}` text: (address, port).
pub fn parse_listening(text: &str, v6: bool) -> Vec<(IpAddr, u16)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(_slot), Some(local), Some(_remote), Some(state)) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        if state != TCP_LISTEN {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        let Some(ip) = parse_proc_addr(addr, v6) else { continue };
        out.push((ip, port));
    }
    out
}

/// /proc/net's hex address: a u32 (IPv4) or four u32s (IPv6), each in
/// host byte order.
fn parse_proc_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    if !v6 {
        let n = u32::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 8)?;
        return Some(IpAddr::V4(Ipv4Addr::from(n.to_ne_bytes())));
    }
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

fn listening() -> Vec<(IpAddr, u16)> {
    let mut all = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            all.extend(parse_listening(&text, v6));
        }
    }
    all
}

/// The distinct listening TCP ports, lowest first, at most [`MAX_PORTS`].
pub fn listening_ports() -> Vec<u16> {
    let ports: BTreeSet<u16> = listening().into_iter().map(|(_, p)| p).collect();
    ports.into_iter().take(MAX_PORTS).collect()
}

/// Where to reach a listener on `port`: loopback for a wildcard or
/// loopback listener, else the address it is bound to.
fn targets(port: u16, listeners: &[(IpAddr, u16)]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (ip, p) in listeners.iter().filter(|(_, p)| *p == port) {
        let target = match ip {
            IpAddr::V4(a) if a.is_unspecified() || a.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() || a.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => *other,
        };
        let mut candidates = vec![SocketAddr::new(target, *p)];
        if matches!(ip, IpAddr::V6(a) if a.is_unspecified()) {
            // A dual-stack listener answers on IPv4 loopback too, should
            // ::1 be missing.
            candidates.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), *p));
        }
        for addr in candidates {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// Serves one forwarded connection to `port` (its header already read).
pub fn forward(mut conn: UnixStream, port: u16) -> Result<(), String> {
    if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
        OPEN.fetch_sub(1, Ordering::SeqCst);
        let _ = conn.write_all(format!("ERR {MAX_FORWARDS} forwarded connections already open\n").as_bytes());
        return Err("too many forwarded connections".into());
    }
    let result = forward_counted(&mut conn, port);
    OPEN.fetch_sub(1, Ordering::SeqCst);
    result
}

fn forward_counted(conn: &mut UnixStream, port: u16) -> Result<(), String> {
    let mut last = format!("nothing listens on TCP port {port}");
    let mut tcp = None;
    for addr in targets(port, &listening()) {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let Some(tcp) = tcp else {
        let _ = conn.write_all(format!("ERR {last}\n").as_bytes());
        return Err(last);
    };
    conn.write_all(b"OK\n").map_err(|e| e.to_string())?;
    let (tcp_in, conn_out) = (
        tcp.try_clone().map_err(|e| e.to_string())?,
        conn.try_clone().map_err(|e| e.to_string())?,
    );
    let upstream = {
        let conn_in = conn.try_clone().map_err(|e| e.to_string())?;
        let tcp_out = tcp.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut &conn_in, &mut &tcp_out);
            let _ = tcp_out.shutdown(Shutdown::Write);
        })
    };
    let _ = std::io::copy(&mut &tcp_in, &mut &conn_out);
    let _ = conn_out.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:0050 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0200D50A:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
   4: garbage
   5: 0100007F:ZZZZ 00000000:0000 0A
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F92 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:1F93 00000000000000000000000000000000:0000 0A
   2: 0000000000000000000000000100:1F94 00000000000000000000000000000000:0000 0A
";

    #[test]
    fn listeners_are_read_from_proc_net_and_junk_is_skipped() {
        let v4 = parse_listening(TCP, false);
        assert_eq!(
            v4,
            [
                ("0.0.0.0".parse().unwrap(), 8080),
                ("127.0.0.1".parse().unwrap(), 80),
                ("10.213.0.2".parse().unwrap(), 8081),
            ]
        );
        let v6 = parse_listening(TCP6, true);
        assert_eq!(v6, [("::".parse().unwrap(), 8082), ("::1".parse().unwrap(), 8083)]);
    }

    #[test]
    fn a_port_is_reached_on_loopback_or_where_it_is_bound() {
        let mut all = parse_listening(TCP, false);
        all.extend(parse_listening(TCP6, true));
        assert_eq!(targets(8080, &all), ["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(targets(8081, &all), ["10.213.0.2:8081".parse().unwrap()]);
        assert_eq!(targets(8083, &all), ["[::1]:8083".parse().unwrap()]);
        assert_eq!(
            targets(8082, &all),
            ["[::1]:8082".parse().unwrap(), "127.0.0.1:8082".parse().unwrap()]
        );
        assert!(targets(9999, &all).is_empty());
    }
}
