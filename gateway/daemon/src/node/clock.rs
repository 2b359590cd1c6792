//! The node's clock: Unix milliseconds for records and the civil date in
//! China Standard Time for assessment decisions. The pure core takes time as a
//! parameter; this is where the daemon reads it.

use std::time::{SystemTime, UNIX_EPOCH};

use gateway_core::units::Date;

/// China Standard Time, in which assessment dates are written.
const LOCAL_OFFSET_MS: i64 = 8 * 3_600_000;

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Today's civil date in China Standard Time (UTC+8, no daylight saving).
pub fn today_local() -> Date {
    Date::from_unix_ms(now_ms() + LOCAL_OFFSET_MS)
}
