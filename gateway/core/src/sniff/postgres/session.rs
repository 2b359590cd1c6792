//! One PostgreSQL connection followed both ways, after its startup message:
//! every message framed and length-checked ([`super::message`]'s rule) as it
//! streams; what the client asks (simple queries, the extended protocol's
//! Parse, Bind and Execute, function calls, Syncs) queued in order; the
//! server's answers (CommandComplete, ErrorResponse, ReadyForQuery) matched
//! to them, so each statement ends in a [`Statement`] record with its row
//! count and duration. With `read_only`, a statement [`super::read_only`]
//! refuses never reaches the server: the relay sends a Sync in its place and
//! puts the gateway's ErrorResponse (SQLSTATE 42501) before the server's
//! ReadyForQuery for it, so the client sees an ordinary failed statement,
//! in order, with the server's own transaction status.
//!
//! Pure: bytes and the time (microseconds, any origin) in; bytes to pass
//! and events out. Both directions share one [`Session`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::Violation;

/// The rule a read-only refusal names.
pub const READ_ONLY_RULE: &str = "R5.pg-read-only";
/// Statement text kept in a record (the SHA-256 covers all of it).
pub const TEXT_KEPT: usize = 4096;
/// Statements, portals and answers awaited a connection may hold at once.
pub const MAX_OPEN: usize = 4096;

/// What a session checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Only read statements pass.
    pub read_only: bool,
    /// The largest message either way, in bytes (its length field).
    pub max_message: usize,
}

/// A statement's text as kept: its first [`TEXT_KEPT`] bytes and the
/// SHA-256 of the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    /// At most [`TEXT_KEPT`] bytes (cut at a character boundary).
    pub head: String,
    /// Hex SHA-256 of the whole text as sent.
    pub sha256: String,
    /// Whether `head` is all of it.
    pub whole: bool,
}

impl Text {
    fn of(raw: &[u8]) -> Arc<Text> {
        let digest = ring::digest::digest(&ring::digest::SHA256, raw);
        let sha256 = crate::hex::encode(digest.as_ref());
        let lossy = String::from_utf8_lossy(&raw[..raw.len().min(TEXT_KEPT)]);
        let mut head = lossy.into_owned();
        let whole = raw.len() <= TEXT_KEPT;
        if head.len() > TEXT_KEPT {
            let mut cut = TEXT_KEPT;
            while !head.is_char_boundary(cut) {
                cut -= 1;
            }
            head.truncate(cut);
        }
        Arc::new(Text {
            head,
            sha256,
            whole,
        })
    }
}

/// How a statement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It completed (CommandComplete, or an empty query).
    Ok,
    /// The server answered an ErrorResponse: its SQLSTATE and message.
    Error(String, String),
    /// An Execute the server skipped after an earlier error in its batch.
    Skipped,
    /// An Execute that stopped at its row limit (PortalSuspended).
    Suspended,
}

/// One statement that ran (or failed on the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// `query` (simple), `execute` (extended) or `function` (a FunctionCall).
    pub kind: &'static str,
    /// Its text.
    pub text: Arc<Text>,
    /// Rows, from CommandComplete's tag (or the rows sent when suspended).
    pub rows: u64,
    /// Commands a simple query ran (one per CommandComplete).
    pub commands: u32,
    /// From the client's message to its answer, in microseconds.
    pub micros: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// What a session saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server accepted the login (its first ReadyForQuery).
    LoggedIn,
    /// The server refused the login: its SQLSTATE and message.
    LoginFailed(String, String),
    /// A statement was answered.
    Statement(Statement),
    /// A statement `read_only` refused (answered by the gateway).
    Refused {
        /// Its text.
        text: Arc<Text>,
        /// Why.
        reason: String,
    },
}

/// What the server owes, in the order the client asked.
#[derive(Debug)]
enum Owed {
    /// The login: ends at the first ReadyForQuery.
    Login,
    /// A simple query: ends at ReadyForQuery.
    Query(Open),
    /// A FunctionCall: ends at ReadyForQuery.
    Call(Open),
    /// An Execute of a portal: ends at CommandComplete, EmptyQueryResponse,
    /// PortalSuspended or ErrorResponse (or is skipped). Its text is the
    /// portal's when the server answers.
    Execute(Vec<u8>, Open),
    /// A Sync: ends at ReadyForQuery; `refusal` (the gateway's
    /// ErrorResponse) goes to the client just before it.
    Sync { refusal: Option<Vec<u8>> },
}

#[derive(Debug)]
struct Open {
    text: Arc<Text>,
    started: u64,
    rows: u64,
    data_rows: u64,
    commands: u32,
    error: Option<(String, String)>,
}

impl Open {
    fn new(text: Arc<Text>, now: u64) -> Self {
        Open {
            text,
            started: now,
            rows: 0,
            data_rows: 0,
            commands: 0,
            error: None,
        }
    }

    fn end(self, kind: &'static str, now: u64, outcome: Option<Outcome>) -> Event {
        let outcome = outcome.unwrap_or(match self.error {
            Some((code, message)) => Outcome::Error(code, message),
            None => Outcome::Ok,
        });
        Event::Statement(Statement {
            kind,
            rows: if outcome == Outcome::Suspended {
                self.data_rows
            } else {
                self.rows
            },
            text: self.text,
            commands: self.commands,
            micros: now.saturating_sub(self.started),
            outcome,
        })
    }
}

/// A change to the prepared statements and portals the client asked for:
/// made when the server confirms it (ParseComplete, BindComplete,
/// CloseComplete), in the server's order, so what the audit names is what
/// the server runs; dropped when the server refuses it or skips it after an
/// error. `Sync` marks the end of a batch (every ReadyForQuery ends one).
#[derive(Debug)]
enum Op {
    Parse(Vec<u8>, Arc<Text>),
    Bind(Vec<u8>, Vec<u8>),
    Close(u8, Vec<u8>),
    Sync,
}

/// One direction's framing: a header, then a body either kept whole (a
/// message the session reads) or passed on as it streams.
#[derive(Debug, Default)]
struct Framer {
    /// Stream offset of the next byte (for violations).
    offset: u64,
    head: Vec<u8>,
    kind: u8,
    /// Body bytes still to come.
    left: usize,
    /// The body so far, when kept.
    body: Option<Vec<u8>>,
}

/// A piece of a stream.
enum Piece<'a> {
    /// A whole message the session reads: its type and body.
    Whole(u8, Vec<u8>),
    /// Bytes of a message passed as they come: its header with the first
    /// piece, then body bytes.
    Pass {
        kind: u8,
        header: Option<[u8; 5]>,
        bytes: &'a [u8],
    },
}

impl Framer {
    /// The next piece of `input` (advanced past it), `None` when it is
    /// used up. `keep` says which types are kept whole; `valid` which may
    /// come at all.
    fn next<'a>(
        &mut self,
        input: &mut &'a [u8],
        max: usize,
        keep: impl Fn(u8) -> bool,
        valid: impl Fn(u8) -> bool,
    ) -> Result<Option<Piece<'a>>, Violation> {
        loop {
            if input.is_empty() {
                return Ok(None);
            }
            let mut header = None;
            if self.head.len() < 5 {
                let take = (5 - self.head.len()).min(input.len());
                self.head.extend_from_slice(&input[..take]);
                *input = &input[take..];
                if self.head.len() < 5 {
                    return Ok(None);
                }
                let start = self.offset;
                self.offset += 5;
                let kind = self.head[0];
                if !valid(kind) {
                    return Err(Violation {
                        offset: start,
                        reason: format!("message type {:?} is not allowed here", char::from(kind)),
                    });
                }
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
                        as usize;
                if len < 4 {
                    return Err(Violation {
                        offset: start + 1,
                        reason: "a message length under 4".into(),
                    });
                }
                if len > max {
                    return Err(Violation {
                        offset: start + 1,
                        reason: format!("a {len}-byte message, more than pg_max_message ({max})"),
                    });
                }
                self.kind = kind;
                self.left = len - 4;
                if keep(kind) {
                    self.body = Some(Vec::with_capacity(self.left.min(64 * 1024)));
                } else {
                    self.body = None;
                    let mut h = [0u8; 5];
                    h.copy_from_slice(&self.head);
                    header = Some(h);
                }
            }
            let take = self.left.min(input.len());
            let (now, rest) = input.split_at(take);
            *input = rest;
            self.left -= take;
            self.offset += take as u64;
            let kind = self.kind;
            let done = self.left == 0;
            if done {
                self.head.clear();
            }
            match &mut self.body {
                Some(b) => {
                    b.extend_from_slice(now);
                    if done {
                        let body = self.body.take().unwrap_or_default();
                        return Ok(Some(Piece::Whole(kind, body)));
                    }
                }
                None if header.is_some() || !now.is_empty() => {
                    return Ok(Some(Piece::Pass {
                        kind,
                        header,
                        bytes: now,
                    }));
                }
                None => {}
            }
        }
    }
}

/// Frontend message types after the startup message.
fn frontend(kind: u8) -> bool {
    matches!(
        kind,
        b'B' | b'C'
            | b'd'
            | b'c'
            | b'f'
            | b'D'
            | b'E'
            | b'H'
            | b'F'
            | b'P'
            | b'p'
            | b'Q'
            | b'S'
            | b'X'
    )
}

/// Backend message types.
fn backend(kind: u8) -> bool {
    matches!(
        kind,
        b'R' | b'K'
            | b'2'
            | b'3'
            | b'C'
            | b'd'
            | b'c'
            | b'G'
            | b'H'
            | b'W'
            | b'D'
            | b'I'
            | b'E'
            | b'V'
            | b'v'
            | b'n'
            | b'N'
            | b'A'
            | b't'
            | b'S'
            | b'1'
            | b's'
            | b'Z'
            | b'T'
    )
}

/// A message as sent: type, length, body.
fn frame(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&(u32::try_from(body.len() + 4).unwrap_or(u32::MAX)).to_be_bytes());
    out.extend_from_slice(body);
}

/// An ErrorResponse (`severity` ERROR or FATAL) with `code` and `message`.
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        // A NUL would end the field early: none comes from our own text.
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::new();
    frame(b'E', &body, &mut out);
    out
}

/// The fields of an ErrorResponse's body: SQLSTATE and message.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let [field, tail @ ..] = rest {
        if *field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end.min(512)]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    (code, message)
}

/// A NUL-terminated string at the start of `body`, and what follows.
fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

/// The row count at the end of a CommandComplete tag (`SELECT 5`,
/// `INSERT 0 1`), zero for tags without one.
fn tag_rows(body: &[u8]) -> u64 {
    let tag = cstr(body).map_or(body, |(t, _)| t);
    std::str::from_utf8(tag)
        .ok()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One connection's state, shared by both directions.
#[derive(Debug)]
pub struct Session {
    rules: Rules,
    client: Framer,
    server: Framer,
    owed: VecDeque<Owed>,
    /// Prepared statements and portals as the server confirmed them.
    statements: HashMap<Vec<u8>, Arc<Text>>,
    portals: HashMap<Vec<u8>, Arc<Text>>,
    /// Changes asked for and not yet confirmed, in order.
    ops: VecDeque<Op>,
    /// After a refused Parse: the gateway's ErrorResponse, sent at the next
    /// Sync; messages until then are dropped.
    skipping: Option<Vec<u8>>,
    logged_in: bool,
    events: Vec<Event>,
}

impl Session {
    /// A session whose startup message was sent to the server.
    pub fn new(rules: Rules) -> Self {
        Session {
            rules,
            client: Framer::default(),
            server: Framer::default(),
            owed: VecDeque::from([Owed::Login]),
            statements: HashMap::new(),
            portals: HashMap::new(),
            ops: VecDeque::new(),
            skipping: None,
            logged_in: false,
            events: Vec::new(),
        }
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn owe(&mut self, o: Owed, offset: u64) -> Result<(), Violation> {
        if self.owed.len() >= MAX_OPEN {
            return Err(Violation {
                offset,
                reason: format!("more than {MAX_OPEN} statements awaiting answers"),
            });
        }
        // Whatever the server ends with a ReadyForQuery ends a batch.
        if matches!(o, Owed::Query(_) | Owed::Call(_) | Owed::Sync { .. }) {
            self.op(Op::Sync, offset)?;
        }
        self.owed.push_back(o);
        Ok(())
    }

    fn op(&mut self, o: Op, offset: u64) -> Result<(), Violation> {
        if self.ops.len() >= MAX_OPEN {
            return Err(Violation {
                offset,
                reason: format!("more than {MAX_OPEN} messages awaiting the server's answer"),
            });
        }
        self.ops.push_back(o);
        Ok(())
    }

    /// Client bytes at time `now`: the bytes to send the server.
    ///
    /// # Errors
    /// A protocol violation: the relay is cut.
    pub fn client(&mut self, mut input: &[u8], now: u64) -> Result<Vec<u8>, Violation> {
        let mut out = Vec::with_capacity(input.len());
        let max = self.rules.max_message;
        let logged_in = self.logged_in;
        // Before the login is done, only authentication messages pass.
        let valid = move |k: u8| {
            if logged_in {
                frontend(k)
            } else {
                matches!(k, b'p' | b'X')
            }
        };
        let keep = |k: u8| matches!(k, b'Q' | b'P' | b'B' | b'E' | b'F' | b'S' | b'C');
        while let Some(piece) = self.client.next(&mut input, max, keep, valid)? {
            let at = self.client.offset;
            match piece {
                Piece::Pass {
                    header,
                    bytes,
                    kind: _,
                } => {
                    if self.skipping.is_none() {
                        if let Some(h) = header {
                            out.extend_from_slice(&h);
                        }
                        out.extend_from_slice(bytes);
                    }
                }
                Piece::Whole(kind, body) => self.request(kind, &body, now, at, &mut out)?,
            }
        }
        Ok(out)
    }

    fn bad(offset: u64, reason: &str) -> Violation {
        Violation {
            offset,
            reason: reason.to_owned(),
        }
    }

    /// One whole client message the session reads.
    fn request(
        &mut self,
        kind: u8,
        body: &[u8],
        now: u64,
        at: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        if kind == b'S' {
            let refusal = self.skipping.take();
            self.owe(Owed::Sync { refusal }, at)?;
            frame(kind, body, out);
            return Ok(());
        }
        if self.skipping.is_some() {
            return Ok(());
        }
        match kind {
            b'Q' => {
                let Some((sql, [])) = cstr(body) else {
                    return Err(Self::bad(
                        at,
                        "a Query that is not one NUL-terminated string",
                    ));
                };
                let text = Text::of(sql);
                if let Some(reason) = self.refusal(sql) {
                    return self.refuse_in_place(text, reason, at, out);
                }
                self.owe(Owed::Query(Open::new(text, now)), at)?;
            }
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    return Err(Self::bad(at, "a Parse without a statement name"));
                };
                let Some((sql, _types)) = cstr(rest) else {
                    return Err(Self::bad(at, "a Parse without a query string"));
                };
                let text = Text::of(sql);
                if let Some(reason) = self.refusal(sql) {
                    self.events.push(Event::Refused {
                        text,
                        reason: reason.clone(),
                    });
                    self.skipping = Some(Self::refusal_response(&reason));
                    return Ok(());
                }
                if self.statements.len() >= MAX_OPEN && !self.statements.contains_key(name) {
                    return Err(Self::bad(
                        at,
                        &format!("more than {MAX_OPEN} prepared statements"),
                    ));
                }
                self.op(Op::Parse(name.to_vec(), text), at)?;
            }
            b'B' => {
                let Some((portal, rest)) = cstr(body) else {
                    return Err(Self::bad(at, "a Bind without a portal name"));
                };
                let Some((statement, _)) = cstr(rest) else {
                    return Err(Self::bad(at, "a Bind without a statement name"));
                };
                if self.portals.len() >= MAX_OPEN && !self.portals.contains_key(portal) {
                    return Err(Self::bad(at, &format!("more than {MAX_OPEN} portals")));
                }
                self.op(Op::Bind(portal.to_vec(), statement.to_vec()), at)?;
            }
            b'E' => {
                let Some((portal, _)) = cstr(body) else {
                    return Err(Self::bad(at, "an Execute without a portal name"));
                };
                // Named when the server answers, from the portals it confirmed.
                let open = Open::new(Text::of(b""), now);
                self.owe(Owed::Execute(portal.to_vec(), open), at)?;
            }
            b'F' => {
                let oid = body
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| Self::bad(at, "a FunctionCall without a function"))?;
                let text = Text::of(format!("(function call, oid {oid})").as_bytes());
                if self.rules.read_only {
                    let reason = "a function call by oid cannot be classified".to_owned();
                    return self.refuse_in_place(text, reason, at, out);
                }
                self.owe(Owed::Call(Open::new(text, now)), at)?;
            }
            b'C' => {
                // Close: forget the statement or portal.
                if let [what, rest @ ..] = body
                    && let Some((name, _)) = cstr(rest)
                {
                    match what {
                        b'S' | b'P' => self.op(Op::Close(*what, name.to_vec()), at)?,
                        _ => {
                            return Err(Self::bad(
                                at,
                                "a Close of neither a statement nor a portal",
                            ));
                        }
                    }
                } else {
                    return Err(Self::bad(at, "a Close without a name"));
                }
            }
            _ => {}
        }
        frame(kind, body, out);
        Ok(())
    }

    /// Refuses a message that expects a ReadyForQuery (a Query, a
    /// FunctionCall): a Sync goes to the server in its place, and the
    /// gateway's error to the client just before the server's answer to it.
    fn refuse_in_place(
        &mut self,
        text: Arc<Text>,
        reason: String,
        at: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        let refusal = Some(Self::refusal_response(&reason));
        self.events.push(Event::Refused { text, reason });
        self.owe(Owed::Sync { refusal }, at)?;
        frame(b'S', &[], out);
        Ok(())
    }

    /// Why `read_only` refuses `sql`, if it does.
    fn refusal(&self, sql: &[u8]) -> Option<String> {
        if !self.rules.read_only {
            return None;
        }
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Some("the statement is not UTF-8 and cannot be classified".into());
        };
        super::read_only::check(sql).err().map(|r| r.0)
    }

    fn refusal_response(reason: &str) -> Vec<u8> {
        error_response(
            "ERROR",
            "42501",
            &format!("gateway: refused by {READ_ONLY_RULE}: {reason} (this service is read-only)"),
        )
    }

    /// Server bytes at time `now`: the bytes to send the client.
    ///
    /// # Errors
    /// A protocol violation: the relay is cut.
    pub fn server(&mut self, mut input: &[u8], now: u64) -> Result<Vec<u8>, Violation> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let max = self.rules.max_message;
        let keep = |k: u8| matches!(k, b'Z' | b'C' | b'E' | b'I' | b's' | b'1' | b'2' | b'3');
        while let Some(piece) = self.server.next(&mut input, max, keep, backend)? {
            let at = self.server.offset;
            match piece {
                Piece::Pass {
                    kind,
                    header,
                    bytes,
                } => {
                    if let Some(h) = header {
                        if kind == b'D'
                            && let Some(o) = self.front_open()
                        {
                            o.data_rows += 1;
                        }
                        out.extend_from_slice(&h);
                    }
                    out.extend_from_slice(bytes);
                }
                Piece::Whole(kind, body) => self.answer(kind, &body, now, at, &mut out)?,
            }
        }
        Ok(out)
    }

    /// The statement the server is answering now, if one is open.
    fn front_open(&mut self) -> Option<&mut Open> {
        match self.owed.front_mut()? {
            Owed::Query(o) | Owed::Call(o) | Owed::Execute(_, o) => Some(o),
            Owed::Login | Owed::Sync { .. } => None,
        }
    }

    /// Ends the Execute of `portal`, named by the portal as the server has it.
    fn executed(&mut self, portal: &[u8], mut o: Open, now: u64, outcome: Option<Outcome>) {
        o.text = self.portals.get(portal).cloned().unwrap_or_else(|| {
            Text::of(
                format!("(portal {:?}, not bound)", String::from_utf8_lossy(portal)).as_bytes(),
            )
        });
        let e = o.end("execute", now, outcome);
        self.events.push(e);
    }

    /// The server confirmed the oldest change asked for (`kind`: `1`, `2`
    /// or `3`).
    fn confirmed(&mut self, kind: u8, at: u64) -> Result<(), Violation> {
        match (kind, self.ops.pop_front()) {
            (b'1', Some(Op::Parse(name, text))) => {
                self.statements.insert(name, text);
            }
            (b'2', Some(Op::Bind(portal, statement))) => {
                let text = self.statements.get(&statement).cloned().unwrap_or_else(|| {
                    Text::of(
                        format!(
                            "(prepared statement {:?}, not seen)",
                            String::from_utf8_lossy(&statement)
                        )
                        .as_bytes(),
                    )
                });
                self.portals.insert(portal, text);
            }
            (b'3', Some(Op::Close(what, name))) => {
                if what == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            _ => {
                return Err(Self::bad(
                    at,
                    &format!(
                        "a {} nothing asked for",
                        match kind {
                            b'1' => "ParseComplete",
                            b'2' => "BindComplete",
                            _ => "CloseComplete",
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One whole server message the session reads.
    fn answer(
        &mut self,
        kind: u8,
        body: &[u8],
        now: u64,
        at: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        match kind {
            b'1' | b'2' | b'3' => self.confirmed(kind, at)?,
            b'C' | b'I' => {
                // A tripwire: the parser let one statement through, so the
                // server answering a second means they read it differently.
                if self.rules.read_only
                    && matches!(self.owed.front(), Some(Owed::Query(o)) if o.commands >= 1)
                {
                    return Err(Self::bad(
                        at,
                        "the server ran a second statement of a query the parser read as one",
                    ));
                }
                if let Some(o) = self.front_open() {
                    o.commands += 1;
                    if kind == b'C' {
                        o.rows += tag_rows(body);
                    }
                }
                if matches!(self.owed.front(), Some(Owed::Execute(..)))
                    && let Some(Owed::Execute(p, o)) = self.owed.pop_front()
                {
                    self.executed(&p, o, now, None);
                }
            }
            b's' => {
                if matches!(self.owed.front(), Some(Owed::Execute(..)))
                    && let Some(Owed::Execute(p, o)) = self.owed.pop_front()
                {
                    self.executed(&p, o, now, Some(Outcome::Suspended));
                }
            }
            b'E' => {
                let (code, message) = error_fields(body);
                // The change that failed, and those the server skips after
                // it to the batch's end, never happen.
                while self.ops.front().is_some_and(|o| !matches!(o, Op::Sync)) {
                    self.ops.pop_front();
                }
                match self.owed.front_mut() {
                    Some(Owed::Login) => {
                        self.events.push(Event::LoginFailed(code, message));
                    }
                    Some(Owed::Execute(..)) => {
                        if let Some(Owed::Execute(p, mut o)) = self.owed.pop_front() {
                            o.error = Some((code, message));
                            self.executed(&p, o, now, None);
                        }
                    }
                    Some(Owed::Query(o) | Owed::Call(o)) => {
                        o.error.get_or_insert((code, message));
                    }
                    Some(Owed::Sync { .. }) | None => {}
                }
            }
            b'Z' => {
                // The batch ends: changes of it still unconfirmed never happen.
                while let Some(o) = self.ops.pop_front() {
                    if matches!(o, Op::Sync) {
                        break;
                    }
                }
                // Everything up to the first item a ReadyForQuery ends: the
                // Executes before it were skipped after an error.
                loop {
                    match self.owed.pop_front() {
                        None => return Err(Self::bad(at, "a ReadyForQuery nothing asked for")),
                        Some(Owed::Execute(p, o)) => {
                            self.executed(&p, o, now, Some(Outcome::Skipped));
                        }
                        Some(Owed::Login) => {
                            self.logged_in = true;
                            self.events.push(Event::LoggedIn);
                            break;
                        }
                        Some(Owed::Query(o)) => {
                            self.events.push(o.end("query", now, None));
                            break;
                        }
                        Some(Owed::Call(o)) => {
                            self.events.push(o.end("function", now, None));
                            break;
                        }
                        Some(Owed::Sync { refusal }) => {
                            if let Some(r) = refusal {
                                out.extend_from_slice(&r);
                            }
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
        frame(kind, body, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(kind, body, &mut out);
        out
    }

    fn q(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        msg(b'Q', &b)
    }

    fn z() -> Vec<u8> {
        msg(b'Z', b"I")
    }

    fn c(tag: &str) -> Vec<u8> {
        let mut b = tag.as_bytes().to_vec();
        b.push(0);
        msg(b'C', &b)
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [name, sql] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.extend_from_slice(&[0, 0]);
        msg(b'P', &b)
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [portal, statement] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        msg(b'B', &b)
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut b = portal.as_bytes().to_vec();
        b.extend_from_slice(&[0, 0, 0, 0, 0]);
        msg(b'E', &b)
    }

    fn logged_in(read_only: bool) -> Session {
        let mut s = Session::new(Rules {
            read_only,
            max_message: 1 << 20,
        });
        let auth = [msg(b'R', &[0, 0, 0, 0]), msg(b'S', b"a\0b\0"), z()].concat();
        assert_eq!(s.server(&auth, 0).expect("login"), auth);
        assert_eq!(s.take_events(), vec![Event::LoggedIn]);
        s
    }

    fn statements(events: &[Event]) -> Vec<(&'static str, String, u64, Outcome)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Statement(s) => {
                    Some((s.kind, s.text.head.clone(), s.rows, s.outcome.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_simple_query_passes_and_is_recorded_with_rows_and_time() {
        let mut s = logged_in(false);
        let ask = q("SELECT name FROM people");
        assert_eq!(s.client(&ask, 1_000).expect("query"), ask);
        let rows = [
            msg(b'T', b"\0\x01name\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            msg(b'D', b"\0\x01\0\0\0\x01a"),
            msg(b'D', b"\0\x01\0\0\0\x01b"),
            c("SELECT 2"),
            z(),
        ]
        .concat();
        assert_eq!(s.server(&rows, 3_500).expect("answer"), rows);
        let e = s.take_events();
        let Some(Event::Statement(st)) = e.first() else {
            panic!("{e:?}");
        };
        assert_eq!(
            (
                st.kind,
                st.text.head.as_str(),
                st.rows,
                st.micros,
                st.commands
            ),
            ("query", "SELECT name FROM people", 2, 2_500, 1)
        );
        assert_eq!(st.text.sha256.len(), 64);
        assert!(st.text.whole);
    }

    #[test]
    fn a_write_through_a_read_only_session_is_answered_by_the_gateway() {
        let mut s = logged_in(true);
        let sent = s
            .client(&q("DELETE FROM people"), 0)
            .expect("refused, not cut");
        assert_eq!(
            sent,
            msg(b'S', &[]),
            "the server sees a Sync, not the DELETE"
        );
        let e = s.take_events();
        assert!(
            matches!(&e[..], [Event::Refused { reason, .. }] if reason.contains("DELETE is not a read")),
            "{e:?}"
        );
        let back = s.server(&msg(b'Z', b"I"), 10).expect("ready");
        let (code, message) = error_fields(&back[5..back.len() - 6]);
        assert_eq!(back[0], b'E');
        assert_eq!(code, "42501");
        assert!(message.contains("R5.pg-read-only"), "{message}");
        assert!(back.ends_with(&z()), "then the server's ReadyForQuery");
        // A read after it passes as usual.
        let ask = q("SELECT 1");
        assert_eq!(s.client(&ask, 20).expect("read"), ask);
    }

    #[test]
    fn the_extended_protocol_is_followed_statement_by_statement() {
        let mut s = logged_in(false);
        let ask = [
            parse("", "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
            bind("", ""),
            msg(b'D', b"P\0"),
            execute(""),
            parse("s2", "UPDATE t SET a = 1"),
            bind("p2", "s2"),
            execute("p2"),
            execute("p2"),
            msg(b'S', &[]),
        ]
        .concat();
        assert_eq!(s.client(&ask, 0).expect("batch"), ask);
        let err = error_response("ERROR", "40001", "could not serialize");
        let back = [
            msg(b'1', &[]),
            msg(b'2', &[]),
            msg(b'T', b"\0\0"),
            msg(b'D', b"\0\0"),
            c("SELECT 1"),
            msg(b'1', &[]),
            msg(b'2', &[]),
            err,
            z(),
        ]
        .concat();
        assert_eq!(s.server(&back, 7).expect("answers"), back);
        assert_eq!(
            statements(&s.take_events()),
            vec![
                (
                    "execute",
                    "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                    1,
                    Outcome::Ok
                ),
                (
                    "execute",
                    "UPDATE t SET a = 1".into(),
                    0,
                    Outcome::Error("40001".into(), "could not serialize".into())
                ),
                ("execute", "UPDATE t SET a = 1".into(), 0, Outcome::Skipped),
            ]
        );
    }

    #[test]
    fn a_refused_parse_drops_its_batch_and_answers_at_its_sync() {
        let mut s = logged_in(true);
        let ask = [
            parse("", "INSERT INTO t VALUES ($1)"),
            bind("", ""),
            execute(""),
            msg(b'S', &[]),
        ]
        .concat();
        assert_eq!(s.client(&ask, 0).expect("refused"), msg(b'S', &[]));
        let back = s.server(&z(), 1).expect("ready");
        assert_eq!(back[0], b'E');
        assert!(back.ends_with(&z()));
        let ok = [
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            msg(b'S', &[]),
        ]
        .concat();
        assert_eq!(s.client(&ok, 2).expect("read"), ok);
    }

    /// A Parse the server refuses (the name exists) changes nothing: the
    /// audit names what the server runs, not what the client last sent.
    #[test]
    fn the_audit_names_the_statement_the_server_has() {
        let mut s = logged_in(false);
        let sync = msg(b'S', &[]);
        s.client(&[parse("a", "SELECT first()"), sync.clone()].concat(), 0)
            .expect("first");
        s.server(&[msg(b'1', &[]), z()].concat(), 1)
            .expect("parsed");
        s.client(&[parse("a", "SELECT 'harmless'"), sync.clone()].concat(), 2)
            .expect("second");
        let exists = error_response("ERROR", "42P05", "prepared statement \"a\" already exists");
        s.server(&[exists, z()].concat(), 3)
            .expect("refused by the server");
        s.client(&[bind("", "a"), execute(""), sync].concat(), 4)
            .expect("run");
        s.server(&[msg(b'2', &[]), c("SELECT 1"), z()].concat(), 5)
            .expect("ran");
        let st = statements(&s.take_events());
        assert_eq!(
            st,
            vec![("execute", "SELECT first()".into(), 1, Outcome::Ok)],
            "the first text, which the server ran"
        );
    }

    #[test]
    fn a_read_only_query_answered_twice_cuts() {
        let mut s = logged_in(true);
        s.client(&q("SELECT 1"), 0).expect("a read");
        let twice = [c("SELECT 1"), c("DELETE 3")].concat();
        let v = s.server(&twice, 1).expect_err("the tripwire");
        assert!(v.reason.contains("second statement"), "{v:?}");
    }

    #[test]
    fn violations_cut() {
        let mut s = Session::new(Rules {
            read_only: false,
            max_message: 1000,
        });
        assert!(
            s.client(&q("SELECT 1"), 0)
                .expect_err("before the login")
                .reason
                .contains("not allowed here")
        );
        let mut s = logged_in(false);
        let big = [b'Q', 0, 0x20, 0, 0];
        assert!(
            s.client(&big, 0)
                .expect_err("big")
                .reason
                .contains("pg_max_message")
        );
        let mut s = logged_in(false);
        assert!(s.client(b"GET / HTTP/1.1\r\n", 0).is_err(), "garbage");
        let mut s = logged_in(false);
        assert!(
            s.client(&msg(b'Q', b"SELECT 1\0; DROP TABLE t\0"), 0)
                .is_err()
        );
        let mut s = logged_in(false);
        assert!(
            s.server(&z(), 0)
                .expect_err("unasked")
                .reason
                .contains("ReadyForQuery"),
            "a ReadyForQuery nothing asked for"
        );
        let mut s = logged_in(false);
        let flood: Vec<u8> = (0..=MAX_OPEN).flat_map(|_| q("SELECT 1")).collect();
        assert!(s.client(&flood, 0).is_err(), "answers awaited are capped");
    }

    #[test]
    fn a_long_statement_keeps_its_head_and_the_hash_of_all_of_it() {
        let long = format!("SELECT '{}'", "汉".repeat(3000));
        let t = Text::of(long.as_bytes());
        assert!(!t.whole && t.head.len() <= TEXT_KEPT && t.head.starts_with("SELECT '汉"));
    }

    proptest::proptest! {
        /// However the bytes are cut into reads, the same bytes pass and the
        /// same statements are recorded.
        #[test]
        fn chunking_does_not_change_anything(cuts in proptest::collection::vec(1usize..40, 1..30), read_only: bool) {
            let ask = [
                q("SELECT 1"),
                q("DELETE FROM t"),
                parse("a", "SELECT $1"),
                bind("", "a"),
                execute(""),
                msg(b'S', &[]),
                msg(b'd', &[7; 50]),
            ]
            .concat();
            let back = [c("SELECT 1"), z(), z(), msg(b'1', &[]), msg(b'2', &[]), msg(b'D', &[1; 60]), c("SELECT 1"), z()].concat();
            let whole = {
                let mut s = logged_in(read_only);
                let a = s.client(&ask, 0).expect("client");
                let b = s.server(&back, 0).expect("server");
                (a, b, s.take_events())
            };
            let mut s = logged_in(read_only);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (input, out, client) in [(&ask, &mut a, true), (&back, &mut b, false)] {
                let mut rest = &input[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = cuts[i % cuts.len()].min(rest.len());
                    let got = if client { s.client(&rest[..n], 0) } else { s.server(&rest[..n], 0) };
                    out.extend(got.expect("chunk"));
                    rest = &rest[n..];
                    i += 1;
                }
            }
            proptest::prop_assert_eq!((a, b, s.take_events()), whole);
        }

        #[test]
        fn any_bytes_either_way_do_not_panic(c in proptest::collection::vec(proptest::num::u8::ANY, 0..400), sv in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut s = logged_in(true);
            let _ = s.client(&c, 0);
            let _ = s.server(&sv, 0);
        }
    }
}
