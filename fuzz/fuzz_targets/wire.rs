//! The peer wire protocol as a peer or scheduler receives it: a request frame and its body
//! (scheduler calls and seed orders, JSON), a response header, and a verification-log answer
//! (`have`) with what a child does with it (the plan it names, each entry's piece), and a
//! `Busy` answer's offer.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use starling::core::PiecePlan;
use starling::scheduler::service::SchedulerService;
use starling::scheduler::SchedulerConfig;
use starling::transport::wire::{self, HaveReply, Request, REQUEST_LEN, RESPONSE_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(frame) = data.first_chunk::<REQUEST_LEN>() {
        if let Ok(req) = Request::decode(frame) {
            let _ = req.limit();
            let body = &data[REQUEST_LEN..];
            let body = &body[..body.len().min(req.body_len() as usize)];
            match req {
                Request::SeedOrder { .. } => {
                    let _ = serde_json::from_slice::<starling::swarm::SeedOrder>(body);
                }
                Request::Announce { .. } | Request::Candidates { .. } => {
                    let service = SchedulerService::new(SchedulerConfig::default());
                    let _ = service.call(req, &Bytes::copy_from_slice(body));
                }
                _ => {}
            }
        }
    }
    if let Some(h) = data.first_chunk::<RESPONSE_HEADER_LEN>() {
        let _ = wire::decode_response_header(h, u64::MAX);
        let _ = wire::decode_response_header(h, 1 << 20);
    }
    if let Ok(offer) = wire::decode_offer(data) {
        assert_eq!(wire::encode_offer(&offer), data);
    }
    if let Ok(have) = HaveReply::decode(data) {
        if let Ok(plan) = PiecePlan::new(have.content_length, have.piece_length) {
            for e in &have.entries {
                let _ = plan.piece(e.index);
            }
        }
        assert_eq!(HaveReply::decode(&have.encode()).ok(), Some(have));
    }
});
