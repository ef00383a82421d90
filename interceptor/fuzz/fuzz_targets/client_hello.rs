//! ClientHello peeking: the pure parser behind `peek_client_hello`, on any
//! bytes a client may send first.
#![no_main]

use interceptor::proxy::sni::{Parse, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Parse::Done(info) = &whole {
        // A server name that rustls accepted is a DNS name: no spaces, no NUL.
        if let Some(sni) = &info.sni {
            assert!(!sni.is_empty() && sni.bytes().all(|b| b.is_ascii_graphic()), "{sni:?}");
        }
    }
    // Seen before all of it arrived, a ClientHello is never already invalid.
    if matches!(whole, Parse::Done(_)) {
        for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
            if cut > 0 && cut < data.len() {
                assert!(!matches!(parse_client_hello(&data[..cut]), Parse::Invalid), "prefix of {cut} bytes");
            }
        }
    }
});
