//! Any bytes as a config file: `check::load` never panics, and every diagnostic
//! it reports points inside the text.
#![no_main]

use gateway_core::check;
use gateway_core::units::Date;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let today = Date::new(2026, 11, 26).expect("date");
    let checked = check::load(src, today);
    let lines = u32::try_from(src.lines().count().max(1)).unwrap_or(u32::MAX);
    for d in &checked.diagnostics {
        assert!(d.location.line >= 1 && d.location.line <= lines + 1, "{d:?}");
    }
    assert_eq!(checked.config.is_some(), !checked.has_errors());
});
