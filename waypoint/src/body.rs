//! Bodies that count what passes: the request body's bytes (into a shared counter), and the
//! response body's bytes, trailers and end, where the request's metrics and access log line are
//! recorded (when the body ends or is dropped, so a request the client abandons is recorded
//! too).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::upstream;

/// A body counting its data bytes into `count`.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a response body calls once, when it ends or is dropped: with its data bytes and the
/// `grpc-status` of its trailers, if any.
pub trait OnEnd: Send + Sync + 'static {
    fn ended(self: Box<Self>, response_bytes: u64, grpc_status: Option<String>);
}

/// A response body reporting its end to an [`OnEnd`].
pub struct Recorded {
    inner: upstream::Body,
    bytes: u64,
    grpc_status: Option<String>,
    on_end: Option<Box<dyn OnEnd>>,
}

impl Recorded {
    pub fn new(inner: upstream::Body, on_end: Box<dyn OnEnd>) -> Self {
        Recorded { inner, bytes: 0, grpc_status: None, on_end: Some(on_end) }
    }

    fn finish(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end.ended(self.bytes, self.grpc_status.take());
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    self.grpc_status =
                        trailers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish();
    }
}
