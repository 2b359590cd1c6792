//! The boundary checks of a channel record, wherever it comes from (HTTP
//! ingest, a spool file, a delivery from another department): the policy's
//! channel rules (R5.channel-content: formats, sizes), then that the record
//! really is its declared format (parsed by `gateway_core::content`), then
//! the channel's denied keywords in what the record says.

use gateway_core::config::{Format, WhenFull as CfgWhenFull};
use gateway_core::content;
use gateway_core::policy::Crossing;
use gateway_store::buffer::WhenFull;

use crate::node::Ctx;

/// A record refused at the boundary.
#[derive(Debug)]
pub struct Refused {
    /// The rule that refused it.
    pub rule: String,
    /// Why, for the producer (with the record's place in a batch).
    pub reason: String,
    /// The boundary policy refused it (else its content did not parse).
    pub by_policy: bool,
}

/// The boundary checks of a channel record: the policy's channel rules, then
/// that each record really is its declared format. A refusal is logged,
/// audited and counted here (as `channel.refuse`).
///
/// # Errors
/// The first record refused, with the rule.
pub fn check_records(
    ctx: &Ctx,
    subject: &str,
    channel: &str,
    format: Format,
    items: &[&[u8]],
    batch: bool,
) -> Result<(), Refused> {
    let policy = ctx.policy();
    let keywords = channel_keywords(&policy, channel);
    for (i, item) in items.iter().enumerate() {
        let at = if batch {
            format!("record {} of the batch: ", i + 1)
        } else {
            String::new()
        };
        let decision = policy.decide(
            &Crossing::ChannelRecord {
                channel,
                format,
                bytes: item.len() as u64,
            },
            ctx.today(),
        );
        let refusal = if decision.is_allowed() {
            match content::check(format, item, !keywords.is_empty()) {
                Err(m) => Some(("R5.channel-content".to_owned(), m.to_string(), false)),
                Ok(pieces) => keywords.find(&pieces).map(|k| {
                    (
                        "R5.channel-content".to_owned(),
                        format!("contains the denied keyword {k:?}"),
                        true,
                    )
                }),
            }
        } else {
            Some((decision.rule.as_str().to_owned(), decision.reason, true))
        };
        if let Some((rule, reason, by_policy)) = refusal {
            let reason = format!("{at}{reason}");
            ctx.refuse("channel.refuse", subject, channel, &rule, &reason);
            ctx.metrics.channel_refused(channel, items.len() as u64);
            return Err(Refused {
                rule,
                reason,
                by_policy,
            });
        }
    }
    Ok(())
}

/// The channel's `deny_keywords`, normalised for matching
/// (`gateway_core::content`).
fn channel_keywords(policy: &gateway_core::policy::Policy, channel: &str) -> content::Keywords {
    policy
        .config()
        .edge()
        .and_then(|e| e.channels.iter().find(|c| c.name == channel))
        .map(|c| content::Keywords::new(&c.deny_keywords))
        .unwrap_or_default()
}

/// The records of a body: itself, or for a batch (NDJSON) each non-empty line.
pub fn split_records(body: &[u8], batch: bool) -> Vec<&[u8]> {
    if batch {
        body.split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect()
    } else {
        vec![body]
    }
}

/// The buffer's behaviour for a channel's `when_full` (`block` waits above it).
pub fn buffer_when_full(w: CfgWhenFull) -> WhenFull {
    match w {
        CfgWhenFull::DropOldest => WhenFull::DropOldest,
        CfgWhenFull::Reject | CfgWhenFull::Block => WhenFull::Reject,
    }
}
