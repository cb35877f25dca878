//! What the payload codec costs: seals and opens of an order saga's input (about 100 bytes of
//! JSON) and of a 4 KiB payload with `AesGcmCodec`, on one core. Prints one JSON line per size:
//! microseconds per seal and per open, and the sealed size.
//!
//! `cargo run --release -p saga-examples --example codec_bench [-- COUNT]` (default 100,000).

use std::time::Instant;

use saga_core::codec::{AesGcmCodec, Payloads};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 100_000,
    };
    let key = AesGcmCodec::generate_key();
    let payloads = Payloads::new(AesGcmCodec::parse(&format!("k1:{key}"))?);
    let order = json!({"order_no": 1234, "sku": "SKU-3", "quantity": 2, "amount_cents": 1750, "undeliverable": false});
    let large = json!({"note": "x".repeat(4096)});
    for (name, value) in [("order", order), ("4KiB", large)] {
        let plain = serde_json::to_vec(&value)?.len();
        let began = Instant::now();
        let mut sealed = Vec::with_capacity(count as usize);
        for _ in 0..count {
            sealed.push(payloads.seal(value.clone())?);
        }
        let seal_us = began.elapsed().as_secs_f64() * 1e6 / f64::from(count);
        let size = serde_json::to_vec(&sealed[0])?.len();
        let began = Instant::now();
        for s in sealed {
            assert_eq!(payloads.open(s)?, value);
        }
        let open_us = began.elapsed().as_secs_f64() * 1e6 / f64::from(count);
        println!(
            "{{\"payload\":\"{name}\",\"plain_bytes\":{plain},\"sealed_bytes\":{size},\"seal_us\":{seal_us:.2},\"open_us\":{open_us:.2}}}"
        );
    }
    Ok(())
}
