//! `pg_read_only` (rule R5.pg-read-only): a statement passes only when a real
//! SQL parser (sqlparser, PostgreSQL dialect) reads it as one read statement:
//! a query (SELECT, VALUES, TABLE) without a data-modifying WITH, without
//! `SELECT ... INTO`, without row locks (`FOR UPDATE`, `FOR SHARE`...), and
//! calling none of the built-in functions that change state
//! ([`SIDE_EFFECTS`]); `SHOW`; `EXPLAIN` of such a query without ANALYZE.
//! Anything else, and anything the parser cannot read, is refused.
//!
//! What a parser cannot see is a user-defined function with side effects;
//! the relay therefore also starts the server session with
//! `default_transaction_read_only = on`, so the server itself refuses any
//! write such a function tries (see docs/policy.md).

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, Query, SetExpr, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Nesting the parser follows at most (deeper is refused, not overflowed).
const DEPTH: usize = 50;

/// Built-in functions (by name, or a name prefix ending in `_`) that change
/// state or reach outside the database: sequences, settings, locks, other
/// sessions, the server's files and logs, large objects, replication,
/// notifications, queries run from a string, other databases.
pub const SIDE_EFFECTS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_",
    "pg_drop_replication_slot",
    "pg_replication_origin_",
    "pg_replication_slot_advance",
    "pg_copy_",
    "pg_logical_",
    "pg_promote",
    "pg_wal_replay_",
    "pg_backup_",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_stat_reset",
    "pg_notify",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_",
    "pg_file_",
    "pg_import_system_collations",
    "lo_",
    "lowrite",
    "dblink",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
];

/// Why a statement is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// Whether `sql` is one read statement (see the module's text).
///
/// # Errors
/// What makes it something else.
pub fn check(sql: &str) -> Result<(), Refused> {
    // The server ends a `--` comment at a carriage return, the parser only
    // at a line feed: a lone CR could hide a statement from the parser.
    let mut bytes = sql.bytes().peekable();
    while let Some(b) = bytes.next() {
        if b == b'\r' && bytes.peek() != Some(&b'\n') {
            return Err(Refused(
                "a carriage return without a line feed: the server and the parser would read the text differently".into(),
            ));
        }
    }
    let parsed = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(DEPTH)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements());
    let statements = match parsed {
        Ok(s) => s,
        Err(e) => return Err(Refused(format!("the statement cannot be classified ({e})"))),
    };
    let [top] = statements.as_slice() else {
        return if statements.is_empty() {
            Ok(())
        } else {
            Err(Refused(format!(
                "{} statements in one query: send one at a time",
                statements.len()
            )))
        };
    };
    match top {
        Statement::Query(_) | Statement::ShowVariable { .. } => {}
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => {
            let analyzes = *analyze
                || options
                    .iter()
                    .flatten()
                    .any(|o| o.name.value.eq_ignore_ascii_case("analyze"));
            if analyzes {
                return Err(Refused("EXPLAIN ANALYZE runs the statement".into()));
            }
            if !matches!(**statement, Statement::Query(_)) {
                return Err(Refused("EXPLAIN of a statement that is not a query".into()));
            }
        }
        other => return Err(Refused(format!("{} is not a read", verb(other)))),
    }
    let mut v = Reads { top: true };
    match top.visit(&mut v) {
        ControlFlow::Break(r) => Err(r),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The statement's first word or two, for a refusal's message.
fn verb(s: &Statement) -> String {
    let text = s.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    let two = matches!(
        words.first().map(|w| w.to_ascii_uppercase()).as_deref(),
        Some("CREATE" | "DROP" | "ALTER" | "TRUNCATE" | "GRANT" | "REVOKE")
    );
    let n = if two { 2 } else { 1 };
    words
        .iter()
        .take(n)
        .map(|w| w.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(" ")
}

struct Reads {
    top: bool,
}

fn side_effect(name: &sqlparser::ast::ObjectName) -> Option<String> {
    let last = name.0.last()?.as_ident()?.value.to_ascii_lowercase();
    SIDE_EFFECTS
        .iter()
        .any(|f| {
            if f.ends_with('_') {
                last.starts_with(f)
            } else {
                last == *f
            }
        })
        .then_some(last)
}

fn body(b: &SetExpr) -> ControlFlow<Refused> {
    match b {
        SetExpr::Select(s) if s.into.is_some() => {
            ControlFlow::Break(Refused("SELECT ... INTO creates a table".into()))
        }
        SetExpr::SetOperation { left, right, .. } => {
            body(left)?;
            body(right)
        }
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
            ControlFlow::Break(Refused("a data-modifying statement inside a query".into()))
        }
        SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::Values(_) | SetExpr::Table(_) => {
            ControlFlow::Continue(())
        }
    }
}

impl Visitor for Reads {
    type Break = Refused;

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<Refused> {
        if std::mem::take(&mut self.top) {
            return ControlFlow::Continue(());
        }
        match s {
            Statement::Query(_) => ControlFlow::Continue(()),
            other => {
                ControlFlow::Break(Refused(format!("{} inside a read statement", verb(other))))
            }
        }
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<Refused> {
        if !q.locks.is_empty() {
            return ControlFlow::Break(Refused("FOR UPDATE/SHARE locks rows: not a read".into()));
        }
        body(&q.body)
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<Refused> {
        if let Expr::Function(f) = e
            && let Some(name) = side_effect(&f.name)
        {
            return ControlFlow::Break(Refused(format!("{name}() changes state")));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<Refused> {
        let name = match t {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => name,
            _ => return ControlFlow::Continue(()),
        };
        match side_effect(name) {
            Some(n) => ControlFlow::Break(Refused(format!("{n}() changes state"))),
            None => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pass() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
            "select count(*) from people p join households h on h.id = p.household",
            "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
            "SELECT * FROM (SELECT 1) s UNION SELECT 2",
            "VALUES (1), (2)",
            "SHOW server_version",
            "EXPLAIN SELECT * FROM people",
            "EXPLAIN (VERBOSE) SELECT 1",
            "SELECT now(), lower(name) FROM people;",
            "SELECT 1 -- a comment\r\nFROM people",
            "",
            "  ;  ",
            "SELECT 'DELETE FROM people' AS not_a_statement",
            // Block comments nest, in PostgreSQL as in the parser.
            "SELECT 1 /* /* */ ; DELETE FROM people; -- */",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn writes_locks_and_the_unreadable_are_refused() {
        for (sql, why) in [
            ("INSERT INTO people VALUES (1)", "INSERT is not a read"),
            ("update people set name = 'x'", "UPDATE is not a read"),
            ("DELETE FROM people", "DELETE is not a read"),
            ("CREATE TABLE t (x int)", "CREATE TABLE is not a read"),
            ("DROP TABLE people", "DROP TABLE is not a read"),
            ("TRUNCATE people", "TRUNCATE"),
            ("GRANT ALL ON people TO public", "GRANT"),
            ("SET default_transaction_read_only = off", "SET"),
            ("BEGIN", "is not a read"),
            ("COPY people FROM STDIN", "cannot be classified"),
            ("COPY people TO STDOUT", "COPY"),
            ("SELECT * FROM people FOR UPDATE", "FOR UPDATE/SHARE"),
            ("SELECT * FROM people FOR SHARE", "FOR UPDATE/SHARE"),
            (
                "SELECT * FROM (SELECT * FROM people FOR UPDATE) s",
                "FOR UPDATE/SHARE",
            ),
            (
                "WITH d AS (DELETE FROM people RETURNING *) SELECT * FROM d",
                "data-modifying",
            ),
            ("SELECT * INTO copy FROM people", "SELECT ... INTO"),
            ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN ANALYZE"),
            ("EXPLAIN (ANALYZE) SELECT 1", "EXPLAIN ANALYZE"),
            ("EXPLAIN DELETE FROM people", "not a query"),
            ("SELECT nextval('s')", "nextval() changes state"),
            (
                "SELECT pg_catalog.set_config('a', 'b', false)",
                "set_config()",
            ),
            ("SELECT pg_terminate_backend(1)", "pg_terminate_backend()"),
            ("SELECT lo_unlink(1)", "lo_unlink()"),
            ("SELECT * FROM dblink('x', 'y') AS t(a int)", "dblink()"),
            (
                "SELECT 1 WHERE pg_advisory_lock(1) IS NULL",
                "pg_advisory_lock()",
            ),
            ("SELECT 1; DELETE FROM people", "2 statements"),
            ("SELECT 1; SELECT 2", "2 statements"),
            ("SELEKT 1", "cannot be classified"),
            (
                "SELECT (((((((((((((((((((((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))))))))))))))))))))",
                "cannot be classified",
            ),
            ("DO $$ BEGIN DELETE FROM people; END $$", ""),
            ("CALL cleanup()", "CALL"),
            ("PREPARE p AS DELETE FROM people", "is not a read"),
            ("EXECUTE p", "is not a read"),
            ("LISTEN x", "is not a read"),
            // Where a parser and the server could read text differently, the
            // gateway must fail closed: each of these is two statements to
            // PostgreSQL (standard_conforming_strings is on since 9.1).
            ("SELECT 'a\\' ; DELETE FROM people; --'", ""),
            ("SELECT 1 -- x\r; DELETE FROM people", "carriage return"),
            ("SELECT a$x$; DELETE FROM people; --$x$", ""),
            ("SELECT 1 AS a$x$; DELETE FROM people; --$x$", ""),
            (
                "SELECT people.a$x$; DELETE FROM people; --$x$ FROM people",
                "",
            ),
            ("SELECT 1 x$; DELETE FROM people; --$", ""),
            ("SELECT $$a$$; DELETE FROM people", ""),
            ("SELECT E'a\\'' ; DELETE FROM people; --'", ""),
        ] {
            let r = check(sql).expect_err(sql);
            assert!(r.0.contains(why), "{sql}: {r:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_classified_without_panic(s in ".{0,300}") {
            let _ = check(&s);
        }

        #[test]
        fn a_write_behind_a_read_is_refused(w in proptest::sample::select(vec!["INSERT INTO t VALUES (1)", "DELETE FROM t", "UPDATE t SET a = 1", "DROP TABLE t"])) {
            let both = format!("SELECT 1; {w}");
            proptest::prop_assert!(check(&both).is_err());
            proptest::prop_assert!(check(w).is_err());
        }
    }
}
