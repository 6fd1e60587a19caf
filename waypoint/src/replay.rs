//! A request body that can be sent again: the first attempt streams the client's body as it
//! arrives ([`Tee`]) while a copy of it is kept, up to a bound; a retry or a mirror sends the
//! copy ([`Recording::replay`], [`Recording::complete`]). A body larger than the bound is
//! streamed once and never replayed (Envoy's rule: a request whose body overflows the retry
//! buffer is not retried), and nothing beyond the bound is ever held for it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::upstream;

/// The most of a request body kept for retries and mirrors (Envoy's default per-request buffer
/// limit in Istio's waypoint is the connection buffer limit, 1 MiB).
pub const MAX_REPLAY_BYTES: usize = 1 << 20;

/// How far the copy got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The body is still arriving.
    Open,
    /// All of it (and its trailers) is kept.
    Complete,
    /// It is larger than the bound, ended with an error, or was abandoned: no copy.
    Lost,
}

#[derive(Default)]
struct Kept {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
}

/// The kept copy of a request body, shared by the [`Tee`] that fills it and whoever replays it.
#[derive(Clone)]
pub struct Recording {
    copy: Arc<Mutex<Kept>>,
    state: watch::Receiver<State>,
}

/// The client's body, passed through while [`Recording`] keeps a copy.
pub struct Tee {
    inner: upstream::Body,
    copy: Arc<Mutex<Kept>>,
    state: watch::Sender<State>,
    limit: usize,
}

impl Tee {
    /// Wraps `inner`, keeping at most `limit` bytes of it.
    pub fn new(inner: upstream::Body, limit: usize) -> (Tee, Recording) {
        let initial = if inner.is_end_stream() { State::Complete } else { State::Open };
        let (state, receiver) = watch::channel(initial);
        let copy = Arc::new(Mutex::new(Kept::default()));
        (Tee { inner, copy: copy.clone(), state, limit }, Recording { copy, state: receiver })
    }

    fn settle(&self, state: State) {
        if *self.state.borrow() == State::Open {
            if state == State::Lost {
                *self.copy.lock().unwrap_or_else(|p| p.into_inner()) = Kept::default();
            }
            self.state.send_replace(state);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if *self.state.borrow() == State::Open => {
                let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(data) = frame.data_ref() {
                    if copy.len + data.len() > self.limit {
                        drop(copy);
                        self.settle(State::Lost);
                    } else {
                        copy.len += data.len();
                        copy.chunks.push(data.clone());
                        drop(copy);
                        // A client may never poll past a body's declared length: its last
                        // frame completes it.
                        if self.inner.is_end_stream() {
                            self.settle(State::Complete);
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Poll::Ready(Some(Err(_))) => self.settle(State::Lost),
            Poll::Ready(None) => self.settle(State::Complete),
            _ => {}
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

impl Drop for Tee {
    /// A body dropped before its end (the attempt was abandoned) leaves no copy.
    fn drop(&mut self) {
        self.settle(State::Lost);
    }
}

impl Recording {
    /// The whole body again, when all of it is kept now.
    pub fn replay(&self) -> Option<upstream::Body> {
        (*self.state.borrow() == State::Complete).then(|| self.body())
    }

    /// The whole body again, once the client has sent all of it; `None` when it will not be
    /// kept (too large, failed or abandoned).
    pub async fn complete(mut self) -> Option<upstream::Body> {
        let state = *self.state.wait_for(|s| *s != State::Open).await.ok()?;
        (state == State::Complete).then(|| self.body())
    }

    fn body(&self) -> upstream::Body {
        let copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        let mut frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
            copy.chunks.iter().cloned().map(|c| Ok(Frame::data(c))).collect();
        if let Some(trailers) = &copy.trailers {
            frames.push(Ok(Frame::trailers(trailers.clone())));
        }
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn streamed(chunks: &[&'static str]) -> upstream::Body {
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn text(body: upstream::Body) -> String {
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn an_empty_body_replays_at_once() {
        let empty = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let (_tee, recording) = Tee::new(empty, 10);
        assert_eq!(text(recording.replay().unwrap()).await, "");
    }

    #[tokio::test]
    async fn a_body_within_the_bound_replays_after_it_was_streamed() {
        let (tee, recording) = Tee::new(streamed(&["ab", "cd"]), 10);
        assert!(recording.replay().is_none(), "not before the body has been read");
        let waiting = tokio::spawn(recording.clone().complete());
        assert_eq!(text(tee.boxed()).await, "abcd");
        assert_eq!(text(recording.replay().unwrap()).await, "abcd");
        assert_eq!(text(waiting.await.unwrap().unwrap()).await, "abcd");
    }

    #[tokio::test]
    async fn a_body_over_the_bound_is_streamed_whole_and_never_replayed() {
        let (tee, recording) = Tee::new(streamed(&["abc", "def", "ghi"]), 5);
        assert_eq!(text(tee.boxed()).await, "abcdefghi");
        assert!(recording.replay().is_none());
        assert!(recording.complete().await.is_none());
    }

    #[tokio::test]
    async fn an_abandoned_body_is_not_replayed() {
        let (tee, recording) = Tee::new(streamed(&["ab"]), 10);
        drop(tee);
        assert!(recording.replay().is_none());
        assert!(recording.complete().await.is_none());
    }
}
