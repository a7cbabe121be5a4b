//! Writes the seed corpora in `fuzz/seeds/<target>/`: valid examples of every input, from the
//! real encoders, so the fuzzer starts from inputs that reach deep. `cargo xtask fuzz` runs it
//! first, so the seeds follow any change of format; the files are committed too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use starling::core::{Chain, ChainValue, Digest, Link, Manifest, PiecePlan, Request, TaskId};
use starling::scheduler::service::CandidatesCall;
use starling::scheduler::{Announce, Holding, LinkReport, Place};
use starling::storage::{encode_journal_record, LogEntry, TaskHeader};
use starling::transport::wire::{self, HaveReply, Request as Wire, Status};

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&d).expect("seed directory");
    d
}

fn write(target: &str, name: &str, data: &[u8]) {
    std::fs::write(dir(target).join(name), data).expect("write a seed");
}

/// A 1 MiB content in 64 KiB pieces: its plan, each piece's end value, and its digest.
fn content() -> (PiecePlan, Vec<ChainValue>, Digest) {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let plan = PiecePlan::new(data.len() as u64, 65536).expect("plan");
    let mut chain = Chain::new();
    let mut values = Vec::new();
    for p in plan.pieces() {
        chain.update(&data[p.offset as usize..p.end() as usize]);
        values.push(chain.value().expect("a piece boundary"));
    }
    // The last piece's end value is the content's digest itself.
    values.pop();
    let digest = chain.finish();
    values.push(ChainValue::of_digest(digest));
    (plan, values, digest)
}

#[test]
fn write_seed_corpora() {
    let (plan, values, digest) = content();
    let task = TaskId::for_content(digest);
    let url_task = TaskId::for_url("https://example.com/a.bin", &[]).expect("task");

    // wire: request frames with their bodies, response headers, have answers.
    let order = Request {
        url: "https://example.com/a.bin".into(),
        digest: Some(digest),
        ..Request::default()
    };
    let order = serde_json::to_vec(&order).expect("json");
    let announce = Announce {
        peer: "10.0.0.2:7710".into(),
        addr: "10.0.0.2:7710".parse::<SocketAddr>().expect("addr"),
        seed: false,
        upload_capacity: 1.25e8,
        uploads: 2,
        tasks: vec![
            (
                task,
                Holding::Full {
                    pieces: plan.count(),
                    have: (0..plan.count()).map(|i| i % 3 == 0).collect(),
                },
            ),
            (url_task, Holding::Added(vec![1, 5, 9])),
        ],
        links: vec![(
            "10.0.0.3:7710".into(),
            LinkReport {
                throughput: 1e8,
                rtt: std::time::Duration::from_millis(2),
                loss: 0.001,
                mtu: 1500,
            },
        )],
        place: Place {
            zone: "z1".into(),
            rack: "r7".into(),
        },
        fetching: vec![TaskId::for_content(Digest::of(b"fetched"))],
    };
    let announce = serde_json::to_vec(&announce).expect("json");
    let call = CandidatesCall {
        peer: "10.0.0.2:7710".into(),
        max: 4,
        exclude: vec!["10.0.0.9:7710".into()],
        look: false,
        banned: vec!["10.0.0.8:7710".into()],
        holds: 3,
        place: Some(Place {
            zone: "z1".into(),
            rack: "r7".into(),
        }),
    };
    let call = serde_json::to_vec(&call).expect("json");
    let frames: Vec<(&str, Wire, &[u8])> = vec![
        ("manifest", Wire::Manifest { task }, b""),
        (
            "piece",
            Wire::Piece {
                task,
                index: 3,
                group: 0x5eed,
            },
            b"",
        ),
        (
            "have",
            Wire::Have {
                task,
                epoch: 7,
                since: 2,
            },
            b"",
        ),
        (
            "seed-order",
            Wire::SeedOrder {
                task: url_task,
                body: order.len() as u32,
            },
            &order,
        ),
        (
            "announce",
            Wire::Announce {
                body: announce.len() as u32,
            },
            &announce,
        ),
        (
            "candidates",
            Wire::Candidates {
                task,
                body: call.len() as u32,
            },
            &call,
        ),
    ];
    for (name, req, body) in frames {
        let mut b = req.encode().to_vec();
        b.extend_from_slice(body);
        write("wire", &format!("request-{name}"), &b);
    }
    write(
        "wire",
        "response-ok",
        &wire::encode_response_header(Status::Ok, 65536),
    );
    let have = HaveReply {
        content_length: plan.content_length(),
        piece_length: plan.piece_length(),
        content: Some(digest),
        epoch: 7,
        end: 4,
        entries: (0..4)
            .map(|i| LogEntry {
                index: i,
                value: values[i as usize],
                held: i != 2,
            })
            .collect(),
    };
    write("wire", "have-answer", &have.encode());

    // store: header, manifest and journal of one task, joined by the target's marker.
    let header = TaskHeader {
        id: task,
        plan,
        expected: Some(digest),
        validator: "\"etag-1\"".into(),
        url: "https://example.com/a.bin".into(),
    }
    .encode();
    let manifest = Manifest::new(plan, values.clone(), digest)
        .expect("manifest")
        .encode();
    let mut journal = Vec::new();
    for i in [0u32, 1, 2, 5] {
        let start = if i == 0 {
            ChainValue::START
        } else {
            values[i as usize - 1]
        };
        let link = Link {
            index: i,
            start,
            end: values[i as usize],
        };
        encode_journal_record(&link, &mut journal);
    }
    let marker = [0xFF, 0x00, 0xFF];
    write(
        "store",
        "task",
        &[&header[..], &marker, &manifest, &marker, &journal].concat(),
    );
    write("store", "manifest-alone", &manifest);
    write("store", "header-alone", &header);

    // config: the documented examples.
    write("config", "empty", b"");
    write(
        "config",
        "peer",
        br#"data_dir = "/var/lib/starling"
[daemon]
metrics_addr = "0.0.0.0:7711"
runtime_threads = 2
[peer]
listen = "0.0.0.0:7710"
zone = "${ZONE:-z1}"
rack = "r7"
upload_limit_mbps = 1000
[scheduler]
addrs = ["starling-scheduler:7700", "10.0.0.1:7700"]
[tls]
ca_cert = "/etc/starling/ca.pem"
ca_key = "/etc/starling/ca.key"
[source]
concurrency = 4
max_connections = 16
[gc]
capacity_bytes = 107374182400
high_watermark = 0.85
low_watermark = 0.7
[proxy]
listen = "127.0.0.1:5000"
rules = ['^/v2/.+/blobs/sha256:[a-f0-9]{64}$']
"#,
    );
    write(
        "config",
        "scheduler",
        b"include = [\"extra.toml\"]\n[scheduler]\nlisten = \"0.0.0.0:7700\"\nmetrics_addr = \"0.0.0.0:7701\"\nmax_fetchers = 3\n",
    );

    // api: each request kind, one per line.
    let lines = [
        format!(
            r#"{{"get":{{"url":"https://example.com/a.bin","digest":"{digest}","headers":[["Authorization","Bearer x"]],"output":"/tmp/out","no_hardlink":true}}}}"#
        ),
        r#"{"import":{"path":"/tmp/f","link":false}}"#.into(),
        r#""probe""#.into(),
        r#""tasks""#.into(),
        r#"{"stat":{"task":"sha256:ab"}}"#.into(),
        r#"{"rm":{"task":"ab12"}}"#.into(),
        r#"{"preheat_status":{"id":3}}"#.into(),
    ];
    for (i, l) in lines.iter().enumerate() {
        write("api", &format!("line-{i}"), format!("{l}\n").as_bytes());
    }
    write("api", "all", (lines.join("\n") + "\n").as_bytes());

    // proxy_route: the heads docker, containerd, skopeo, the Hub client and a CONNECT send.
    let heads = [
        format!("GET /v2/library/alpine/blobs/sha256:{} HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n", &digest.to_string()[7..]),
        format!("GET /v2/library/alpine/blobs/{digest}?ns=docker.io HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nAuthorization: Bearer t\r\n\r\n"),
        "GET /v2/app/manifests/latest?ns=registry.example%3A5000 HTTP/1.1\r\nHost: x\r\nAccept: application/vnd.oci.image.index.v1+json\r\n\r\n".into(),
        "HEAD /v2/app/manifests/latest HTTP/1.1\r\nHost: x\r\nX-Starling-Upstream: http://10.0.0.1:5000\r\n\r\n".into(),
        "GET http://origin.example:8080/files/a.bin HTTP/1.1\r\nHost: origin.example:8080\r\nRange: bytes=0-99\r\n\r\n".into(),
        "CONNECT huggingface.co:443 HTTP/1.1\r\nHost: huggingface.co:443\r\n\r\n".into(),
        "CONNECT other.example:8443 HTTP/1.1\r\nHost: other.example:8443\r\n\r\n".into(),
        "GET /org/model/resolve/main/model.safetensors HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nAuthorization: Bearer hf_x\r\n\r\n".into(),
        "GET /api/models/org/model/revision/main HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n".into(),
    ];
    for (i, h) in heads.iter().enumerate() {
        write("proxy_route", &format!("head-{i}"), h.as_bytes());
    }
}
