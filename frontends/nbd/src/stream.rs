//! A connected socket, Unix or TCP: async for negotiation (on the control runtime), then
//! detached into a non-blocking std socket for the connection's own thread.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A client connection during negotiation.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A client connection in transmission: non-blocking, owned by one thread.
#[derive(Debug)]
pub(crate) enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    pub(crate) async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.read_exact(buf).await.map(|_| ()),
            Stream::Tcp(s) => s.read_exact(buf).await.map(|_| ()),
        }
    }

    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf).await,
            Stream::Tcp(s) => s.write_all(buf).await,
        }
    }

    /// Detaches the socket from the runtime; it stays non-blocking.
    pub(crate) fn into_std(self) -> io::Result<StdStream> {
        Ok(match self {
            Stream::Unix(s) => StdStream::Unix(s.into_std()?),
            Stream::Tcp(s) => StdStream::Tcp(s.into_std()?),
        })
    }
}

impl StdStream {
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StdStream::Unix(s) => (&*s).read(buf),
            StdStream::Tcp(s) => (&*s).read(buf),
        }
    }

    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            StdStream::Unix(s) => (&*s).write_vectored(bufs),
            StdStream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        match self {
            StdStream::Unix(s) => s.as_raw_fd(),
            StdStream::Tcp(s) => s.as_raw_fd(),
        }
    }
}
