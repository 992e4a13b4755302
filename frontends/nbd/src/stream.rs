//! A connected socket, Unix or TCP, with the readiness-based calls the data path uses.

use std::io::{self, IoSlice};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A client connection.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A connection detached from any runtime, to move to the thread that serves it.
#[derive(Debug)]
pub(crate) enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
        }
    };
}

impl Stream {
    pub(crate) async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        each!(self, s => s.read_exact(buf).await.map(|_| ()))
    }

    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        each!(self, s => s.write_all(buf).await)
    }

    pub(crate) async fn readable(&self) -> io::Result<()> {
        each!(self, s => s.readable().await)
    }

    pub(crate) async fn writable(&self) -> io::Result<()> {
        each!(self, s => s.writable().await)
    }

    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => s.try_read(buf))
    }

    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(self, s => s.try_write_vectored(bufs))
    }

    pub(crate) fn into_std(self) -> io::Result<StdStream> {
        Ok(match self {
            Stream::Unix(s) => StdStream::Unix(s.into_std()?),
            Stream::Tcp(s) => StdStream::Tcp(s.into_std()?),
        })
    }
}

impl StdStream {
    /// Registers the connection with the runtime of the calling thread.
    pub(crate) fn into_tokio(self) -> io::Result<Stream> {
        Ok(match self {
            StdStream::Unix(s) => Stream::Unix(UnixStream::from_std(s)?),
            StdStream::Tcp(s) => Stream::Tcp(TcpStream::from_std(s)?),
        })
    }
}
