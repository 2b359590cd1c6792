//! `gatewayd channels --state-dir DIR`: the channels of a node as a table (or
//! JSON), read from its state directory while it runs. On an edge: each
//! channel's backlog in the buffer and what left it undelivered; on a hub: each
//! (device, channel) stream in the sink. The same numbers are on `/metrics`.

use std::path::{Path, PathBuf};

use gateway_core::units::{ByteSize, format_duration};
use gateway_store::buffer::{self, BufferReader};
use gateway_store::sqlite::sink::{self, SqliteSink};
use serde_json::json;

use super::OutputFormat;
use crate::os::exit;

/// `gatewayd channels`
#[derive(Debug, clap::Args)]
pub struct ChannelsArgs {
    /// The node's state directory (`node.state_dir` in its config).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
}

/// Prints the channels; returns the exit code.
pub fn run(args: &ChannelsArgs) -> u8 {
    let dir = &args.state_dir;
    let now = crate::node::clock::now_ms();
    let (edge, hub) = (
        dir.join(buffer::FILE_NAME).exists(),
        dir.join(sink::FILE_NAME).exists(),
    );
    if !edge && !hub {
        eprintln!(
            "error: {} holds no channel data ({} or {})",
            dir.display(),
            buffer::FILE_NAME,
            sink::FILE_NAME
        );
        eprintln!(
            "  hint: give the state directory of an edge with [[channel]] sections, or of a hub, that has run"
        );
        return exit::NO_INPUT;
    }
    let result = if edge {
        edge_table(dir, now, args.format)
    } else {
        hub_table(dir, args.format)
    };
    match result {
        Ok(out) => {
            print!("{out}");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILED
        }
    }
}

fn edge_table(dir: &Path, now_ms: i64, format: OutputFormat) -> Result<String, String> {
    let b = BufferReader::open(dir).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for name in b.channels().map_err(|e| e.to_string())? {
        let l = b.backlog(&name).map_err(|e| e.to_string())?;
        let age = l
            .oldest_ms
            .map(|t| std::time::Duration::from_millis(u64::try_from(now_ms - t).unwrap_or(0)));
        rows.push((name, l, age));
    }
    if format == OutputFormat::Json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, l, age)| {
                json!({
                    "channel": name, "backlog_records": l.records, "backlog_bytes": l.bytes,
                    "oldest_age_seconds": age.map(|a| a.as_secs_f64()),
                    "committed": l.next_seq.saturating_sub(1),
                    "dropped": { "quota": l.dropped, "ttl": l.expired, "corrupt": l.corrupt },
                })
            })
            .collect();
        return Ok(format!("{}\n", json!({ "role": "edge", "channels": list })));
    }
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}\n",
        "CHANNEL", "BACKLOG", "BYTES", "OLDEST", "COMMITTED", "QUOTA", "TTL", "CORRUPT"
    );
    for (name, l, age) in &rows {
        out += &format!(
            "{:<24} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}\n",
            name,
            l.records,
            ByteSize(l.bytes).to_string(),
            age.map_or("-".into(), format_duration),
            l.next_seq.saturating_sub(1),
            l.dropped,
            l.expired,
            l.corrupt
        );
    }
    if rows.is_empty() {
        out += "(no channel has taken a record yet)\n";
    }
    out += "QUOTA, TTL, CORRUPT: records removed undelivered (when_full = \"drop_oldest\", ttl, failed CRC).\n";
    Ok(out)
}

fn hub_table(dir: &Path, format: OutputFormat) -> Result<String, String> {
    let s = SqliteSink::open_read_only(&dir.join(sink::FILE_NAME)).map_err(|e| e.to_string())?;
    let streams = s.streams().map_err(|e| e.to_string())?;
    if format == OutputFormat::Json {
        let list: Vec<_> = streams
            .iter()
            .map(|s| {
                json!({
                    "device": s.device, "channel": s.channel, "deliver_to": s.deliver_to,
                    "high": s.high, "consumed": s.consumed, "records": s.records,
                    "bytes": s.bytes, "duplicates": s.duplicates,
                    "expired_unread": s.expired_unread,
                })
            })
            .collect();
        return Ok(format!("{}\n", json!({ "role": "hub", "channels": list })));
    }
    let mut out = format!(
        "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "DEVICE/CHANNEL", "COMMITTED", "CONSUMED", "WAITING", "BYTES", "DUPLICATES", "EXPIRED"
    );
    for s in &streams {
        out += &format!(
            "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            format!("{}/{}", s.device, s.channel),
            s.high,
            s.consumed,
            s.records,
            ByteSize(s.bytes).to_string(),
            s.duplicates,
            s.expired_unread
        );
    }
    if streams.is_empty() {
        out += "(no edge has synced a record yet)\n";
    }
    Ok(out)
}
