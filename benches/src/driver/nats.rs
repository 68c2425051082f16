//! A lean driver for the NATS text protocol: as little work per message as
//! the protocol allows, so that a comparison measures the server, not the
//! client. Writes are batched into one buffer; reads parse in place.
//!
//! ```text
//! PUB <subject> <#bytes>\r\n<payload>\r\n
//! SUB <subject> [queue group] <sid>\r\n
//! MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n
//! PING\r\n  PONG\r\n  +OK\r\n  -ERR <reason>\r\n  INFO {...}\r\n
//! ```

use std::ops::Range;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{protocol, Result};

/// One thing the server said.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// A message; the range is its payload within the parsed buffer.
    Msg(Range<usize>),
    Ping,
    Pong,
    Ok,
    Err(String),
    Info,
}

/// Parses the first operation in `buf`: the op and the bytes it took, or
/// `None` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Op, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[..eol];
    let after = eol + 2;
    if let Some(args) = line.strip_prefix(b"MSG ") {
        let len_field = args
            .rsplit(|&b| b == b' ')
            .next()
            .ok_or_else(|| "MSG without a length".to_string())?;
        let len: usize = std::str::from_utf8(len_field)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("MSG length {:?}", String::from_utf8_lossy(len_field)))?;
        if buf.len() < after + len + 2 {
            return Ok(None);
        }
        return Ok(Some((Op::Msg(after..after + len), after + len + 2)));
    }
    let op = match line {
        b"PING" => Op::Ping,
        b"PONG" => Op::Pong,
        b"+OK" => Op::Ok,
        l if l.starts_with(b"INFO") => Op::Info,
        l if l.starts_with(b"-ERR") => Op::Err(String::from_utf8_lossy(l).into_owned()),
        other => {
            return Err(format!(
                "unexpected line {:?}",
                String::from_utf8_lossy(other)
            ))
        }
    };
    Ok(Some((op, after)))
}

/// A NATS connection.
pub struct NatsConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Bytes buffered before a publish is written out.
const WRITE_CHUNK: usize = 64 * 1024;

impl NatsConn {
    /// Connects, reads INFO, sends CONNECT, and waits for the PONG that
    /// confirms the server accepted it.
    pub async fn connect(addr: &str) -> Result<NatsConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut conn = NatsConn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(WRITE_CHUNK * 2),
        };
        conn.wbuf.put_slice(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"protocol\":1}\r\n",
        );
        conn.flush().await?;
        Ok(conn)
    }

    /// Buffers a publish; writes when the buffer is large.
    pub async fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<()> {
        self.wbuf.put_slice(b"PUB ");
        self.wbuf.put_slice(subject.as_bytes());
        self.wbuf.put_u8(b' ');
        put_decimal(&mut self.wbuf, payload.len());
        self.wbuf.put_slice(b"\r\n");
        self.wbuf.put_slice(payload);
        self.wbuf.put_slice(b"\r\n");
        if self.wbuf.len() >= WRITE_CHUNK {
            self.push().await?;
        }
        Ok(())
    }

    /// Subscribes and waits until the server has it.
    pub async fn subscribe(&mut self, subject: &str, queue: Option<&str>, sid: u64) -> Result<()> {
        self.wbuf.put_slice(b"SUB ");
        self.wbuf.put_slice(subject.as_bytes());
        if let Some(q) = queue {
            self.wbuf.put_u8(b' ');
            self.wbuf.put_slice(q.as_bytes());
        }
        self.wbuf.put_u8(b' ');
        put_decimal(&mut self.wbuf, sid as usize);
        self.wbuf.put_slice(b"\r\n");
        Ok(())
    }

    /// Writes what is buffered.
    pub async fn push(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// PING and wait for PONG: the server has handled everything before it.
    /// Messages that arrive meanwhile are dropped: call this only on
    /// connections that do not subscribe, or before they receive.
    pub async fn flush(&mut self) -> Result<()> {
        self.wbuf.put_slice(b"PING\r\n");
        self.push().await?;
        loop {
            while let Some(op) = self.next_op()? {
                match op {
                    Op::Pong => return Ok(()),
                    Op::Ping => self.wbuf.put_slice(b"PONG\r\n"),
                    Op::Err(e) => return Err(protocol("nats", e)),
                    Op::Msg(_) | Op::Ok | Op::Info => {}
                }
            }
            self.push().await?;
            self.read_more().await?;
        }
    }

    /// Waits for bytes, then hands every complete message payload to `f`.
    /// Returns how many messages there were.
    /// Reads until at least one whole message is in, and hands `f` every
    /// whole one: a read can end inside a message, or bring only a PING.
    pub async fn recv_batch(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<usize> {
        let mut n = 0;
        while n == 0 {
            self.read_more().await?;
            loop {
                match parse(&self.rbuf).map_err(|e| protocol("nats", e))? {
                    None => break,
                    Some((Op::Msg(range), used)) => {
                        f(&self.rbuf[range]);
                        self.rbuf.advance(used);
                        n += 1;
                    }
                    Some((Op::Ping, used)) => {
                        self.rbuf.advance(used);
                        self.wbuf.put_slice(b"PONG\r\n");
                    }
                    Some((Op::Err(e), _)) => return Err(protocol("nats", e)),
                    Some((_, used)) => self.rbuf.advance(used),
                }
            }
            self.push().await?;
        }
        Ok(n)
    }

    fn next_op(&mut self) -> Result<Option<Op>> {
        match parse(&self.rbuf).map_err(|e| protocol("nats", e))? {
            None => Ok(None),
            Some((op, used)) => {
                self.rbuf.advance(used);
                Ok(Some(op))
            }
        }
    }

    async fn read_more(&mut self) -> Result<()> {
        self.rbuf.reserve(64 * 1024);
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(protocol("nats", "the server closed the connection"));
        }
        Ok(())
    }
}

fn put_decimal(buf: &mut BytesMut, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_and_control_lines() {
        let wire = b"INFO {\"x\":1}\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a.b 1 reply.to 0\r\n\r\n+OK\r\n-ERR 'x'\r\n";
        let mut at = 0;
        let mut ops = Vec::new();
        while let Some((op, used)) = parse(&wire[at..]).unwrap() {
            if let Op::Msg(r) = &op {
                ops.push(format!(
                    "msg:{}",
                    String::from_utf8_lossy(&wire[at..][r.clone()])
                ));
            } else {
                ops.push(format!("{op:?}"));
            }
            at += used;
        }
        assert_eq!(at, wire.len());
        assert_eq!(
            ops,
            [
                "Info",
                "msg:hello",
                "Ping",
                "msg:",
                "Ok",
                "Err(\"-ERR 'x'\")"
            ]
        );
    }

    #[test]
    fn incomplete_input_waits() {
        assert_eq!(parse(b"MSG a 1 5\r\nhel").unwrap(), None);
        assert_eq!(parse(b"PIN").unwrap(), None);
        assert!(parse(b"WHAT\r\n").is_err());
        assert!(parse(b"MSG a 1 x\r\n").is_err());
    }

    #[test]
    fn decimals() {
        for n in [0usize, 7, 10, 12345, usize::MAX] {
            let mut b = BytesMut::new();
            put_decimal(&mut b, n);
            assert_eq!(std::str::from_utf8(&b).unwrap(), n.to_string());
        }
    }
}
