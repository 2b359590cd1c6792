//! The `pg_*` keys of a `[[service]]` (`app_protocol = "postgres"`).

use super::*;

/// The smallest `pg_max_message`: a login's messages must fit.
const MIN_MESSAGE: u64 = 1 << 10;
/// The largest: the server's own limit on a message (1 GiB).
const MAX_MESSAGE: u64 = 1 << 30;

impl Compiler<'_> {
    /// The `pg_*` keys, each an error on a service that does not declare
    /// `app_protocol = "postgres"`.
    pub(super) fn postgres(
        &mut self,
        s: &RawService,
        declared: Option<AppProtocol>,
    ) -> Option<PgRules> {
        let spans: Vec<(&str, Range<usize>)> = [
            ("pg_users", s.pg_users.as_ref().map(Spanned::span)),
            ("pg_databases", s.pg_databases.as_ref().map(Spanned::span)),
            (
                "pg_max_message",
                s.pg_max_message.as_ref().map(Spanned::span),
            ),
            ("pg_read_only", s.pg_read_only.as_ref().map(Spanned::span)),
            ("pg_tls", s.pg_tls.as_ref().map(Spanned::span)),
            ("pg_cert", s.pg_cert.as_ref().map(Spanned::span)),
            ("pg_key", s.pg_key.as_ref().map(Spanned::span)),
        ]
        .into_iter()
        .filter_map(|(k, span)| span.map(|s| (k, s)))
        .collect();
        if declared != Some(AppProtocol::Postgres) {
            for (key, span) in &spans {
                self.error(
                    span,
                    format!("service.{key} applies to app_protocol = \"postgres\" only"),
                    format!("remove {key}, or set app_protocol = \"postgres\""),
                );
            }
            return if spans.is_empty() {
                Some(PgRules::default())
            } else {
                None
            };
        }
        let mut ok = true;
        let mut names = |c: &mut Self, list: &Option<Spanned<Vec<S>>>, key: &str| {
            let mut out = Vec::new();
            for n in list.iter().flat_map(|l| l.get_ref()) {
                let v = n.get_ref();
                // The server's identifiers: up to 63 bytes, no NUL.
                if v.is_empty() || v.len() > 63 || v.contains('\0') {
                    c.error(
                        &n.span(),
                        format!("service.{key}: {v:?} is not a PostgreSQL name"),
                        "write names of 1 to 63 bytes, as the server knows them",
                    );
                    ok = false;
                } else {
                    out.push(v.clone());
                }
            }
            out
        };
        let users = names(self, &s.pg_users, "pg_users");
        let databases = names(self, &s.pg_databases, "pg_databases");
        let max_message = match &s.pg_max_message {
            None => Some(DEFAULT_PG_MAX_MESSAGE),
            Some(m) => match self.parsed::<ByteSize>(m, "service.pg_max_message") {
                Some(ByteSize(n)) if (MIN_MESSAGE..=MAX_MESSAGE).contains(&n) => {
                    usize::try_from(n).ok()
                }
                Some(ByteSize(n)) => {
                    self.error(
                        &m.span(),
                        format!("service.pg_max_message: {n} bytes is not from 1KiB to 1GiB"),
                        "write a size from \"1KiB\" to \"1GiB\" (the default is \"1MiB\")",
                    );
                    None
                }
                None => None,
            },
        };
        let terminate = match &s.pg_tls {
            None => Some(false),
            Some(t) => self.choice(
                t,
                "service.pg_tls",
                &[("decline", false), ("terminate", true)],
            ),
        };
        let tls = match (terminate, &s.pg_cert, &s.pg_key) {
            (Some(true), Some(c), Some(k)) => {
                let cert = self.file(c, "service.pg_cert");
                let key = self.file(k, "service.pg_key");
                match (cert, key) {
                    (Some(cert), Some(key)) => Some(Some(PgTls { cert, key })),
                    _ => None,
                }
            }
            (Some(true), _, _) => {
                let span = s.pg_tls.as_ref().map(Spanned::span).unwrap_or_default();
                self.error(
                    &span,
                    "service.pg_tls = \"terminate\" needs pg_cert and pg_key",
                    "set pg_cert and pg_key to the PEM certificate chain and key clients are shown",
                );
                None
            }
            (Some(false), c, k) => {
                for span in [c, k].into_iter().flatten().map(Spanned::span) {
                    self.error(
                        &span,
                        "service.pg_cert and pg_key apply to pg_tls = \"terminate\" only",
                        "set pg_tls = \"terminate\", or remove pg_cert and pg_key",
                    );
                }
                if c.is_some() || k.is_some() {
                    None
                } else {
                    Some(None)
                }
            }
            (None, _, _) => None,
        };
        let (Some(max_message), Some(tls), true) = (max_message, tls, ok) else {
            return None;
        };
        Some(PgRules {
            users,
            databases,
            max_message,
            read_only: s.pg_read_only.as_ref().is_some_and(|r| *r.get_ref()),
            tls,
        })
    }
}
