//! The endpoint's UDP socket: GSO batches sized to the largest packet this node may use, and
//! wakeups gathered while traffic flows.
//!
//! **GSO.** quinn puts as many datagrams of the current path MTU into one GSO send as the
//! socket allows, up to 64 in Starling's copy (`vendor/README.md`; 10 in quinn's release). The
//! kernel refuses a send over 64 KiB, and a refused batch is lost whole (quinn then takes it for
//! an MTU black hole), so the socket tells quinn how many fit: 44 at 1452 bytes, 7 at jumbo
//! sizes (8972). Each send is one packet buffer through the kernel's stack, qdiscs and veth
//! (and, on a rate-limited link, one qdisc timer and softirq), so fewer, larger ones are what
//! brought a 1 Gbit/s fan-out from 6.3 to 4.8 CPU-s per GiB (docs/decisions.md K65).
//!
//! **Wakeups.** quinn's own tokio socket is registered with the runtime for reading and
//! writing. For a UDP socket, writable readiness fires each time the kernel frees a sent
//! datagram (the write space grows), so a sending node sleeping in `epoll_wait` was woken
//! again and again by its own transmissions, to find nothing to do. This socket registers for
//! reading only. A send that finds the buffer full (8 MiB: rare; counted in
//! [`QuietSocket::sends_refused`]) is tried again after [`SEND_RETRY`] instead of waiting for
//! write space.
//!
//! **Gathered reads.** A receiving node is still woken by every datagram that arrives: at
//! 100 Mbit/s, often several times a millisecond for one or two packets each. While the node
//! allows it ([`QuietSocket::gather`], set by the daemon when every busy connection's smoothed
//! RTT is long enough that a millisecond or two more costs nothing: see
//! `netprobe::policy::Gather`), a socket woken twice within a [`TICK`] leaves the
//! runtime's poll set and reads whatever arrived once per tick instead (the receive buffer
//! holds many ticks' worth). The first tick that finds nothing, or the node withdrawing its
//! permission, registers it again, so an idle node sleeps until a datagram comes. Each read is
//! up to two ticks late, which is why it needs the permission: on a sub-millisecond path a
//! loss-limited flow (random loss, Cubic) runs at a rate proportional to 1/RTT, and ticking
//! unconditionally made one 2.4 times slower (`cargo xtask bench adapt --only lossy`). While a
//! socket may gather, the runtime's threads also take a tick of timer slack (`slack`).

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{Instant, Sleep};

/// UDP payload bytes one GSO send may carry: 64 KiB less the IPv6 and UDP headers, rounded
/// down.
const GSO_MAX_BYTES: usize = 65_000;

/// While reads are gathered, how often the socket is read. The runtime's timer has
/// millisecond resolution, so a tick lasts 1 to 2 ms: at 1 Gbit/s that is 250 KB, a small part
/// of the receive buffer.
pub const TICK: Duration = Duration::from_millis(1);

/// A send that found the socket's buffer full is tried again after this long.
const SEND_RETRY: Duration = Duration::from_millis(1);

/// Datagrams of `max_packet` bytes that fit in one GSO send (at least 1).
pub fn segments_for(max_packet: u16) -> usize {
    (GSO_MAX_BYTES / usize::from(max_packet.max(1))).max(1)
}

/// How the endpoint learns that datagrams wait.
enum Wait {
    /// Registered with the runtime for reading (a duplicate of the socket's descriptor, so
    /// leaving the poll set does not close the socket). `drained`: the last read found nothing,
    /// so the next datagram is a wake; `last_wake`: when the last wake was.
    Ready {
        fd: AsyncFd<UdpSocket>,
        drained: bool,
        last_wake: Option<Instant>,
    },
    /// Not registered: the socket is read when `sleep` ends (`armed`) until it is empty; then
    /// the next tick is armed if this one `found` datagrams.
    Tick {
        sleep: Pin<Box<Sleep>>,
        armed: bool,
        found: bool,
    },
}

impl Wait {
    fn ready(io: &UdpSocket) -> io::Result<Wait> {
        // SAFETY: the duplicate is owned by the `AsyncFd` and closed only when it drops, so its
        // descriptor stays open and the same for the registration's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(io.try_clone()?, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Wait::Ready {
            fd,
            drained: true,
            last_wake: None,
        })
    }
}

/// The endpoint's socket (see the module doc).
pub struct QuietSocket {
    io: UdpSocket,
    state: UdpSocketState,
    wait: Mutex<Wait>,
    /// Reads may be gathered by the tick.
    gather: AtomicBool,
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
        Ok(QuietSocket {
            wait: Mutex::new(Wait::ready(&io)?),
            gather: AtomicBool::new(false),
            io,
            state,
            max_segments: segments_for(max_packet),
            send_blocked: Arc::default(),
            sends_refused: AtomicU64::new(0),
        })
    }

    /// Allows or stops gathering reads by the tick (see the module doc); a socket ticking now
    /// registers again at its next read.
    pub fn gather(&self, on: bool) {
        if self.gather.swap(on, Ordering::Relaxed) != on {
            super::slack::gathering(on);
            tracing::debug!(on, "gathered reads");
        }
    }

    fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.state.recv((&self.io).into(), bufs, meta)
    }

    /// The socket itself (for its address, options and buffer sizes).
    pub fn io(&self) -> &UdpSocket {
        &self.io
    }

    /// Sends that found the socket's send buffer full, since it opened.
    pub fn sends_refused(&self) -> u64 {
        self.sends_refused.load(Ordering::Relaxed)
    }
}

impl Drop for QuietSocket {
    fn drop(&mut self) {
        self.gather(false);
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
        let sent = self.state.send((&self.io).into(), transmit);
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
        let mut wait = self.wait.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let next = match &mut *wait {
                Wait::Ready {
                    fd,
                    drained,
                    last_wake,
                } => {
                    let mut guard = ready!(fd.poll_read_ready(cx))?;
                    let Ok(got) = guard.try_io(|_| self.recv(bufs, meta)) else {
                        // Empty: `try_io` cleared the readiness, so the next poll waits.
                        *drained = true;
                        continue;
                    };
                    if !std::mem::take(drained) {
                        return Poll::Ready(got);
                    }
                    let now = Instant::now();
                    let busy = last_wake.is_some_and(|t| now - t < TICK);
                    *last_wake = Some(now);
                    if busy && self.gather.load(Ordering::Relaxed) {
                        // Two wakes within a tick: read by the tick from now on, starting
                        // with what is left now.
                        *wait = Wait::Tick {
                            sleep: Box::pin(tokio::time::sleep(TICK)),
                            armed: false,
                            found: true,
                        };
                    }
                    return Poll::Ready(got);
                }
                Wait::Tick {
                    sleep,
                    armed,
                    found,
                } => {
                    if *armed {
                        ready!(sleep.as_mut().poll(cx));
                        *armed = false;
                    }
                    match self.recv(bufs, meta) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if std::mem::take(found) && self.gather.load(Ordering::Relaxed) {
                                sleep.as_mut().reset(Instant::now() + TICK);
                                *armed = true;
                                continue;
                            }
                            // A tick without a datagram, or no longer allowed: sleep until
                            // one comes.
                            match Wait::ready(&self.io) {
                                Ok(ready) => ready,
                                Err(e) => {
                                    // No descriptor to spare (EMFILE): a failed read would end
                                    // the endpoint, so keep reading by the tick.
                                    tracing::debug!(error = %e, "UDP socket stays on the tick");
                                    sleep.as_mut().reset(Instant::now() + TICK);
                                    *armed = true;
                                    continue;
                                }
                            }
                        }
                        got => {
                            *found = true;
                            return Poll::Ready(got);
                        }
                    }
                }
            };
            *wait = next;
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
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

    use std::io::IoSliceMut;
    use std::time::Duration;

    use super::{segments_for, QuietSocket, Wait, GSO_MAX_BYTES, SEND_RETRY, TICK};

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

    /// Receives until `want` datagrams (each led by its sequence number) arrived, checking
    /// they come in order; returns whether the socket read by the tick meanwhile.
    async fn receive(socket: &QuietSocket, next: &mut u32, want: u32) -> bool {
        let lost = format!("datagrams from {next} to {want} did not all come");
        tokio::time::timeout(Duration::from_secs(30), receive_all(socket, next, want))
            .await
            .expect(&lost)
    }

    async fn receive_all(socket: &QuietSocket, next: &mut u32, want: u32) -> bool {
        use quinn::udp::{RecvMeta, BATCH_SIZE};
        let mut ticked = false;
        let mut storage = vec![[0u8; 2048]; BATCH_SIZE];
        while *next < want {
            let mut bufs: Vec<IoSliceMut> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); BATCH_SIZE];
            let n = poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .unwrap();
            ticked |= matches!(*socket.wait.lock().unwrap(), Wait::Tick { .. });
            for (m, b) in meta.iter().zip(&bufs).take(n) {
                for d in b[..m.len].chunks(m.stride) {
                    assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), *next);
                    *next += 1;
                }
            }
        }
        ticked
    }

    #[tokio::test]
    async fn gathered_reads_lose_nothing_and_a_quiet_socket_is_woken_by_the_next_datagram() {
        // Room for many ticks' worth: a datagram dropped here would be a stalled test.
        let io = super::super::udp_socket("127.0.0.1:0".parse().unwrap(), 8 << 20).unwrap();
        let to = io.local_addr().unwrap();
        let socket = QuietSocket::new(io, 1452).unwrap();
        socket.gather(true);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let send = move |from: u32, to_seq: u32, every: u32| {
            let sender = sender.try_clone().unwrap();
            std::thread::spawn(move || {
                for i in from..to_seq {
                    let mut d = [0u8; 1200];
                    d[..4].copy_from_slice(&i.to_le_bytes());
                    sender.send_to(&d, to).unwrap();
                    if i % every == every - 1 {
                        // The load's shape (a burst every 100 us), not a wait.
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            })
        };
        // Bursts every 100 us: many wakes within a tick, so reads are gathered.
        let burst = send(0, 3000, 8);
        let mut next = 0;
        assert!(
            receive(&socket, &mut next, 3000).await,
            "never read by the tick"
        );
        burst.join().unwrap();
        // Quiet: the socket, still polled, registers again after a tick that finds nothing,
        // and the next datagram wakes it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(*socket.wait.lock().unwrap(), Wait::Ready { .. }) {
            assert!(Instant::now() < deadline, "still on the tick while quiet");
            let polled = tokio::time::timeout(TICK, receive_all(&socket, &mut next, 3001));
            assert!(polled.await.is_err(), "a datagram nobody sent");
        }
        send(3000, 3001, 1).join().unwrap();
        assert!(!receive(&socket, &mut next, 3001).await);
        // Withdrawn while ticking: the socket registers again at its next empty read.
        let burst = send(3001, 6000, 8);
        assert!(receive(&socket, &mut next, 4000).await);
        socket.gather(false);
        receive(&socket, &mut next, 6000).await;
        burst.join().unwrap();
        assert!(matches!(*socket.wait.lock().unwrap(), Wait::Ready { .. }));
    }
}
