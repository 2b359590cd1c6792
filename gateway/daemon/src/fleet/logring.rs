//! Keeps the last log lines in memory (for remote diagnostics) and the last
//! warning or error (for heartbeats). A `tracing` layer beside the usual output.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// How many lines are kept.
pub const KEEP: usize = 200;

#[derive(Default)]
struct Ring {
    lines: VecDeque<String>,
    /// When (Unix ms) and what.
    last_error: Option<(i64, String)>,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, Ring> {
    ring()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The last lines, oldest first.
pub fn recent() -> Vec<String> {
    lock().lines.iter().cloned().collect()
}

/// The last warning or error, starting with when it was logged (RFC 3339,
/// China Standard Time): a status shows how old it is, not only what it was.
pub fn last_error() -> Option<String> {
    lock()
        .last_error
        .as_ref()
        .map(|(ms, line)| format!("{} {line}", gateway_core::units::rfc3339_cst(*ms)))
}

/// The layer to add to the subscriber.
pub struct RingLayer;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::INFO {
            return;
        }
        let mut line = Line(format!("{level} {}:", event.metadata().target()));
        event.record(&mut line);
        let mut r = lock();
        let stamp = crate::node::clock::now_ms();
        if level <= Level::WARN {
            r.last_error = Some((stamp, line.0.clone()));
        }
        if r.lines.len() == KEEP {
            r.lines.pop_front();
        }
        r.lines
            .push_back(format!("{}.{:03} {}", stamp / 1000, stamp % 1000, line.0));
    }
}
