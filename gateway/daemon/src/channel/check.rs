//! The boundary checks of a channel record, wherever it comes from (HTTP
//! ingest, a spool file, a delivery from another department): the policy's
//! channel rules (R5.channel-content: formats, sizes), then that the record
//! really is its declared format (parsed by `gateway_core::content`), then
//! the channel's denied keywords in what the record says.

use gateway_core::config::{Format, WhenFull as CfgWhenFull};
use gateway_core::content;
use gateway_core::policy::Crossing;
use gateway_store::buffer::WhenFull;

use gateway_core::detect::Signal;
use tracing::info;

use crate::detect::scan::{Scanner, Verdict};
use crate::node::Ctx;
use crate::node::guard::Report;

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

/// A record refused by the malware scan.
#[derive(Debug)]
pub struct ScanRefused {
    /// What the scanner said.
    pub verdict: Verdict,
    /// Why, for the producer and the audit (with the record's place in a batch).
    pub reason: String,
}

/// Scans `items` of `channel` when the config in force says it is scanned
/// (`Config::scans`): the scanner's version for the accept record when all
/// are clean (`None`: not scanned). The first record not clean is refused:
/// audited (`channel.refuse`, rule `D6.malware` for malicious code), counted,
/// and for malicious code reported to the detectors as from `who` (a serious
/// alarm). Without a running scanner a scanned channel refuses: fail closed.
///
/// # Errors
/// The first record refused.
pub async fn scan_records(
    ctx: &Ctx,
    scanner: Option<&dyn Scanner>,
    (subject, channel): (&str, &str),
    items: &[&[u8]],
    who: &Report<'_>,
) -> Result<Option<String>, ScanRefused> {
    let policy = ctx.policy();
    let config = policy.config();
    let scanned = config
        .edge()
        .and_then(|e| e.channels.iter().find(|c| c.name == channel))
        .is_some_and(|c| config.scans(c));
    if !scanned {
        return Ok(None);
    }
    let refuse = |verdict: Verdict, reason: String| {
        let (why, rule) = match &verdict {
            Verdict::Found(_) => ("malware", "D6.malware"),
            Verdict::Refused(_) => ("scan-refused", "scan-refused"),
            _ => ("scan-unavailable", "scan-unavailable"),
        };
        info!(%subject, %channel, %reason, "Refused by the malware scan");
        ctx.audit.record(
            subject,
            channel,
            "channel.refuse",
            "deny",
            rule,
            reason.clone(),
        );
        ctx.metrics.refused(channel, why);
        Err(ScanRefused { verdict, reason })
    };
    let Some(scanner) = scanner else {
        ctx.metrics.scanned("unavailable");
        return refuse(
            Verdict::Unavailable("no scanner is running".into()),
            "this channel's records are scanned ([scan]) but no scanner is running: restart gatewayd to start it".into(),
        );
    };
    for (i, item) in items.iter().enumerate() {
        let at = if items.len() > 1 {
            format!("record {} of the batch: ", i + 1)
        } else {
            String::new()
        };
        let verdict = scanner.scan(item).await;
        let version = scanner.version();
        match verdict {
            Verdict::Clean => ctx.metrics.scanned("clean"),
            Verdict::Found(signature) => {
                ctx.metrics.scanned("found");
                ctx.report(
                    who,
                    Signal::Malware {
                        signature: signature.clone(),
                    },
                );
                let reason = format!("{at}malicious code found: {signature} ({version})");
                return refuse(Verdict::Found(signature), reason);
            }
            Verdict::Refused(why) => {
                ctx.metrics.scanned("refused");
                return refuse(
                    Verdict::Refused(why.clone()),
                    format!("{at}{why} ({version})"),
                );
            }
            Verdict::Unavailable(why) => {
                ctx.metrics.scanned("unavailable");
                if scanner.down_alarm_due() {
                    let now = crate::node::clock::now_ms();
                    ctx.guard.raise(
                        |node, id| {
                            gateway_core::detect::Alarm::scanner_down(node, id, &version, &why, now)
                        },
                        &ctx.metrics,
                    );
                }
                return refuse(
                    Verdict::Unavailable(why.clone()),
                    format!("{at}not scanned: {why}"),
                );
            }
        }
    }
    Ok(Some(scanner.version()))
}
