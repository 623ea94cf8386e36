//! `pgsluice health`: one probe of pgsluice's own HTTP endpoint, so that a
//! container image without curl or wget (distroless) can still have a
//! HEALTHCHECK. Part of the binary, not the library (declared in main.rs).
//!
//! One HTTP/1.0 GET over plain TCP; connecting, writing and reading share
//! one deadline. Success is a 200 status line; anything else — refused,
//! unresolvable, silent past the deadline, another status, not HTTP at all —
//! is an error that names the URL and says what happened.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// /health and /ready answer one line; past this much the answer is not
/// pgsluice's.
const MAX_RESPONSE: usize = 64 * 1024;

/// `http://host[:port][/path]`, split for the request.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `host:port` for resolution (port 80 added when absent).
    addr: String,
    /// As written in the URL, for the Host header.
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("`{url}`: only http:// URLs are supported (the endpoint serves plain HTTP)")
    })?;
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], "/"),
        None => (rest, "/"),
    };
    if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
        return Err(format!("`{url}`: expected http://HOST:PORT/PATH"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{url}`: the path contains spaces or control characters"
        ));
    }
    let has_port = match host.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host.contains(':'),
    };
    let addr = if has_port {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok(Target {
        addr,
        host: host.to_owned(),
        path: path.to_owned(),
    })
}

/// GETs `url`; Ok(body) on 200, Err(reason) otherwise.
pub fn probe(url: &str, timeout: Duration) -> Result<String, String> {
    let target = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                format!(
                    "{url}: no answer within {}",
                    humantime::format_duration(timeout)
                )
            })
    };
    let addrs: Vec<SocketAddr> = target
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {}: {e}", target.addr))?
        .collect();
    let mut stream = None;
    let mut failures = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if is_timeout(&e) => return Err(io_failure(url, "connecting", &e, timeout)),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    let Some(mut stream) = stream else {
        return Err(format!("{url}: cannot connect ({})", failures.join("; ")));
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: pgsluice-health\r\n\r\n",
        target.path, target.host
    );
    stream
        .set_write_timeout(Some(left()?))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| io_failure(url, "sending the request", &e, timeout))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| io_failure(url, "reading the answer", &e, timeout))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE {
                    return Err(format!("{url}: answer longer than {MAX_RESPONSE} bytes"));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure(url, "reading the answer", &e, timeout)),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(200) => Ok(body.to_owned()),
        Some(_) => Err(format!("{url}: {status_line}: {}", body.trim())),
        None if raw.is_empty() => Err(format!("{url}: the connection closed without an answer")),
        None => Err(format!(
            "{url}: not an HTTP answer: {:?}",
            first_chars(&text)
        )),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

fn io_failure(url: &str, what: &str, e: &std::io::Error, timeout: Duration) -> String {
    if is_timeout(e) {
        format!(
            "{url}: no answer within {}",
            humantime::format_duration(timeout)
        )
    } else {
        format!("{url}: {what}: {e}")
    }
}

fn first_chars(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:9930/ready"),
            Ok(Target {
                addr: "127.0.0.1:9930".into(),
                host: "127.0.0.1:9930".into(),
                path: "/ready".into()
            })
        );
        let t = parse_url("http://localhost").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("localhost:80", "/"));
        let t = parse_url("http://[::1]:9930/health").unwrap();
        assert_eq!(t.addr, "[::1]:9930");
        assert_eq!(parse_url("http://[::1]/").unwrap().addr, "[::1]:80");
        assert_eq!(parse_url("http://h:1?x=1").unwrap().path, "/");
        assert!(parse_url("https://127.0.0.1:9930/ready").is_err());
        assert!(parse_url("127.0.0.1:9930").is_err());
        assert!(parse_url("http:///ready").is_err());
        assert!(parse_url("http://u:p@h:1/").is_err());
        assert!(parse_url("http://h:1/a b").is_err());
    }
}
