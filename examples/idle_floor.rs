//! The memory floor of one idle client in tokio's task-per-connection model,
//! for comparison with pgsluice's and pgbouncer's RSS per idle client
//! (docs/performance.md, "Memory per idle client").
//!
//! A PostgreSQL server in name only: it answers every startup with
//! AuthenticationOk, BackendKeyData and ReadyForQuery (trust, no TLS), then
//! keeps each connection in its own task that holds nothing but the socket
//! and waits for it to become readable, as an idle pgsluice session does.
//! A query gets an empty answer (EmptyQueryResponse + ReadyForQuery), so
//! `loadgen idle` can verify its connections at the end. Whatever this
//! process needs per idle connection, any tokio server that keeps a task per
//! client needs too.
//!
//! ```text
//! cargo run --release --example idle_floor -- 127.0.0.1:25601
//! target/release/examples/loadgen idle --port 25601 --clients 10000 --sources 2 --hold-secs 30
//! ```
//! and read VmRSS of the idle_floor process before and while the clients are
//! held (bench/README.md has the script that does both for pgsluice).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:25601".to_string());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = client(stream).await {
                eprintln!("client: {e}");
            }
        });
    }
}

/// Reads one whole message body after a 4-byte length (startup) or a tag
/// and a length (everything else).
async fn read_body(stream: &mut TcpStream, len: u32) -> std::io::Result<()> {
    let len = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_sub(4))
        .filter(|l| *l <= 1 << 20)
        .ok_or_else(|| std::io::Error::other("bad message length"))?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(())
}

async fn client(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Startup (an SSLRequest is refused with 'N' and the startup follows).
    loop {
        let len = stream.read_u32().await?;
        let code = stream.read_u32().await?;
        read_body(&mut stream, len.saturating_sub(4)).await?;
        if code == 80_877_103 {
            stream.write_all(b"N").await?;
            continue;
        }
        break;
    }
    let mut welcome = Vec::new();
    welcome.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    welcome.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 1]);
    welcome.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    stream.write_all(&welcome).await?;
    drop(welcome);
    loop {
        // Idle: the task holds the socket and nothing else.
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        let mut tag = [0u8; 1];
        match stream.try_read(&mut tag) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let len = stream.read_u32().await?;
        read_body(&mut stream, len).await?;
        match tag[0] {
            b'X' => return Ok(()),
            b'Q' => {
                stream
                    .write_all(&[b'I', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I'])
                    .await?
            }
            b'S' => stream.write_all(&[b'Z', 0, 0, 0, 5, b'I']).await?,
            _ => {}
        }
    }
}
