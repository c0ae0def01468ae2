//! Stdio streams between the host and a process in the guest.
//!
//! Each stream of a process (stdin, stdout, stderr, or one `tty` stream with
//! a terminal) travels on its own connection to the agent's stream port
//! (vsock [`crate::STREAM_VSOCK_PORT`], or a Unix socket when the agent runs
//! on the host), never through request/response polling: a slow reader slows
//! the writer, and output is read until EOF, so nothing is lost when a
//! process exits right after writing.
//!
//! The host opens the connection with one header line
//! `tegmen-stream/1 <container id> <exec id or -> <stdin|stdout|stderr|tty>\n`
//! and the agent answers `OK\n` or `ERR <reason>\n`; after `OK` the
//! connection carries the raw bytes. stdin ends when the host shuts down
//! its write side; stdout/stderr end when the process's side is closed.
//!
//! The same port carries port-forward connections: the header line
//! `tegmen-forward/1 tcp <port>\n` asks the agent to connect to that TCP
//! port in the guest's network namespace (the pod's); after `OK` the
//! connection carries the TCP stream's bytes both ways.

use std::io::{self, Read, Write};

const MAGIC: &str = "tegmen-stream/1";
/// Longest header or reply line either side accepts.
pub const MAX_LINE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    Tty,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Tty => "tty",
        }
    }

    fn parse(s: &str) -> Option<StreamKind> {
        Some(match s {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            "tty" => StreamKind::Tty,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub kind: StreamKind,
}

/// Ids travel space-separated: they must be non-empty words of printable
/// ASCII without spaces (runc's id rule is stricter still).
fn valid_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

impl StreamHeader {
    pub fn encode(&self) -> Result<String, String> {
        let exec = if self.exec_id.is_empty() { "-" } else { &self.exec_id };
        if !valid_word(&self.container_id) || !valid_word(exec) {
            return Err(format!(
                "invalid stream ids {:?} / {:?}",
                self.container_id, self.exec_id
            ));
        }
        Ok(format!("{MAGIC} {} {exec} {}\n", self.container_id, self.kind.as_str()))
    }

    pub fn parse(line: &[u8]) -> Result<StreamHeader, String> {
        let text = std::str::from_utf8(line).map_err(|_| "stream header is not UTF-8".to_string())?;
        let mut words = text.split(' ');
        let (Some(magic), Some(cid), Some(exec), Some(kind), None) =
            (words.next(), words.next(), words.next(), words.next(), words.next())
        else {
            return Err(format!("malformed stream header {text:?}"));
        };
        if magic != MAGIC {
            return Err(format!("unknown stream protocol {magic:?}"));
        }
        if !valid_word(cid) || !valid_word(exec) {
            return Err(format!("invalid ids in stream header {text:?}"));
        }
        let kind = StreamKind::parse(kind).ok_or_else(|| format!("unknown stream {kind:?}"))?;
        let exec_id = if exec == "-" { String::new() } else { exec.to_string() };
        Ok(StreamHeader {
            container_id: cid.to_string(),
            exec_id,
            kind,
        })
    }
}

/// Reads one `\n`-terminated line (without the `\n`) a byte at a time, so
/// nothing after it is consumed; at most [`MAX_LINE`] bytes.
pub fn read_line(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the line",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        line.push(byte[0]);
    }
}

/// The host's side of the opening: sends the header, reads the verdict.
pub fn open_stream<S: Read + Write>(conn: &mut S, header: &StreamHeader) -> io::Result<()> {
    let line = header
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    conn.write_all(line.as_bytes())?;
    read_verdict(
        conn,
        &format!("{} stream of {}", header.kind.as_str(), header.container_id),
    )
}

fn read_verdict(conn: &mut impl Read, what: &str) -> io::Result<()> {
    let reply = read_line(conn)?;
    if reply == b"OK" {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&reply);
    let reason = text.strip_prefix("ERR ").unwrap_or(&text);
    Err(io::Error::other(format!("{what}: {reason}")))
}

const FORWARD_MAGIC: &str = "tegmen-forward/1";

/// The opening line of a connection forwarded to TCP `port` in the guest.
pub fn forward_line(port: u16) -> String {
    format!("{FORWARD_MAGIC} tcp {port}\n")
}

/// The port a forward opening line names: `None` when `line` is not one
/// (a stdio stream's header), an error when it is one but malformed.
pub fn parse_forward(line: &[u8]) -> Option<Result<u16, String>> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix(FORWARD_MAGIC)?.strip_prefix(' ');
    let port = rest
        .and_then(|r| r.strip_prefix("tcp "))
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0);
    Some(port.ok_or_else(|| format!("malformed forward header {text:?}")))
}

/// The host's side of a forward's opening: after it, `conn` carries the
/// guest's TCP stream on `port`.
pub fn open_forward<S: Read + Write>(conn: &mut S, port: u16) -> io::Result<()> {
    conn.write_all(forward_line(port).as_bytes())?;
    read_verdict(conn, &format!("forward to guest port {port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_lines_round_trip_and_bad_ones_are_named() {
        let line = forward_line(8080);
        assert_eq!(parse_forward(line.trim_end().as_bytes()), Some(Ok(8080)));
        for bad in [
            "tegmen-forward/1 tcp 0",
            "tegmen-forward/1 tcp 70000",
            "tegmen-forward/1 udp 53",
            "tegmen-forward/1",
        ] {
            let e = parse_forward(bad.as_bytes()).expect("a forward line").unwrap_err();
            assert!(e.contains("malformed forward header"), "{e}");
        }
        assert_eq!(parse_forward(b"tegmen-stream/1 c1 - stdout"), None);
        assert_eq!(parse_forward(&[0xff, 0xfe]), None);
    }

    #[test]
    fn headers_round_trip() {
        for (cid, exec, kind) in [("c1", "", StreamKind::Stdout), ("c-2", "e1", StreamKind::Tty)] {
            let h = StreamHeader {
                container_id: cid.into(),
                exec_id: exec.into(),
                kind,
            };
            let line = h.encode().unwrap();
            assert!(line.ends_with('\n'));
            assert_eq!(StreamHeader::parse(line.trim_end().as_bytes()).unwrap(), h);
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            &b"tegmen-stream/1 c1 - stdout extra"[..],
            b"tegmen-stream/2 c1 - stdout",
            b"tegmen-stream/1 c1 - stdfoo",
            b"tegmen-stream/1  - stdout",
            b"tegmen-stream/1 c\x01 - stdout",
            b"\xff\xfe",
            b"",
        ] {
            assert!(StreamHeader::parse(bad).is_err(), "{bad:?} accepted");
        }
        let h = StreamHeader {
            container_id: "a b".into(),
            exec_id: String::new(),
            kind: StreamKind::Stdin,
        };
        assert!(h.encode().is_err());
    }

    #[test]
    fn lines_are_bounded_and_stop_at_newline() {
        let mut input: &[u8] = b"OK\nrest";
        assert_eq!(read_line(&mut input).unwrap(), b"OK");
        assert_eq!(input, b"rest");
        let long = vec![b'x'; MAX_LINE + 10];
        assert_eq!(
            read_line(&mut &long[..]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            read_line(&mut &b"no newline"[..]).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
