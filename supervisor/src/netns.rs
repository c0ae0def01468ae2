//! The host side of pod networking: a sandbox's network namespace (CNI's
//! or podman's) wired to the VM's taps, as Kata's default "tcfilter" model
//! does.
//!
//! In the namespace each interface CNI made (not loopback, not links
//! without an address) gets a tap beside it (made by `tegmen-net-backend`),
//! with the interface's MTU; an ingress qdisc on both, and a u32 match-all
//! filter on each whose action is a mirred redirect to the other: every
//! frame that reaches the veth goes to the guest and every frame from the
//! guest leaves by the veth, before the namespace's IP stack sees either.
//! The veth keeps its addresses (CNI's DEL finds what it made), and the
//! guest NIC gets the veth's MAC, so the bridge's and neighbours' tables
//! stay right.
//!
//! Netlink (`rtnetlink`) runs on a thread of its own that has entered the
//! namespace, with a current-thread runtime: the socket belongs to the
//! namespace of the thread that opened it, and no task can hop threads.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlag};
use netlink_packet_route::tc::TcHandle;
use rtnetlink::Handle;

use crate::{Error, Result};

/// `ETH_P_ALL`, in network order as tc wants the protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// An interface of the namespace that the guest takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Its addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

fn err(netns: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Network(format!("network namespace {}: {what}: {e}", netns.display()))
}

/// Runs `f` with a netlink handle inside network namespace `netns`.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send + 'static,
) -> Result<T> {
    let file = std::fs::File::open(netns).map_err(|e| err(netns, "opening", e))?;
    let path: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| err(&path, "not a network namespace", e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(&path, "a runtime", e))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err(&path, "netlink", e))?;
            tokio::spawn(conn);
            f(handle).await
        })
    })
    .join()
    .map_err(|_| Error::Network("the netlink thread panicked".into()))?
}

/// Refuses the host's network namespace (this process's or PID 1's):
/// taking its interfaces over would cut the host off its network.
/// A `hostNetwork` sandbox names no namespace at all.
pub fn refuse_host(netns: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let target = id(netns).map_err(|e| err(netns, "opening", e))?;
    for host in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        if id(Path::new(host)).is_ok_and(|h| h == target) {
            return Err(err(
                netns,
                "refused",
                format!("it is the host's ({host}); a VM takes over only a namespace of the container's own"),
            ));
        }
    }
    Ok(())
}

/// The interfaces of `netns` the guest takes over: every link but loopback
/// that has an address.
pub fn endpoints(netns: &Path) -> Result<Vec<Endpoint>> {
    let ns = netns.to_path_buf();
    in_netns(netns, move |handle| {
        Box::pin(async move {
            let mut found = Vec::new();
            let mut links = handle.link().get().execute();
            while let Some(link) = links.try_next().await.map_err(|e| err(&ns, "listing links", e))? {
                if link.header.flags.contains(&LinkFlag::Loopback) {
                    continue;
                }
                let mut ep = Endpoint {
                    name: String::new(),
                    index: link.header.index,
                    mac: [0; 6],
                    mtu: 1500,
                    addresses: Vec::new(),
                };
                for a in &link.attributes {
                    match a {
                        LinkAttribute::IfName(n) => ep.name = n.clone(),
                        LinkAttribute::Mtu(m) => ep.mtu = *m,
                        LinkAttribute::Address(mac) if mac.len() == 6 => ep.mac.copy_from_slice(mac),
                        _ => {}
                    }
                }
                found.push(ep);
            }
            let mut addrs = handle.address().get().execute();
            while let Some(a) = addrs.try_next().await.map_err(|e| err(&ns, "listing addresses", e))? {
                let Some(ep) = found.iter_mut().find(|e| e.index == a.header.index) else {
                    continue;
                };
                for attr in &a.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        // IPv6 link-local addresses come and go with the link.
                        let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                        if !link_local {
                            ep.addresses.push((*ip, a.header.prefix_len));
                        }
                    }
                }
            }
            found.retain(|e| !e.addresses.is_empty() && e.mac != [0; 6]);
            Ok(found)
        })
    })
}

/// A route of the namespace through one of its endpoints (not the
/// kernel's own subnet routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `address/prefix`; `None` for the default route.
    pub destination: Option<String>,
    pub gateway: Option<IpAddr>,
    /// The endpoint's link index.
    pub index: u32,
}

/// The IPv4 routes of `netns`'s main table that leave by a link, but the
/// kernel's own (the subnet routes it made from the addresses).
pub fn routes(netns: &Path) -> Result<Vec<Route>> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
    let ns = netns.to_path_buf();
    in_netns(netns, move |handle| {
        Box::pin(async move {
            let mut found = Vec::new();
            let mut routes = handle.route().get(rtnetlink::IpVersion::V4).execute();
            while let Some(r) = routes.try_next().await.map_err(|e| err(&ns, "listing routes", e))? {
                if r.header.protocol == RouteProtocol::Kernel || r.header.table != 254 {
                    continue;
                }
                let (mut dst, mut gw, mut oif) = (None, None, None);
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let Some(index) = oif else { continue };
                let destination = match (dst, r.header.destination_prefix_length) {
                    (_, 0) => None,
                    (Some(d), len) => Some(format!("{d}/{len}")),
                    (None, _) => continue,
                };
                found.push(Route {
                    destination,
                    gateway: gw,
                    index,
                });
            }
            Ok(found)
        })
    })
}

/// A permanent IPv4 neighbour of the namespace (static ARP entries that
/// CNI or an operator added; the guest gets them too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: std::net::Ipv4Addr,
    pub mac: [u8; 6],
    /// The endpoint's link index.
    pub index: u32,
}

/// The permanent IPv4 neighbours of `netns`.
pub fn neighbours(netns: &Path) -> Result<Vec<Neighbour>> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
    let ns = netns.to_path_buf();
    in_netns(netns, move |handle| {
        Box::pin(async move {
            let mut found = Vec::new();
            let mut all = handle.neighbours().get().set_family(rtnetlink::IpVersion::V4).execute();
            while let Some(n) = all.try_next().await.map_err(|e| err(&ns, "listing neighbours", e))? {
                if n.header.state != NeighbourState::Permanent {
                    continue;
                }
                let (mut ip, mut mac) = (None, None);
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(*d),
                        NeighbourAttribute::LinkLocalAddress(m) if m.len() == 6 => {
                            let mut b = [0u8; 6];
                            b.copy_from_slice(m);
                            mac = Some(b);
                        }
                        _ => {}
                    }
                }
                if let (Some(ip), Some(mac)) = (ip, mac) {
                    found.push(Neighbour {
                        ip,
                        mac,
                        index: n.header.ifindex,
                    });
                }
            }
            Ok(found)
        })
    })
}

/// Wires `endpoint` to tap `tap` (which must exist): the tap gets the
/// MTU and goes up, both get an ingress qdisc and a redirect to the other.
pub fn wire(netns: &Path, endpoint: &Endpoint, tap: &str) -> Result<()> {
    let (ns, tap, veth, mtu) = (netns.to_path_buf(), tap.to_string(), endpoint.index, endpoint.mtu);
    in_netns(netns, move |handle| {
        Box::pin(async move {
            let mut links = handle.link().get().match_name(tap.clone()).execute();
            let tap_index = match links.try_next().await {
                Ok(Some(l)) => l.header.index,
                Ok(None) | Err(_) => return Err(err(&ns, &format!("tap {tap}"), "not found")),
            };
            handle
                .link()
                .set(tap_index)
                .mtu(mtu)
                .up()
                .execute()
                .await
                .map_err(|e| err(&ns, &format!("setting up {tap}"), e))?;
            let mut made = Vec::new();
            let mut result = Ok(());
            for (from, to) in [(veth, tap_index), (tap_index, veth)] {
                // An ingress qdisc that is there already is someone else's:
                // refused, and left alone.
                if let Err(e) = handle.qdisc().add(from as i32).ingress().execute().await {
                    result = Err(err(&ns, &format!("an ingress qdisc on link {from}"), e));
                    break;
                }
                made.push(from);
                let filter = handle
                    .traffic_filter(from as i32)
                    .add()
                    .parent(INGRESS_PARENT)
                    .protocol(ETH_P_ALL_BE)
                    .redirect(to)
                    .map_err(|e| err(&ns, "a redirect filter", e));
                let added = match filter {
                    Ok(f) => f
                        .execute()
                        .await
                        .map_err(|e| err(&ns, &format!("a redirect from link {from} to {to}"), e)),
                    Err(e) => Err(e),
                };
                if let Err(e) = added {
                    result = Err(e);
                    break;
                }
            }
            if result.is_err() {
                // Nothing of ours stays on a half-wired pair.
                for index in made {
                    let _ = del_ingress(&handle, index).await;
                }
            }
            result
        })
    })
}

/// Undoes [`wire`] on the endpoint (the tap goes with its backend):
/// removing the ingress qdisc removes its filters too. An endpoint that
/// is gone is not an error. Only for an endpoint [`wire`] succeeded on
/// (the qdisc is then this sandbox's).
pub fn unwire(netns: &Path, endpoint_index: u32) -> Result<()> {
    let ns = netns.to_path_buf();
    in_netns(netns, move |handle| {
        Box::pin(async move {
            match del_ingress(&handle, endpoint_index).await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(-e.raw_code(), libc::ENOENT | libc::ENODEV | libc::EINVAL) =>
                {
                    Ok(())
                }
                Err(e) => Err(err(
                    &ns,
                    &format!("removing the ingress qdisc of link {endpoint_index}"),
                    e,
                )),
            }
        })
    })
}

async fn del_ingress(handle: &Handle, index: u32) -> std::result::Result<(), rtnetlink::Error> {
    let mut del = handle.qdisc().del(index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    del.execute().await
}
