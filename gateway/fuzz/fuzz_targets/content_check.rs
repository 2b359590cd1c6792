//! A channel record's content check: any bytes, any declared format, a
//! verdict and never a panic; what parses is matched against keywords.
#![no_main]

use gateway_core::config::Format;
use gateway_core::content::{Keywords, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = match selector % 5 {
        0 => Format::Json,
        1 => Format::Xml,
        2 => Format::Csv,
        3 => Format::Text,
        _ => Format::Raw,
    };
    if let Ok(pieces) = parse(format, body) {
        let k = Keywords::new(&["secret".into(), "机密".into()]);
        let _ = k.find(&pieces);
    }
});
