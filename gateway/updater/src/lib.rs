//! The appliance's firmware updater (`gateway-updater`), apart from
//! gatewayd: its own binary and unit, which may write only the inactive
//! root slot, the ESP and its own state directory.
//!
//! - [`install`]: the shell of `gateway_core::firmware::update`: keeps the
//!   state, performs each step, resumes after a cut.
//! - [`journal`]: the failed boot's last warnings, for a rollback report.
//! - [`slot`]: a root slot written chunk by chunk, synced.
//! - [`esp`]: boot entries and kernels on the EFI system partition.
//! - [`bundle`]: a signed bundle on disk, as a chunk source.
//! - [`hub`]: a version on the hub, through gatewayd's admin listener.
//! - [`source`]: where an update's bytes come from (a bundle, the hub).
//! - [`follow`]: one pass over gatewayd's handoff: an offer fetched, an
//!   outcome acknowledged, a staged version rebooted into in its window.
//! - [`gate`]: the health gate of a trial boot (gatewayd's hub tunnel is up).
//! - [`files`]: reading within bounds, never through links; atomic replaces.

pub mod bundle;
pub mod esp;
pub mod files;
pub mod follow;
pub mod gate;
pub mod hub;
pub mod install;
pub mod journal;
pub mod slot;
pub mod source;

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty if unknown.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    gateway_core::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}
