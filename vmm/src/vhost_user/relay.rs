//! A relay between QEMU's virtio-net front-end and `vhost-user-backend`.
//!
//! QEMU 7.2's virtio-net sends `VHOST_USER_SET_VRING_ENABLE` as soon as the
//! guest negotiates features (`peer_attach`), before any
//! `VHOST_USER_SET_FEATURES`, and fails to start vhost when the backend
//! does not offer `VHOST_USER_F_PROTOCOL_FEATURES`. The `vhost` crate
//! refuses such an early `SET_VRING_ENABLE` as an inactive feature and
//! drops the connection. So the net backend takes QEMU's connection itself
//! and relays it, message by message with the descriptors they carry, to
//! the daemon, holding back a `SET_VRING_ENABLE` that comes before
//! `SET_FEATURES` and passing it on (the last one per ring) right after
//! `SET_FEATURES`: the rings end up as QEMU asked, and QEMU does not ask
//! again.
//! Replies go back byte for byte (the backend offers nothing whose
//! replies carry descriptors).

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// vhost-user message header: request, flags, size.
const HEADER_LEN: usize = 12;
/// Larger than any message the backend accepts.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Descriptors one message may carry (the memory table's regions).
const MAX_FDS: usize = 32;

/// Relays `front` (QEMU) to `back` (the daemon) until either side ends.
pub fn spawn(front: UnixStream, back: UnixStream) -> io::Result<(JoinHandle<()>, JoinHandle<()>)> {
    let (front2, back2) = (front.try_clone()?, back.try_clone()?);
    let forward = std::thread::Builder::new()
        .name("vhost-relay-in".into())
        .spawn(move || {
            if let Err(e) = forward(&front, &back) {
                log::debug!("vhost-user relay: front-end side: {e}");
            }
            let _ = back.shutdown(Shutdown::Both);
            let _ = front.shutdown(Shutdown::Both);
        })?;
    let replies = std::thread::Builder::new()
        .name("vhost-relay-out".into())
        .spawn(move || {
            let (mut from, mut to) = (back2, front2);
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
        })?;
    Ok((forward, replies))
}

fn forward(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let mut features_set = false;
    let mut held: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let mut hdr = [0u8; HEADER_LEN];
        let Some(fds) = recv_header(front, &mut hdr)? else {
            return Ok(());
        };
        let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a vhost-user message of {size} bytes"),
            ));
        }
        let mut msg = hdr.to_vec();
        msg.resize(HEADER_LEN + size, 0);
        (&*front).read_exact(&mut msg[HEADER_LEN..])?;
        log::trace!(
            "vhost-user relay: request {request}, {size} bytes, {} fds: {:02x?}",
            fds.len(),
            &msg[HEADER_LEN..]
        );
        if request == SET_VRING_ENABLE && !features_set {
            // Held, the last one per ring, until the features are set.
            let index = msg.get(HEADER_LEN..HEADER_LEN + 4).map(|b| b.to_vec());
            held.retain(|(i, _)| Some(i) != index.as_ref());
            held.push((index.unwrap_or_default(), msg));
            log::debug!("vhost-user relay: SET_VRING_ENABLE before SET_FEATURES held");
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_all(back, &msg, &raw)?;
        if request == SET_FEATURES && !features_set {
            features_set = true;
            for (_, m) in held.drain(..) {
                send_all(back, &m, &[])?;
            }
        }
    }
}

/// Reads one header and the descriptors sent with it; `None` at EOF.
fn recv_header(sock: &UnixStream, hdr: &mut [u8; HEADER_LEN]) -> io::Result<Option<Vec<File>>> {
    let mut got = 0;
    let mut files = Vec::new();
    while got < HEADER_LEN {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut hdr[got..])];
        let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just gave us these descriptors.
                files.extend(fds.into_iter().map(|fd| unsafe { File::from_raw_fd(fd) }));
            }
        }
        if msg.bytes == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a truncated header"))
            };
        }
        got += msg.bytes;
    }
    Ok(Some(files))
}

fn send_all(sock: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(msg)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent < msg.len() {
        (&*sock).write_all(&msg[sent..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn early_vring_enables_are_left_out_and_descriptors_pass() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let (a, b) = spawn(front, back).unwrap();
        let early = message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = message(SET_FEATURES, &1u64.to_le_bytes());
        let late = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 1, 0, 0, 0]);
        // A message with a descriptor attached, as SET_VRING_KICK sends.
        let kick = message(12, &0u64.to_le_bytes());
        let (fd_file, _) = UnixStream::pair().unwrap();
        send_all(&qemu, &early, &[]).unwrap();
        send_all(&qemu, &features, &[]).unwrap();
        send_all(&qemu, &kick, &[fd_file.as_raw_fd()]).unwrap();
        send_all(&qemu, &late, &[]).unwrap();
        let mut got = Vec::new();
        let mut files = Vec::new();
        for _ in 0..4 {
            let mut hdr = [0u8; HEADER_LEN];
            files.extend(recv_header(&daemon, &mut hdr).unwrap().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            (&daemon).read_exact(&mut body).unwrap();
            got.push([hdr.to_vec(), body].concat());
        }
        assert_eq!(
            got[..3],
            [features, early, kick],
            "the early enable comes right after SET_FEATURES"
        );
        assert_eq!(got.pop(), Some(late));
        assert_eq!(files.len(), 1, "the kick's descriptor went through");
        // Replies go back as they are.
        (&daemon).write_all(b"reply").unwrap();
        let mut r = [0u8; 5];
        (&qemu).read_exact(&mut r).unwrap();
        assert_eq!(&r, b"reply");
        // A huge message ends the relay; so does either side closing.
        send_all(
            &qemu,
            &message(1, &[])
                .iter()
                .take(8)
                .copied()
                .chain((u32::MAX).to_le_bytes())
                .collect::<Vec<_>>(),
            &[],
        )
        .unwrap();
        a.join().unwrap();
        drop(daemon);
        b.join().unwrap();
    }
}
