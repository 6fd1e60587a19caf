//! Large reads under TLS. rustls asks its transport for at most 4 KiB at a time, so a TLS
//! connection read straight from its socket costs a system call per 4 KiB: four or more for each
//! 16 KiB record. [`ReadBuffered`] reads the socket in [`READ_BUFFER`] chunks and hands rustls
//! what it asks for from memory. The buffer exists only while it holds data or a read is under
//! way, so thousands of idle HBONE connections hold none.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read of the socket may take.
pub const READ_BUFFER: usize = 64 * 1024;

/// A transport whose reads are buffered (writes pass straight through).
#[derive(Debug)]
pub struct ReadBuffered<T> {
    inner: T,
    /// Read from the socket, not yet taken.
    buffer: BytesMut,
}

impl<T> ReadBuffered<T> {
    pub fn new(inner: T) -> Self {
        ReadBuffered { inner, buffer: BytesMut::new() }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffer.is_empty() {
            // Fill it with one read of the socket (into its spare capacity: nothing is zeroed).
            this.buffer.reserve(READ_BUFFER);
            let polled = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buffer);
            if this.buffer.is_empty() {
                // Nothing to hold (would block, end of stream or an error): give the memory back.
                this.buffer = BytesMut::new();
            }
            ready!(polled)?;
        }
        let n = buf.remaining().min(this.buffer.len());
        buf.put_slice(&this.buffer[..n]);
        this.buffer.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_the_memory_is_given_back() {
        let (mut far, near) = tokio::io::duplex(4 * READ_BUFFER);
        let data: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut reader = ReadBuffered::new(near);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            assert!(reader.buffer.capacity() <= 2 * READ_BUFFER);
        }
        assert_eq!(got, data);
        assert_eq!(reader.buffer.capacity(), 0, "an exhausted buffer is freed");
    }

    #[tokio::test]
    async fn a_read_that_would_block_holds_no_buffer() {
        let (_far, near) = tokio::io::duplex(1024);
        let mut reader = ReadBuffered::new(near);
        let mut chunk = [0u8; 16];
        let read = tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut chunk)).await;
        assert!(read.is_err(), "nothing to read yet");
        assert_eq!(reader.buffer.capacity(), 0);
    }
}
