//! How many streams a tunnel's peer may open at once, grown as it uses them.
//!
//! quinn keeps a slot (two hash-map entries) for every stream the peer may
//! open, from the start: a limit of 8,192 costs about 650 KiB per connection
//! before a byte moves, which a hub with 10,000 edges cannot spend. So each
//! connection starts at [`INITIAL`] and the limit doubles, up to the most a
//! tunnel allows, whenever the streams open pass three quarters of it (the
//! peer is told at once with a MAX_STREAMS frame). It never shrinks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Streams a peer may open at once on a new connection.
pub const INITIAL: u32 = 32;

/// The streams open on one connection, and its limit.
pub struct Budget {
    conn: quinn::Connection,
    limit: u32,
    max: u32,
    open: Arc<AtomicU32>,
}

/// One open stream; dropping it closes it in the count.
pub struct Open(Arc<AtomicU32>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The limit after one more stream opens with `open` open, from `limit`, up
/// to `max`: doubled when past three quarters.
pub fn next_limit(open: u32, limit: u32, max: u32) -> u32 {
    if open.saturating_mul(4) > limit.saturating_mul(3) && limit < max {
        limit.saturating_mul(2).min(max)
    } else {
        limit
    }
}

impl Budget {
    /// The budget of `conn`, whose transport started it at [`INITIAL`]
    /// (the control stream is counted here as open).
    pub fn new(conn: &quinn::Connection, max: u32) -> Self {
        Budget {
            conn: conn.clone(),
            limit: INITIAL.min(max),
            max,
            open: Arc::new(AtomicU32::new(1)),
        }
    }

    /// A stream the peer opened: counted until the returned guard drops;
    /// the limit grows when it must.
    pub fn opened(&mut self) -> Open {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = next_limit(open, self.limit, self.max);
        if limit != self.limit {
            self.limit = limit;
            self.conn
                .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limit));
            tracing::debug!(limit, open, "Stream limit raised");
        }
        Open(self.open.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_doubles_past_three_quarters_up_to_the_most() {
        assert_eq!(next_limit(24, 32, 8192), 32);
        assert_eq!(next_limit(25, 32, 8192), 64);
        assert_eq!(next_limit(96, 128, 8192), 128);
        assert_eq!(next_limit(97, 128, 8192), 256);
        assert_eq!(next_limit(7000, 8192, 8192), 8192);
        assert_eq!(next_limit(6000, 4096, 8192), 8192);
        assert_eq!(next_limit(90, 64, 100), 100, "never above the most");
    }
}
