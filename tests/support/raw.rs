//! A bare-bones wire client for tests that must send what no driver would:
//! malformed packets, odd protocol versions, half-finished logins.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    /// (process id, secret key) of the BackendKeyData seen at login.
    pub backend_key: Option<(i32, i32)>,
}

/// A backend message as received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    pub fn field(&self, kind: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&k, tail)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if k == kind {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }
}

pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&((3i32 << 16) | i32::from(minor)).to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend(body);
    pkt
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            backend_key: None,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Next backend message, or None at EOF / error / after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Msg> {
        tokio::time::timeout(timeout, async {
            let mut header = [0u8; 5];
            self.stream.read_exact(&mut header).await.ok()?;
            let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let mut body = vec![0u8; len.checked_sub(4)?];
            self.stream.read_exact(&mut body).await.ok()?;
            Some(Msg {
                tag: header[0],
                body,
            })
        })
        .await
        .ok()
        .flatten()
    }

    /// Reads messages until one with `tag` (returned) or EOF (None).
    pub async fn recv_until(&mut self, tag: u8, timeout: Duration) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await?;
            if m.tag == tag {
                return Some(m);
            }
        }
    }

    /// True when the peer closed the connection within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Full login as app/app (cleartext, md5 or SCRAM, whatever pgsluice
    /// asks for); returns once ReadyForQuery arrives.
    pub async fn login(addr: SocketAddr) -> Raw {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        use postgres_protocol::message::frontend;
        let mut raw = Raw::connect(addr).await;
        raw.send(&startup_packet(
            0,
            &[("user", super::APP_USER), ("database", super::APP_DB)],
        ))
        .await;
        let password = super::APP_PASSWORD.as_bytes();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = raw
                .recv(Duration::from_secs(10))
                .await
                .expect("authentication request");
            assert_eq!(m.tag, b'R', "expected an authentication request: {m:?}");
            let code = i32::from_be_bytes(m.body[..4].try_into().expect("auth code"));
            let data = &m.body[4..];
            let mut out = bytes::BytesMut::new();
            match code {
                0 => break,
                3 => frontend::password_message(password, &mut out).unwrap(),
                5 => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        super::APP_USER.as_bytes(),
                        password,
                        data.try_into().expect("md5 salt"),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out).unwrap();
                }
                10 => {
                    let s = ScramSha256::new(password, ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .unwrap();
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().expect("SASL started");
                    s.update(data).expect("SCRAM server-first");
                    frontend::sasl_response(s.message(), &mut out).unwrap();
                }
                12 => {
                    let s = scram.as_mut().expect("SASL started");
                    s.finish(data).expect("SCRAM server signature");
                    continue;
                }
                other => panic!("unexpected authentication request {other}"),
            }
            raw.send(&out).await;
        }
        loop {
            let m = raw
                .recv(Duration::from_secs(10))
                .await
                .expect("ReadyForQuery after login");
            match m.tag {
                b'K' if m.body.len() == 8 => {
                    let word = |i: usize| {
                        i32::from_be_bytes([m.body[i], m.body[i + 1], m.body[i + 2], m.body[i + 3]])
                    };
                    raw.backend_key = Some((word(0), word(4)));
                }
                b'Z' => return raw,
                _ => {}
            }
        }
    }
}
