//! QUIC + mutual TLS on loopback with real endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::tls::{self, ClusterCa};
use super::wire::{self, Status};
use super::*;
use crate::core::{Digest, PiecePlan};

struct Mem {
    task: TaskId,
    manifest: Bytes,
    pieces: Vec<Bytes>,
}

impl PieceSource for Mem {
    fn manifest(&self, task: &TaskId) -> Option<Bytes> {
        (*task == self.task).then(|| self.manifest.clone())
    }
    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes> {
        (*task == self.task)
            .then(|| self.pieces.get(index as usize).cloned())
            .flatten()
    }
}

fn content() -> (Mem, Manifest) {
    let pl = 64 * 1024;
    let data: Vec<u8> = (0..(3 * pl + 100)).map(|i| (i * 31 % 251) as u8).collect();
    let plan = PiecePlan::new(data.len() as u64, pl as u64).unwrap();
    let pieces: Vec<Bytes> = plan
        .pieces()
        .map(|p| Bytes::copy_from_slice(&data[p.offset as usize..p.end() as usize]))
        .collect();
    let m = Manifest::of_content(plan, &data).unwrap();
    let task = TaskId::for_content(m.content_digest());
    (
        Mem {
            task,
            manifest: Bytes::from(m.encode()),
            pieces,
        },
        m,
    )
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn serving(ca: &ClusterCa) -> (Node, SocketAddr, TaskId, Manifest, Vec<Bytes>) {
    let (mem, m) = content();
    let (task, pieces) = (mem.task, mem.pieces.clone());
    let node = Node::bind(loopback(), &ca.issue("seed").unwrap()).unwrap();
    node.serve(Arc::new(mem), Arc::new(|_| {}));
    let addr = node.local_addr().unwrap();
    (node, addr, task, m, pieces)
}

#[tokio::test]
async fn same_ca_peers_exchange_manifests_and_pieces() {
    let ca = ClusterCa::generate().unwrap();
    let (_seed, addr, task, m, pieces) = serving(&ca);
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(addr).await.unwrap();
    assert_eq!(parent.manifest(task).await.unwrap(), m);
    for (i, want) in pieces.iter().enumerate() {
        let got = parent.piece(task, i as u32, 0).await.unwrap().concat();
        assert_eq!(&got[..], &want[..]);
        let p = m.plan().piece(i as u32).unwrap();
        let last = i + 1 == pieces.len();
        assert!(m.link(i as u32).unwrap().holds(&p, last, &[&got]));
    }
    assert!(matches!(
        parent.piece(task, 99, 0).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
    let other = TaskId::for_content(Digest::of(b"other"));
    assert!(matches!(
        parent.manifest(other).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
}

#[tokio::test]
async fn requests_end_their_streams_without_stop_sending_or_resets() {
    let ca = ClusterCa::generate().unwrap();
    let (_seed, addr, task, m, pieces) = serving(&ca);
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(addr).await.unwrap();
    for _ in 0..4 {
        for i in 0..pieces.len() {
            parent.piece(task, i as u32, 0).await.unwrap();
        }
        assert_eq!(parent.manifest(task).await.unwrap(), m);
    }
    // Anything either side queued for an earlier stream left before this answer did.
    assert_eq!(parent.manifest(task).await.unwrap(), m);
    let st = parent.stats();
    assert_eq!(
        (st.frame_tx.stop_sending, st.frame_tx.reset_stream),
        (0, 0),
        "the asking side read every answer to its end"
    );
    assert_eq!(
        (st.frame_rx.stop_sending, st.frame_rx.reset_stream),
        (0, 0),
        "the serving side read every request to its end"
    );
}

#[tokio::test]
async fn a_peer_without_the_cluster_ca_gets_nothing() {
    let ca = ClusterCa::generate().unwrap();
    let (_seed, addr, task, _, _) = serving(&ca);
    let intruder_ca = ClusterCa::generate().unwrap();
    // The intruder trusts the real CA (it could copy ca.pem) but its own cert is not from it.
    let mut id = intruder_ca.issue("intruder").unwrap();
    id.ca = ca.issue("x").unwrap().ca;
    let intruder = Node::bind(loopback(), &id).unwrap();
    let res = match intruder.connect(addr).await {
        Ok(parent) => parent.manifest(task).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(res.is_err(), "an intruder must get no manifest");
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let (real, fake) = (
        ClusterCa::generate().unwrap(),
        ClusterCa::generate().unwrap(),
    );
    let (_impostor, addr, _, _, _) = serving(&fake);
    let peer = Node::bind(loopback(), &real.issue("peer").unwrap()).unwrap();
    assert!(matches!(
        peer.connect(addr).await,
        Err(TransportError::Connect { .. })
    ));
}

#[tokio::test]
async fn malformed_or_truncated_requests_get_an_error_and_the_server_lives_on() {
    let ca = ClusterCa::generate().unwrap();
    let (_seed, addr, task, m, _) = serving(&ca);
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(addr).await.unwrap();
    for junk in [vec![0xffu8; wire::REQUEST_LEN], b"STLP".to_vec(), vec![]] {
        let (mut send, mut recv) = parent.conn.open_bi().await.unwrap();
        send.write_all(&junk).await.unwrap();
        send.finish().unwrap();
        let mut h = [0u8; wire::RESPONSE_HEADER_LEN];
        recv.read_exact(&mut h).await.unwrap();
        assert_eq!(
            wire::decode_response_header(&h, 0).unwrap().0,
            Status::BadRequest
        );
    }
    assert_eq!(parent.manifest(task).await.unwrap(), m, "still serving");
}

/// A cluster member that answers every request with `header` and nothing more.
fn rogue_server(ca: &ClusterCa, header: [u8; wire::RESPONSE_HEADER_LEN]) -> SocketAddr {
    let rogue = quinn::Endpoint::server(
        tls::server_config(&ca.issue("rogue").unwrap()).unwrap(),
        loopback(),
    )
    .unwrap();
    let addr = rogue.local_addr().unwrap();
    tokio::spawn(async move {
        let conn = rogue.accept().await.unwrap().await.unwrap();
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut req = [0u8; wire::REQUEST_LEN];
            let _ = recv.read_exact(&mut req).await;
            let _ = send.write_all(&header).await;
            let _ = send.finish();
        }
    });
    addr
}

#[tokio::test]
async fn an_oversized_answer_is_refused_before_it_is_read() {
    let ca = ClusterCa::generate().unwrap();
    let addr = rogue_server(
        &ca,
        wire::encode_response_header(Status::Ok, crate::core::MAX_PIECE_LENGTH + 1),
    );
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(addr).await.unwrap();
    let task = TaskId::for_content(Digest::of(b"x"));
    assert!(matches!(
        parent.piece(task, 0, 0).await,
        Err(TransportError::Wire(WireError::TooLong { .. }))
    ));
}

/// A node of the release before chain values (wire version 1) and this one: each side fails
/// with an error naming both versions, and the server lives on.
#[tokio::test]
async fn peers_of_another_wire_version_get_an_error_naming_both_versions() {
    let ca = ClusterCa::generate().unwrap();
    let (_seed, addr, task, m, _) = serving(&ca);
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(addr).await.unwrap();
    // An old client's request: answered in this side's version, which the old client refuses.
    let mut old = wire::Request::Manifest { task }.encode();
    old[4] = 1;
    let (mut send, mut recv) = parent.conn.open_bi().await.unwrap();
    send.write_all(&old).await.unwrap();
    send.finish().unwrap();
    let mut h = [0u8; wire::RESPONSE_HEADER_LEN];
    recv.read_exact(&mut h).await.unwrap();
    assert_eq!(h[4], wire::VERSION);
    assert_eq!(
        wire::decode_response_header(&h, 0).unwrap().0,
        Status::BadRequest
    );
    assert_eq!(parent.manifest(task).await.unwrap(), m, "still serving");

    // An old server: this client's error names both versions.
    let mut old = wire::encode_response_header(Status::BadRequest, 0);
    old[4] = 1;
    let old_addr = rogue_server(&ca, old);
    let parent = peer.connect(old_addr).await.unwrap();
    let err = parent.have(task, 0, 0).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Wire(WireError::Version(1))),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("version 1") && text.contains("speaks 2"),
        "{text}"
    );
}

#[tokio::test]
async fn the_ca_is_created_once_and_reloaded() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let a = ClusterCa::load_or_create(d.path()).unwrap();
    let b = ClusterCa::load_or_create(d.path()).unwrap();
    assert_eq!(
        a.cert_pem(),
        std::fs::read_to_string(d.path().join("ca.pem")).unwrap()
    );
    // The reloaded CA issues certificates that chain to the stored one.
    assert_eq!(b.issue("n").unwrap().ca, a.issue("m").unwrap().ca);
    // Nodes issued before and after the reload trust each other.
    let (_seed, addr, task, m, _) = serving(&a);
    let late = Node::bind(loopback(), &b.issue("late").unwrap()).unwrap();
    assert_eq!(
        late.connect(addr)
            .await
            .unwrap()
            .manifest(task)
            .await
            .unwrap(),
        m
    );
    let mode = std::fs::metadata(d.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A creation interrupted after the key (kill -9): the next start makes a fresh CA.
    std::fs::remove_file(d.path().join("ca.pem")).unwrap();
    let c = ClusterCa::load_or_create(d.path()).unwrap();
    assert_ne!(c.cert_pem(), a.cert_pem());
    assert!(!d.path().join("ca.key.tmp").exists() && !d.path().join("ca.pem.tmp").exists());
    // A certificate without its key is an error that says so.
    std::fs::remove_file(d.path().join("ca.key")).unwrap();
    assert!(matches!(
        ClusterCa::load_or_create(d.path()),
        Err(tls::TlsError::BadCa { .. })
    ));
}

/// Serves upload views of real stored tasks (the daemon will hold a registry like this).
struct Views(std::sync::Mutex<Vec<crate::storage::UploadView>>);

impl PieceSource for Views {
    fn manifest(&self, task: &TaskId) -> Option<Bytes> {
        self.0
            .lock()
            .ok()?
            .iter()
            .find(|v| v.task() == *task)?
            .manifest()
    }
    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes> {
        self.0
            .lock()
            .ok()?
            .iter()
            .find(|v| v.task() == *task)?
            .piece(index)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_pieces_are_served_from_the_map_only_once_verified() {
    use crate::storage::{LeaseMode, Store, TaskHeader};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), std::time::Duration::from_millis(20)).unwrap();
    let (mem, m) = content();
    let header = TaskHeader {
        id: mem.task,
        plan: *m.plan(),
        expected: Some(m.content_digest()),
        validator: String::new(),
        url: String::new(),
    };
    let task = store
        .create(
            store
                .acquire(&mem.task, LeaseMode::Exclusive)
                .await
                .unwrap(),
            header,
        )
        .unwrap();
    let put = |i: u32| {
        let p = m.plan().piece(i).unwrap();
        task.write_piece(p, vec![mem.pieces[i as usize].clone()], m.link(i).unwrap())
    };
    put(0).await.unwrap();
    put(2).await.unwrap();
    let views = Arc::new(Views(std::sync::Mutex::new(vec![task
        .upload_view()
        .unwrap()])));

    let ca = ClusterCa::generate().unwrap();
    let seed = Node::bind(loopback(), &ca.issue("seed").unwrap()).unwrap();
    seed.serve(views.clone(), Arc::new(|_| {}));
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(seed.local_addr().unwrap()).await.unwrap();

    // Served while still downloading: verified pieces only; no manifest before completion.
    assert_eq!(
        parent.piece(mem.task, 0, 0).await.unwrap().concat(),
        mem.pieces[0].to_vec()
    );
    assert_eq!(
        parent.piece(mem.task, 2, 0).await.unwrap().concat(),
        mem.pieces[2].to_vec()
    );
    assert!(matches!(
        parent.piece(mem.task, 1, 0).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
    assert!(matches!(
        parent.manifest(mem.task).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
    // GC leaves a task that is being uploaded alone.
    let gc = crate::config::GcConfig {
        ttl_seconds: 0,
        ..Default::default()
    };
    assert_eq!(
        store
            .gc(
                &gc,
                std::time::SystemTime::now() + std::time::Duration::from_secs(5)
            )
            .unwrap()
            .evicted
            .len(),
        0
    );

    put(1).await.unwrap();
    put(3).await.unwrap();
    task.complete(m.content_digest()).unwrap();
    assert_eq!(parent.manifest(mem.task).await.unwrap(), m);
    assert_eq!(
        parent.piece(mem.task, 1, 0).await.unwrap().concat(),
        mem.pieces[1].to_vec()
    );

    // Discarded: nothing more is served from it.
    let _lease = task.discard().unwrap();
    assert!(matches!(
        parent.piece(mem.task, 0, 0).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
    assert!(matches!(
        parent.manifest(mem.task).await,
        Err(TransportError::Refused(Status::NotFound))
    ));
}

#[test]
fn the_kernels_receive_drops_on_a_socket_are_read_from_the_socket_itself() {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    assert_eq!(super::udp_drops(&rx), Some(0));
    // The smallest receive buffer, never read: most of 2,000 datagrams are dropped.
    rustix::net::sockopt::set_socket_recv_buffer_size(&rx, 1).expect("rcvbuf");
    let to = rx.local_addr().expect("addr");
    for _ in 0..2_000 {
        tx.send_to(&[7u8; 1200], to).expect("send");
    }
    let drops = super::udp_drops(&rx).expect("SO_MEMINFO");
    assert!(drops > 1_000, "{drops} drops");
}

/// A spreading parent that declines every piece, offering others.
struct Declining;

impl PieceSource for Declining {
    fn manifest(&self, _task: &TaskId) -> Option<Bytes> {
        None
    }
    fn piece(&self, _task: &TaskId, _index: u32) -> Option<Bytes> {
        None
    }
    fn piece_status(
        &self,
        _task: &TaskId,
        _index: u32,
        _to: SocketAddr,
        _group: u32,
    ) -> Result<Bytes, Status> {
        Err(Status::Busy)
    }
    fn offer(&self, _task: &TaskId, _to: SocketAddr, group: u32) -> Vec<u32> {
        // More than a Busy answer carries: only the first MAX_OFFER go.
        (group..group + 40).collect()
    }
}

#[tokio::test]
async fn a_busy_answer_carries_its_offer_and_a_malformed_offer_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let node = Node::bind(loopback(), &ca.issue("seed").unwrap()).unwrap();
    node.serve(Arc::new(Declining), Arc::new(|_| {}));
    let peer = Node::bind(loopback(), &ca.issue("peer").unwrap()).unwrap();
    let parent = peer.connect(node.local_addr().unwrap()).await.unwrap();
    let task = TaskId::for_content(Digest::of(b"x"));
    match parent.piece(task, 3, 100).await {
        Err(TransportError::Busy(offer)) => {
            assert_eq!(
                offer,
                (100..100 + wire::MAX_OFFER as u32).collect::<Vec<_>>()
            )
        }
        other => panic!("expected Busy with an offer, got {other:?}"),
    }
    // An older release's Busy carries nothing.
    let addr = rogue_server(&ca, wire::encode_response_header(Status::Busy, 0));
    let parent = peer.connect(addr).await.unwrap();
    assert!(matches!(
        parent.piece(task, 0, 0).await,
        Err(TransportError::Busy(offer)) if offer.is_empty()
    ));
    // An offer longer than MAX_OFFER pieces is refused before it is read.
    let addr = rogue_server(
        &ca,
        wire::encode_response_header(Status::Busy, wire::MAX_OFFER_LEN + 4),
    );
    let parent = peer.connect(addr).await.unwrap();
    assert!(matches!(
        parent.piece(task, 0, 0).await,
        Err(TransportError::Wire(WireError::BadOffer(_)))
    ));
}
