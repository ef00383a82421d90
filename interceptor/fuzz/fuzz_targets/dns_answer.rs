//! DNS answers: what the forwarder learns from any message an upstream
//! resolver may send.
#![no_main]

use std::net::IpAddr;

use hickory_proto::{
    op::Message,
    rr::RData,
    serialize::binary::{BinDecodable, BinEncodable},
};
use interceptor::dns::{DnsObserver, Learned, extract};
use libfuzzer_sys::fuzz_target;

/// Every name under `openai.com` or with a label `ai` is an AI domain.
struct Observer;

#[async_trait::async_trait]
impl DnsObserver for Observer {
    fn is_ai_domain(&self, name: &str) -> bool {
        assert_eq!(name, name.to_ascii_lowercase(), "names are lowercase");
        name == "openai.com" || name.ends_with(".openai.com") || name.split('.').any(|l| l == "ai")
    }

    async fn learned(&self, _learned: Vec<Learned>) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_bytes(data) else { return };
    let learned = extract(&message, &Observer);
    let answered: Vec<IpAddr> = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    for (i, l) in learned.iter().enumerate() {
        assert!(answered.contains(&l.addr), "{} is not in the answer", l.addr);
        assert!(learned[..i].iter().all(|o| o.addr != l.addr), "{} reported twice", l.addr);
        assert!(Observer.is_ai_domain(&l.name), "{} is not an AI domain", l.name);
    }
    // What is learned does not depend on the wire encoding of the names
    // (compression pointers): a re-encoded message teaches the same.
    if let Ok(bytes) = message.to_bytes()
        && let Ok(again) = Message::from_bytes(&bytes)
    {
        let relearned = extract(&again, &Observer);
        assert_eq!(relearned.len(), learned.len());
    }
});
