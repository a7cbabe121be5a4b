//! The endpoint's UDP socket, with GSO batches sized to the largest packet this node may use.
//!
//! quinn puts up to 10 datagrams of the current path MTU into one GSO send. The kernel refuses
//! a send over 64 KiB, and a refused batch is lost whole (quinn then takes it for an MTU black
//! hole). At 1452 bytes 10 fit; at jumbo sizes (8972) only 7 do. Rather than give up GSO on
//! jumbo paths, which costs a syscall and a trip through the stack per 9000-byte packet, the
//! socket tells quinn how many fit.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// UDP payload bytes one GSO send may carry: 64 KiB less the IPv6 and UDP headers, rounded
/// down.
const GSO_MAX_BYTES: usize = 65_000;

/// Datagrams of `max_packet` bytes that fit in one GSO send (at least 1).
pub fn segments_for(max_packet: u16) -> usize {
    (GSO_MAX_BYTES / usize::from(max_packet.max(1))).max(1)
}

/// Runtime's UDP socket, with `max_transmit_segments` capped.
pub struct CappedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    max_segments: usize,
}

impl CappedSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, max_packet: u16) -> CappedSocket {
        CappedSocket {
            inner,
            max_segments: segments_for(max_packet),
        }
    }
}

impl fmt::Debug for CappedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CappedSocket")
            .field("inner", &self.inner)
            .field("max_segments", &self.max_segments)
            .finish()
    }
}

impl AsyncUdpSocket for CappedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::{segments_for, GSO_MAX_BYTES};

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
}
