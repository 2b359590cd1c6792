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

use sqlparser::ast::{
    AccessExpr, Expr, Ident, Query, SetExpr, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Nesting the parser follows at most (deeper is refused, not overflowed).
const DEPTH: usize = 50;
/// Operators, names and keywords a statement may have at most. The parser
/// builds a chain of operators (`1+1+1...`, `a AND b AND ...`, `x::int::int`)
/// as a tree as deep as it is long, without counting it against [`DEPTH`],
/// and walking or dropping that tree recurses: a 64 KiB chain would overflow
/// a 2 MiB thread stack and abort the daemon. A chain of this many takes
/// under 128 KiB (tested on 512 KiB); literals, commas and placeholders are
/// not counted, so long `IN (...)` and `VALUES` lists pass.
pub const MAX_WEIGHT: usize = 2000;

/// Whether a token counts against [`MAX_WEIGHT`].
fn weighs(t: &Token) -> bool {
    !matches!(
        t,
        Token::Whitespace(_)
            | Token::Comma
            | Token::SemiColon
            | Token::Number(..)
            | Token::Placeholder(_)
            | Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// Built-in functions (by name, or a name prefix ending in `*`) that change
/// state or reach outside the database: sequences, settings, locks, other
/// sessions, the server's files and logs, large objects, replication,
/// notifications, queries run from a string, other databases.
pub const SIDE_EFFECTS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "setseed",
    "pg_advisory_*",
    "pg_try_advisory_*",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile*",
    "pg_log_backend_memory_contexts",
    "pg_switch_wal",
    "pg_create_*",
    "pg_drop_replication_slot",
    "pg_replication_origin_*",
    "pg_replication_slot_advance",
    "pg_copy_*",
    "pg_logical_*",
    "pg_promote",
    "pg_wal_replay_*",
    "pg_backup_*",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_stat_reset*",
    "pg_stat_file",
    "pg_notify",
    "pg_read_*",
    "pg_ls_*",
    "pg_file_*",
    "pg_logdir_ls",
    "pg_import_system_collations",
    "pg_nextoid",
    "pg_export_snapshot",
    "txid_current*",
    "pg_current_xact_id*",
    "pg_sleep*",
    "gin_clean_pending_list",
    "brin_summarize_*",
    "brin_desummarize_range",
    "lo_*",
    "lowrite",
    "loread",
    "dblink*",
    // Functions that run SQL given as text: the text is not classified.
    "query_to_xml*",
    "cursor_to_xml*",
    "ts_stat",
    "ts_rewrite",
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
    // `U&"..."` names a function by escapes the server decodes and the
    // parser does not: `U&"set\005Fconfig"` is set_config.
    if sql
        .as_bytes()
        .windows(3)
        .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&' && w[2] == b'"')
    {
        return Err(Refused(
            "a U&\"...\" identifier (Unicode escapes) cannot be classified".into(),
        ));
    }
    let mut bytes = sql.bytes().peekable();
    while let Some(b) = bytes.next() {
        if b == b'\r' && bytes.peek() != Some(&b'\n') {
            return Err(Refused(
                "a carriage return without a line feed: the server and the parser would read the text differently".into(),
            ));
        }
    }
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, sql).tokenize_with_location() {
        Ok(t) => t,
        Err(e) => return Err(Refused(format!("the statement cannot be classified ({e})"))),
    };
    let weight = tokens.iter().filter(|t| weighs(&t.token)).count();
    if weight > MAX_WEIGHT {
        return Err(Refused(format!(
            "more than {MAX_WEIGHT} operators, names and keywords: too complex to classify"
        )));
    }
    let parsed = Parser::new(&dialect)
        .with_recursion_limit(DEPTH)
        .with_tokens_with_locations(tokens)
        .parse_statements();
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
                || options.iter().flatten().any(|o| {
                    let n = &o.name.value;
                    n.eq_ignore_ascii_case("analyze") || n.eq_ignore_ascii_case("analyse")
                });
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
    blocked(name.0.last()?.as_ident()?)
}

/// Whether `name` is one of [`SIDE_EFFECTS`], in any case.
fn blocked(name: &Ident) -> Option<String> {
    let last = name.value.to_ascii_lowercase();
    SIDE_EFFECTS
        .iter()
        .any(|f| match f.strip_suffix('*') {
            Some(prefix) => last.starts_with(prefix),
            None => last == *f,
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
        // A call, and the attribute notation PostgreSQL also reads as one:
        // `(x).f` and `t.f` are `f(x)` and `f(t)` when no field is named f.
        let name = match e {
            Expr::Function(f) => side_effect(&f.name),
            Expr::CompoundIdentifier(parts) if parts.len() > 1 => parts.last().and_then(blocked),
            Expr::CompoundFieldAccess { access_chain, .. } => {
                access_chain.iter().find_map(|a| match a {
                    AccessExpr::Dot(Expr::Identifier(i)) => blocked(i),
                    AccessExpr::Dot(Expr::CompoundIdentifier(parts)) => {
                        parts.iter().find_map(blocked)
                    }
                    _ => None,
                })
            }
            _ => None,
        };
        match name {
            Some(name) => ControlFlow::Break(Refused(format!("{name}() changes state"))),
            None => ControlFlow::Continue(()),
        }
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
            ("EXPLAIN (ANALYSE) SELECT 1", "EXPLAIN ANALYZE"),
            ("SELECT U&\"set\\005Fconfig\"('a', 'b', false)", "U&"),
            ("SELECT u&\"\\006Eextval\"('s')", "U&"),
            (
                "SELECT * FROM ts_stat('select to_tsvector(nextval(''s'')::text)')",
                "ts_stat()",
            ),
            (
                "SELECT ts_rewrite('a'::tsquery, 'select 1')",
                "ts_rewrite()",
            ),
            (
                "SELECT query_to_xmlschema('select 1', true, true, '')",
                "query_to_xmlschema()",
            ),
            ("SELECT dblink_exec('x', 'DELETE FROM t')", "dblink_exec()"),
            (
                "SELECT pg_stat_reset_shared('bgwriter')",
                "pg_stat_reset_shared()",
            ),
            (
                "SELECT gin_clean_pending_list('i')",
                "gin_clean_pending_list()",
            ),
            ("EXPLAIN DELETE FROM people", "not a query"),
            ("SELECT ('s'::regclass).nextval", "nextval()"),
            ("SELECT ('select 1'::text).ts_stat", "ts_stat()"),
            ("SELECT (1::int8).pg_advisory_lock", "pg_advisory_lock()"),
            ("SELECT ((1)).Pg_Advisory_Lock", "pg_advisory_lock()"),
            (
                "SELECT t.nextval FROM (SELECT 's'::regclass) AS t",
                "nextval()",
            ),
            ("SELECT pg_rotate_logfile_old()", "pg_rotate_logfile_old()"),
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

    /// The longest chains allowed are classified on a quarter of a worker
    /// thread's stack; longer ones are refused before they are built, at
    /// any length, quickly.
    #[test]
    fn operator_chains_cannot_overflow_the_stack() {
        let n = MAX_WEIGHT - 10;
        let shapes = |n: usize| {
            vec![
                format!("SELECT 1{}", "+1".repeat(n)),
                format!("SELECT 1 WHERE true{}", " AND true".repeat(n / 2)),
                format!("SELECT 1{}", "::int".repeat(n / 2)),
                format!("SELECT 'a'{}", "||'a'".repeat(n)),
                format!("SELECT 1 WHERE NOT{}", " NOT".repeat(n)),
                format!("SELECT {}1{}", "(".repeat(n / 2), ")".repeat(n / 2)),
                format!("SELECT a{}", "[1]".repeat(n / 3)),
            ]
        };
        for sql in shapes(n) {
            let head: String = sql.chars().take(30).collect();
            let done = std::thread::Builder::new()
                // A quarter of a worker's 2 MiB in a release build (the daemon's);
                // a debug build's frames are many times larger.
                .stack_size(if cfg!(debug_assertions) {
                    64 << 20
                } else {
                    512 << 10
                })
                .spawn(move || {
                    let _ = check(&sql);
                })
                .expect("thread")
                .join();
            assert!(done.is_ok(), "{head}...");
        }
        for sql in shapes(400_000) {
            let t = std::time::Instant::now();
            let r = check(&sql).expect_err("too long a chain");
            assert!(
                r.0.contains("too complex") || r.0.contains("cannot be classified"),
                "{r:?}"
            );
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "quickly");
        }
        let list = format!("SELECT 1 WHERE 1 IN (1{})", ",1".repeat(100_000));
        assert_eq!(
            check(&list),
            Ok(()),
            "a long list of literals is not a chain"
        );
    }
}
