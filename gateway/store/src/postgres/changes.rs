//! The change log: a row per change other hubs must act on (revocation,
//! re-enrollment, renewal, config push, consumer revocation), written in the
//! transaction of the change.
//!
//! Writers take `LOCK TABLE change_log IN EXCLUSIVE MODE` before they insert,
//! so rows commit in the order of their ids and a reader that remembers the
//! last id it handled never skips one. Such changes are operators' acts and
//! enrollments, not the hot path. Each writer also sends `NOTIFY
//! gateway_change` (delivered at commit, carrying no data); [`listen`] keeps
//! a connection listening and wakes the hub, which reads the log from where it
//! was, so a notification lost while disconnected costs only the poll's delay.

use std::sync::Weak;
use std::time::Duration;

use tokio::sync::Notify;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::Pg;
use crate::error::StoreError;
use crate::registry::{Change, ChangeKind};

/// The channel of `LISTEN` / `NOTIFY`.
pub const CHANNEL: &str = "gateway_change";

/// Records a change in the transaction `tx` that makes it.
///
/// # Errors
/// The database's errors.
pub async fn record(
    tx: &impl GenericClient,
    kind: ChangeKind,
    subject: &str,
    now_ms: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute("LOCK TABLE change_log IN EXCLUSIVE MODE")
        .await?;
    tx.execute(
        "INSERT INTO change_log (kind, subject, at_ms) VALUES ($1, $2, $3)",
        &[&kind.as_str(), &subject, &now_ms],
    )
    .await?;
    tx.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
    Ok(())
}

impl Pg {
    /// Up to `limit` changes after `after`, in order.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT id, kind, subject FROM change_log WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c.query(&st, &[&after, &limit]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let kind = ChangeKind::parse(r.get::<_, &str>(1))?;
                Some(Change {
                    id: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                    kind,
                    subject: r.get(2),
                })
            })
            .collect())
    }

    /// The newest change's id, 0 when none.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn change_head(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT COALESCE(MAX(id), 0) FROM change_log", &[])
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}

/// Keeps a connection that listens for changes and wakes `wake` on each
/// notification, and once after every (re)connection (what was missed while
/// away is in the log). Reconnects with a backoff from 1 s to 30 s; ends
/// when every handle on the engine is dropped.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wake: Weak<Notify>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let since = tokio::time::Instant::now();
        let e = listen_once(&config, &tls, &wake).await;
        let Some(w) = wake.upgrade() else {
            return;
        };
        w.notify_one();
        drop(w);
        if since.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tracing::warn!(%e, retry_s = backoff.as_secs(), "PostgreSQL change listener lost; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One listening connection, until it fails or the engine is dropped.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    wake: &Weak<Notify>,
) -> StoreError {
    match listening(config, tls, wake).await {
        Ok(()) => StoreError::Unavailable("the listening connection closed".into()),
        Err(e) => e,
    }
}

async fn listening(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    wake: &Weak<Notify>,
) -> Result<(), StoreError> {
    let (client, mut conn) = config.connect(tls.clone()).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    // The connection's driver wakes the hub itself on each notification: a
    // flood of NOTIFY costs a flag, never a queue.
    let waker = wake.clone();
    let mut driver = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => match waker.upgrade() {
                    Some(w) => w.notify_one(),
                    None => return Ok(()),
                },
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    tracing::debug!("Listening for other hubs' changes (PostgreSQL NOTIFY)");
    // What changed before this connection listened is read from the log.
    match wake.upgrade() {
        Some(w) => w.notify_one(),
        None => {
            driver.abort();
            return Ok(());
        }
    }
    loop {
        tokio::select! {
            ended = &mut driver => {
                return match ended {
                    Ok(Ok(())) if wake.strong_count() == 0 => Ok(()),
                    Ok(Ok(())) => Err(StoreError::Unavailable(
                        "the listening connection closed".into(),
                    )),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(StoreError::Unavailable(format!("listener: {e}"))),
                };
            }
            () = tokio::time::sleep(Duration::from_secs(30)) => {
                if wake.strong_count() == 0 {
                    driver.abort();
                    return Ok(());
                }
                // Every 30 s the server must answer (a dead link shows here,
                // not at the next change); at most 10 s for it.
                let answered = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.simple_query("SELECT 1"),
                )
                .await;
                match answered {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        driver.abort();
                        return Err(e.into());
                    }
                    Err(_) => {
                        driver.abort();
                        return Err(StoreError::Unavailable(
                            "the listening connection did not answer within 10 s".into(),
                        ));
                    }
                }
            }
        }
    }
}
