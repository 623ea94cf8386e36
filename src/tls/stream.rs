//! Connections that are plain TCP or TLS over TCP.
//!
//! The plain variant keeps every `TcpStream` fast path the relay relies on
//! (`readable()`, `try_io` draining reads, the syscall-free idle check);
//! callers match on the variant for those. A TLS stream may hold decrypted
//! bytes that the socket no longer shows, so for it only `read_buf` is a
//! valid "has data" signal.
//!
//! Both types have an inherent `write_all` that also flushes: tokio-rustls
//! may keep encrypted records buffered after accepting the plaintext, and
//! every write pgsluice makes is a complete batch the peer is waiting for.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

macro_rules! tls_or_plain {
    ($name:ident, $tls:ty) => {
        impl $name {
            /// Writes all of `buf` and, for TLS, flushes the records out.
            pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
                match self {
                    Self::Plain(s) => AsyncWriteExt::write_all(s, buf).await,
                    Self::Tls(s) => {
                        AsyncWriteExt::write_all(s.as_mut(), buf).await?;
                        s.flush().await
                    }
                }
            }

            pub fn is_tls(&self) -> bool {
                matches!(self, Self::Tls(_))
            }

            /// The TCP socket underneath.
            pub fn tcp(&self) -> &TcpStream {
                match self {
                    Self::Plain(s) => s,
                    Self::Tls(s) => s.get_ref().0,
                }
            }
        }

        impl AsyncRead for $name {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $name {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    Self::Plain(_) => concat!(stringify!($name), "::Plain"),
                    Self::Tls(_) => concat!(stringify!($name), "::Tls"),
                })
            }
        }

        impl From<TcpStream> for $name {
            fn from(s: TcpStream) -> Self {
                Self::Plain(s)
            }
        }

        impl From<$tls> for $name {
            fn from(s: $tls) -> Self {
                Self::Tls(Box::new(s))
            }
        }
    };
}

/// A client's connection to pgsluice.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// pgsluice's connection to a PostgreSQL server.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

tls_or_plain!(ClientStream, tokio_rustls::server::TlsStream<TcpStream>);
tls_or_plain!(ServerStream, tokio_rustls::client::TlsStream<TcpStream>);

impl ClientStream {
    /// The verified client certificate (end entity), if one was presented.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref()),
        }
    }
}

impl ServerStream {
    /// True when nothing is waiting to be read and the peer has not closed:
    /// one non-blocking poll (for plain TCP, no syscall unless the reactor
    /// saw the socket become readable).
    pub fn is_quiet(&mut self) -> bool {
        match self {
            Self::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Self::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(
                    Pin::new(s.as_mut()).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }

    /// Best effort, without waiting: `bytes` (a Terminate) and, for TLS, a
    /// close_notify, written only if the socket takes them at once.
    pub fn try_send_and_close(&mut self, bytes: &[u8]) {
        match self {
            Self::Plain(s) => {
                let _ = s.try_write(bytes);
            }
            Self::Tls(s) => {
                let (tcp, conn) = s.get_mut();
                let _ = io::Write::write_all(&mut conn.writer(), bytes);
                conn.send_close_notify();
                let mut out = Vec::new();
                while conn.wants_write() {
                    if conn.write_tls(&mut out).is_err() {
                        break;
                    }
                }
                let _ = tcp.try_write(&out);
            }
        }
    }
}
