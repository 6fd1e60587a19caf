//! Upgrading ztunnel without dropping a connection: the hand-over of the listening sockets.
//!
//! A running ztunnel serves a Unix socket (`--handover-socket`, on Kubernetes in a hostPath
//! directory both the old and the new pod mount). A ztunnel that starts while another runs
//! connects to it, gets ready on its own (xDS, capture, certificates), and then asks for the
//! listening sockets: the three of the data path and the three admin endpoints, passed with
//! SCM_RIGHTS. They are the same sockets, so nothing is refused in between: connections waiting
//! in a listener's queue are accepted by whichever process accepts next, and the eBPF capture
//! (pinned, taken over the same way) keeps assigning new connections to them. Once the new
//! process confirms, the old one stops accepting and drains: its open connections run until they
//! end or the drain deadline passes (the pod's termination grace period), then it exits.
//!
//! The exchange, one line each way and then the descriptors:
//! - new → old: `take`
//! - old → new: the listeners' names, space-separated, with their descriptors in that order
//! - new → old: `ok` once it serves them; only then does the old one stop accepting, so a new
//!   process that fails in between leaves the old one serving.
//!
//! Only a process of the same user may take the sockets (checked with SO_PEERCRED), and the
//! socket file is created mode 0600: whoever holds the listeners receives every captured
//! connection of the node.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::sockopt;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::oneshot;

/// The listeners handed over, in this order.
pub const NAMES: [&str; 6] = ["outbound", "inbound_plain", "hbone", "admin", "metrics", "readiness"];

/// How long each side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening sockets a ztunnel serves, in the order of [`NAMES`].
pub type Listeners = [std::net::TcpListener; 6];

/// Why the hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("hand-over socket {path}: the other side sent {got:?}, expected {expected}")]
    Protocol { path: PathBuf, got: String, expected: &'static str },
    #[error("hand-over socket {path}: the peer runs as uid {peer}, this process as {own}")]
    Stranger { path: PathBuf, peer: u32, own: u32 },
}

/// A running ztunnel that answered on the hand-over socket.
pub struct Predecessor {
    path: PathBuf,
    stream: UnixStream,
}

/// The listeners received, not yet confirmed to the predecessor.
pub struct Taken {
    pub listeners: Listeners,
    pub predecessor: Predecessor,
}

impl Predecessor {
    /// Whether a ztunnel serves `path` (a connection is made and closed at once; the server
    /// takes it for the probe it is).
    pub fn runs(path: &Path) -> bool {
        UnixStream::connect(path).is_ok()
    }

    /// Connects to the ztunnel serving `path`; `None` when none does (no socket file, or nobody
    /// listening on it: a ztunnel that exited).
    pub fn find(path: &Path) -> Result<Option<Predecessor>, HandoverError> {
        let io = |source| HandoverError::Io { path: path.to_owned(), source };
        let stream = match UnixStream::connect(path) {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Ok(None)
            }
            Err(e) => return Err(io(e)),
        };
        check_peer(path, &stream)?;
        stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
        Ok(Some(Predecessor { path: path.to_owned(), stream }))
    }

    /// Asks for the listeners. The predecessor keeps serving until [`Taken::confirm`].
    pub fn take(mut self) -> Result<Taken, HandoverError> {
        let path = self.path.clone();
        let io = |source| HandoverError::Io { path: path.clone(), source };
        self.stream.write_all(b"take\n").map_err(io)?;
        let mut line = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut line)];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(NAMES.len()))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(&self.stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(|e| io(e.into()))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        let len = msg.bytes;
        let names = String::from_utf8_lossy(&line[..len]).trim().to_owned();
        // Six descriptors, each a listening TCP socket: anything else is refused, not served.
        let listening = |fd: &OwnedFd| {
            nix::sys::socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false)
                && nix::sys::socket::getsockopt(fd, sockopt::SockType).ok()
                    == Some(nix::sys::socket::SockType::Stream)
        };
        let listeners: Option<Listeners> = (names == NAMES.join(" ") && fds.iter().all(listening))
            .then(|| fds.into_iter().map(std::net::TcpListener::from).collect::<Vec<_>>().try_into().ok())
            .flatten();
        let Some(listeners) = listeners else {
            return Err(HandoverError::Protocol {
                path: self.path,
                got: format!("{names} with descriptors that are not six listening TCP sockets"),
                expected: "the six listeners' names with their listening sockets",
            });
        };
        Ok(Taken { listeners, predecessor: self })
    }
}

impl Predecessor {
    /// Tells the predecessor this process serves the listeners it took: it stops accepting.
    pub fn confirm(mut self) -> Result<(), HandoverError> {
        let path = self.path;
        self.stream.write_all(b"ok\n").map_err(|source| HandoverError::Io { path, source })
    }
}

/// The mark a ztunnel leaves in its pod's state directory once it has handed over.
const HANDED_OVER: &str = "handed-over";

/// Whether a ztunnel of this pod has already handed its listeners to a successor: a restarted
/// container must then not take them back (it waits to be deleted with its pod).
pub fn pod_handed_over(pod_state_dir: &Path) -> bool {
    pod_state_dir.join(HANDED_OVER).exists()
}

/// Marks this pod as having handed over (see [`pod_handed_over`]).
pub fn mark_pod_handed_over(pod_state_dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(pod_state_dir)?;
    std::fs::write(pod_state_dir.join(HANDED_OVER), b"")
}

/// Serves the hand-over socket at `path` (replacing a stale one) for `listeners` (duplicates of
/// the ones this process serves, in the order of [`NAMES`]) until a successor has taken them;
/// then `taken` fires and it returns. A successor that fails halfway leaves this process
/// serving and the socket open for the next one.
pub async fn serve(path: PathBuf, listeners: Vec<OwnedFd>, taken: oneshot::Sender<()>) {
    let listener = match bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the hand-over socket; an upgrade will not be seamless");
            return;
        }
    };
    tracing::info!(path = %path.display(), "hand-over socket ready");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(stream) = stream.into_std() else { continue };
        let fds: Vec<OwnedFd> = match listeners.iter().map(OwnedFd::try_clone).collect() {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over: cannot duplicate the listeners; still serving");
                continue;
            }
        };
        let p = path.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            give(&p, stream, &borrowed)
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                tracing::info!("a new ztunnel took over the listeners; draining");
                let _ = taken.send(());
                return;
            }
            Ok(Err(HandoverError::Protocol { got, .. })) if got.is_empty() => {
                tracing::debug!("hand-over socket probed")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "hand-over failed; still serving"),
            Err(e) => tracing::warn!(error = %e, "hand-over panicked; still serving"),
        }
    }
}

/// The successor's side of one exchange, blocking.
fn give(path: &Path, mut stream: UnixStream, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    let io = |source| HandoverError::Io { path: path.to_owned(), source };
    stream.set_nonblocking(false).map_err(io)?;
    check_peer(path, &stream)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    expect_line(path, &mut stream, "take")?;
    let names = format!("{}\n", NAMES.join(" "));
    let iov = [IoSlice::new(names.as_bytes())];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(NAMES.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io(io::Error::other("too many descriptors for the control buffer")));
    }
    sendmsg(&stream, &iov, &mut control, SendFlags::empty()).map_err(|e| io(e.into()))?;
    // The successor builds its proxy on them, then confirms; it may be slow on a busy node.
    stream.set_read_timeout(Some(STEP_TIMEOUT * 3)).map_err(io)?;
    expect_line(path, &mut stream, "ok")
}

fn expect_line(path: &Path, stream: &mut UnixStream, expected: &'static str) -> Result<(), HandoverError> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => buf.push(byte[0]),
            Err(source) => return Err(HandoverError::Io { path: path.to_owned(), source }),
        }
    }
    let got = String::from_utf8_lossy(&buf).into_owned();
    if got != expected {
        return Err(HandoverError::Protocol { path: path.to_owned(), got, expected });
    }
    Ok(())
}

/// Only a process of this process's user may take part.
fn check_peer(path: &Path, stream: &UnixStream) -> Result<(), HandoverError> {
    let creds = nix::sys::socket::getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| HandoverError::Io { path: path.to_owned(), source: e.into() })?;
    let own = nix::unistd::geteuid().as_raw();
    if creds.uid() != own {
        return Err(HandoverError::Stranger { path: path.to_owned(), peer: creds.uid(), own });
    }
    Ok(())
}

/// Binds `path` (mode 0600, its directory created 0700 when missing), replacing whatever socket
/// file was there: a predecessor that handed over no longer needs it.
fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners() -> Vec<std::net::TcpListener> {
        (0..NAMES.len()).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listeners_change_hands_only_when_the_successor_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        assert!(Predecessor::find(&path).unwrap().is_none(), "nobody serves yet");

        let ours = listeners();
        let addrs: Vec<_> = ours.iter().map(|l| l.local_addr().unwrap()).collect();
        let dups = ours.iter().map(|l| OwnedFd::from(l.try_clone().unwrap())).collect();
        let (tx, mut rx) = oneshot::channel();
        let server = tokio::spawn(serve(path.clone(), dups, tx));
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..100 {
                if p.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
        .unwrap();

        // Hostile or broken peers: a probe that closes at once, a line that is not `take`, an
        // endless line. Each is refused alone; the predecessor keeps serving.
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            assert!(Predecessor::runs(&p));
            for sent in [&b"nonsense\n"[..], &[b'x'; 4096][..]] {
                let mut s = UnixStream::connect(&p).unwrap();
                s.write_all(sent).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "the predecessor answered {sent:?}");
            }
        })
        .await
        .unwrap();
        assert!(rx.try_recv().is_err(), "handed over to a peer that never asked properly");

        // A successor that takes but never confirms leaves the predecessor serving.
        let p = path.clone();
        let taken =
            tokio::task::spawn_blocking(move || Predecessor::find(&p).unwrap().unwrap().take().unwrap())
                .await
                .unwrap();
        let got: Vec<_> = taken.listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(got, addrs, "the same sockets, in order");
        drop(taken);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "handed over without a confirmation");

        // One that confirms takes over.
        let p = path.clone();
        let listeners = tokio::task::spawn_blocking(move || {
            let taken = Predecessor::find(&p).unwrap().unwrap().take().unwrap();
            taken.predecessor.confirm().unwrap();
            taken.listeners
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), &mut rx).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        // A connection to the old address reaches the new holder's socket.
        drop(ours);
        let client = std::net::TcpStream::connect(addrs[2]).unwrap();
        let (accepted, _) = listeners[2].accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_that_are_not_listeners_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connected = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut fds: Vec<OwnedFd> =
            (0..NAMES.len() - 1).map(|_| listener.try_clone().unwrap().into()).collect();
        fds.push(connected.into()); // a connection where a listener belongs
        let (tx, _rx) = oneshot::channel();
        let server = tokio::spawn(serve(path.clone(), fds, tx));
        let p = path.clone();
        let taken = tokio::task::spawn_blocking(move || {
            while !p.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            Predecessor::find(&p).unwrap().unwrap().take()
        })
        .await
        .unwrap();
        assert!(matches!(taken, Err(HandoverError::Protocol { .. })), "took a connection for a listener");
        server.abort();
    }

    #[test]
    fn a_pod_that_handed_over_is_marked_for_its_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("pod");
        assert!(!pod_handed_over(&state));
        mark_pod_handed_over(&state).unwrap();
        assert!(pod_handed_over(&state));
    }

    #[test]
    fn a_stale_socket_file_means_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(Predecessor::find(&path).unwrap().is_none());
    }
}
