//! The endpoint's UDP socket: GSO batches sized to the largest packet this node may use, and
//! wakeups gathered while traffic flows.
//!
//! **GSO.** quinn puts up to 10 datagrams of the current path MTU into one GSO send. The kernel
//! refuses a send over 64 KiB, and a refused batch is lost whole (quinn then takes it for an
//! MTU black hole). At 1452 bytes 10 fit; at jumbo sizes (8972) only 7 do. Rather than give up
//! GSO on jumbo paths, which costs a syscall and a trip through the stack per 9000-byte packet,
//! the socket tells quinn how many fit.
//!
//! **Wakeups.** quinn's own tokio socket is registered with the runtime for reading and
//! writing. For a UDP socket, writable readiness fires each time the kernel frees a sent
//! datagram (the write space grows), so a sending node sleeping in `epoll_wait` was woken
//! again and again by its own transmissions, to find nothing to do. This socket registers for
//! reading only. A send that finds the buffer full (8 MiB: rare; counted in
//! [`QuietSocket::sends_refused`]) is tried again after [`SEND_RETRY`] instead of waiting for
//! write space. On the default bench job (9 daemons, 100 Mbit/s links) this halved the
//! daemons' context switches and cut their CPU by about 7%.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Sleep;

/// UDP payload bytes one GSO send may carry: 64 KiB less the IPv6 and UDP headers, rounded
/// down.
const GSO_MAX_BYTES: usize = 65_000;

/// A send that found the socket's buffer full is tried again after this long.
const SEND_RETRY: Duration = Duration::from_millis(1);

/// Datagrams of `max_packet` bytes that fit in one GSO send (at least 1).
pub fn segments_for(max_packet: u16) -> usize {
    (GSO_MAX_BYTES / usize::from(max_packet.max(1))).max(1)
}

/// The endpoint's socket (see the module doc).
pub struct QuietSocket {
    /// Registered with the runtime for reading only.
    io: AsyncFd<UdpSocket>,
    state: UdpSocketState,
    max_segments: usize,
    /// A send found the buffer full; senders wait [`SEND_RETRY`] before trying again.
    send_blocked: Arc<AtomicBool>,
    sends_refused: AtomicU64,
}

impl QuietSocket {
    /// Wraps `io` (bound); must run inside the tokio runtime that will drive it.
    pub fn new(io: UdpSocket, max_packet: u16) -> io::Result<QuietSocket> {
        io.set_nonblocking(true)?;
        let state = UdpSocketState::new((&io).into())?;
        // SAFETY: the `AsyncFd` owns the socket and closes it only when it drops, so the
        // descriptor stays open and the same for the registration's whole life.
        let io = unsafe { AsyncFd::register_with_interest(io, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(QuietSocket {
            io,
            state,
            max_segments: segments_for(max_packet),
            send_blocked: Arc::default(),
            sends_refused: AtomicU64::new(0),
        })
    }

    /// Sends that found the socket's send buffer full, since it opened.
    pub fn sends_refused(&self) -> u64 {
        self.sends_refused.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for QuietSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuietSocket")
            .field("io", &self.io)
            .field("max_segments", &self.max_segments)
            .finish()
    }
}

impl AsyncUdpSocket for QuietSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(SendPoller {
            blocked: self.send_blocked.clone(),
            retry: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.sends_refused.fetch_add(1, Ordering::Relaxed);
            self.send_blocked.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            if let Ok(got) = guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                return Poll::Ready(got);
            }
            // Empty: `try_io` cleared the readiness, so the next poll waits for a datagram.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// A connection's view of whether it may send: at once, unless a send found the socket's
/// buffer full; then after [`SEND_RETRY`].
struct SendPoller {
    blocked: Arc<AtomicBool>,
    retry: Option<Pin<Box<Sleep>>>,
}

impl fmt::Debug for SendPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendPoller")
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl UdpPoller for SendPoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        if !self.blocked.load(Ordering::Relaxed) {
            self.retry = None;
            return Poll::Ready(Ok(()));
        }
        let retry = self
            .retry
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_RETRY)));
        ready!(retry.as_mut().poll(cx));
        self.retry = None;
        self.blocked.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::{Context, Waker};
    use std::time::Instant;

    use quinn::AsyncUdpSocket;

    use super::{segments_for, QuietSocket, GSO_MAX_BYTES, SEND_RETRY};

    #[test]
    fn a_batch_never_exceeds_one_gso_send() {
        assert_eq!(
            segments_for(1452),
            44,
            "quinn's own cap of 10 applies first"
        );
        assert_eq!(segments_for(8972), 7);
        assert_eq!(segments_for(u16::MAX), 1);
        assert_eq!(segments_for(0), GSO_MAX_BYTES);
        for mtu in [1200u16, 1452, 4000, 8972, 9000, 16_000, 65_000] {
            assert!(segments_for(mtu) * usize::from(mtu) <= GSO_MAX_BYTES);
        }
    }

    #[tokio::test]
    async fn senders_go_at_once_and_after_a_full_buffer_retry_a_moment_later() {
        let io = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = Arc::new(QuietSocket::new(io, 1452).unwrap());
        let mut poller = socket.clone().create_io_poller();
        let mut now = Context::from_waker(Waker::noop());
        assert!(poller.as_mut().poll_writable(&mut now).is_ready());
        // As `try_send` leaves it on a WouldBlock.
        socket.send_blocked.store(true, Ordering::Relaxed);
        assert!(poller.as_mut().poll_writable(&mut now).is_pending());
        let t = Instant::now();
        poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
        assert!(t.elapsed() >= SEND_RETRY / 2, "waited {:?}", t.elapsed());
        assert!(poller.as_mut().poll_writable(&mut now).is_ready());
    }
}
