//! Crash loops with real processes: producers write to an edge's channel while
//! the edge (and, in the second test, the hub) is killed with SIGKILL over and
//! over. Afterwards every record that was answered with a sequence number is
//! in the hub's sink exactly once, under that number, in order, with no gap.
//!
//! Kills come after a random number of newly answered records, so each round
//! cuts the daemons at a different point of ingest, commit, sync and ack.
//! Rounds: `GW_CRASH_ROUNDS` (default 20).

mod common;
mod net;
mod process;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gateway_store::postgres::cluster::{self, Cluster};
use net::*;
use nix::sys::signal::Signal;
use process::*;

const PRODUCERS: u64 = 4;

fn rounds() -> usize {
    std::env::var("GW_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// One blocking HTTP/1.0 request; `None` when the daemon is not there or died
/// before answering.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    if let Some(src) = net::source_for(addr) {
        sock.bind(&SocketAddr::new(src, 0).into()).ok()?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(2))
        .ok()?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

/// What producers were told: sequence number -> body; signalled on each answer.
type Accepted = Arc<(Mutex<BTreeMap<u64, String>>, Condvar)>;

/// Edge starts so far; producers whose edge died wait for the next one.
type Starts = Arc<(Mutex<u64>, Condvar)>;

/// Producers posting `{"p":P,"i":I}` records as fast as the edge answers.
struct Producers {
    accepted: Accepted,
    starts: Starts,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Producers {
    fn start(ingest: SocketAddr) -> Producers {
        let accepted: Accepted = Arc::default();
        let starts: Starts = Arc::new((Mutex::new(1), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..PRODUCERS)
            .map(|p| {
                let (accepted, starts, stop) = (accepted.clone(), starts.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let started = *starts.0.lock().expect("lock");
                        let body = format!("{{\"p\":{p},\"i\":{i}}}");
                        match request(
                            ingest,
                            "POST",
                            "/v1/channels/readings/records",
                            body.as_bytes(),
                        ) {
                            Some((200, answer)) => {
                                let v: serde_json::Value =
                                    serde_json::from_str(&answer).expect("answer json");
                                let seq = v["seq"].as_u64().expect("seq");
                                let old = accepted.0.lock().expect("lock").insert(seq, body);
                                accepted.1.notify_all();
                                assert!(old.is_none(), "sequence number {seq} given twice");
                            }
                            Some((status, answer)) => panic!("ingest answered {status}: {answer}"),
                            // The edge is down (killed): wait for its next start.
                            None => {
                                let (n, up) = &*starts;
                                let guard = n.lock().expect("lock");
                                let (_guard, waited) = up
                                    .wait_timeout_while(guard, Duration::from_secs(30), |n| {
                                        *n == started && !stop.load(Ordering::SeqCst)
                                    })
                                    .expect("lock");
                                assert!(!waited.timed_out(), "the edge never came back");
                            }
                        }
                    }
                })
            })
            .collect();
        Producers {
            accepted,
            starts,
            stop,
            threads,
        }
    }

    /// The edge was (re)started: producers waiting for it go on.
    fn edge_started(&self) {
        *self.starts.0.lock().expect("lock") += 1;
        self.starts.1.notify_all();
    }

    /// Waits until `n` more records were answered.
    fn wait_more(&self, n: usize) {
        let (map, answered) = &*self.accepted;
        let guard = map.lock().expect("lock");
        let target = guard.len() + n;
        let (guard, waited) = answered
            .wait_timeout_while(guard, Duration::from_secs(30), |m| m.len() < target)
            .expect("lock");
        assert!(!waited.timed_out(), "producers stalled at {}", guard.len());
    }

    fn finish(self) -> BTreeMap<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.edge_started();
        for t in self.threads {
            t.join().expect("producer");
        }
        Arc::try_unwrap(self.accepted)
            .expect("producers gone")
            .0
            .into_inner()
            .expect("lock")
    }
}

/// A hub (two on PostgreSQL) and an edge with channel `readings`, as config
/// files.
struct Setup {
    _pki: Pki,
    hub_path: PathBuf,
    /// The second hub, on the same database (PostgreSQL only); the reader
    /// reads through it.
    hub2_path: Option<PathBuf>,
    edge_path: PathBuf,
    ingest: SocketAddr,
    reader: Reader,
    _hub_state: tempfile::TempDir,
    _edge_state: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_on(None)
}

/// With `pg`, two hubs keep their state in its database `hubs`; the edge's
/// uplink lists both.
fn setup_on(pg: Option<&Cluster>) -> Setup {
    let pki = Pki::new();
    pki.issue("hub-01");
    pki.issue("hub-02");
    pki.issue("edge-b");
    let (hub_state, edge_state) = (
        tempfile::tempdir().expect("state"),
        tempfile::tempdir().expect("state"),
    );
    let (quic, api) = (free_udp(), free_tcp("127.0.0.1"));
    for d in ["1", "2"] {
        std::fs::create_dir_all(hub_state.path().join(d)).expect("state dir");
    }
    if let Some(c) = pg {
        c.create_database("hubs").expect("database");
    }
    let hub_text = hub_toml(
        &pki,
        &HubSpec {
            postgres: pg.map(|c| (c, "hubs")),
            ..HubSpec::new("hub-01", 2, &[])
        },
        quic,
        &[],
        (free_tcp("127.0.0.1"), api),
        &hub_state.path().join("1"),
    );
    let hub_path = hub_state.path().join("hub.toml");
    let mut quics = vec![quic];
    let (reader, hub2_path) = match pg {
        None => (
            Reader::for_hub(
                &pki,
                &hub_state.path().join("1"),
                None,
                api,
                "reader",
                &["edge-b/readings"],
            ),
            None,
        ),
        Some(c) => {
            let (quic2, api2) = (free_udp(), free_tcp("127.0.0.1"));
            quics.push(quic2);
            let text = hub_toml(
                &pki,
                &HubSpec {
                    postgres: Some((c, "hubs")),
                    ..HubSpec::new("hub-02", 2, &[])
                },
                quic2,
                &[],
                (free_tcp("127.0.0.1"), api2),
                &hub_state.path().join("2"),
            );
            let path = hub_state.path().join("hub2.toml");
            std::fs::write(&path, text).expect("write");
            // The schema comes first: the reader's grant goes into it.
            let mut first = Proc::start(&path);
            first.wait_log("Hub started");
            kill9(first);
            let store = load_hub_store(&path);
            let reader = Reader::for_postgres(&pki, &store, api2, "reader", &["edge-b/readings"]);
            (reader, Some(path))
        }
    };
    std::fs::write(&hub_path, hub_text).expect("write");
    let ingest = free_tcp("127.0.2.1");
    let mut edge_text = edge_toml(
        &pki,
        &EdgeSpec::new("edge-b", 2, 2, quics),
        &[],
        free_tcp("127.0.0.1"),
        edge_state.path(),
    );
    edge_text += &format!(
        "\n[[channel]]\nname = \"readings\"\nzone = \"lab\"\nformats = [\"json\"]\nmax_record_bytes = \"4KiB\"\n\n[[ingest]]\nzone = \"lab\"\nlisten = \"{ingest}\"\n\n[detect]\nnever_ban = [\"127.0.0.0/8\"]\n"
    );
    // The producers open a connection per record as fast as the edge answers,
    // a connection flood by the detectors' measure: alarmed, not banned.
    let edge_path = edge_state.path().join("edge.toml");
    std::fs::write(&edge_path, edge_text).expect("write");
    Setup {
        _pki: pki,
        hub_path,
        hub2_path,
        edge_path,
        ingest,
        reader,
        _hub_state: hub_state,
        _edge_state: edge_state,
    }
}

fn kill9(p: Proc) {
    p.signal(Signal::SIGKILL);
    let (code, _) = p.wait_exit();
    assert_eq!(code, -1, "killed by a signal");
}

/// xorshift: a different kill point each round, the same sequence each run.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The sink's high-water mark for edge-b/readings, if the API answers.
fn sink_high(reader: &Reader) -> Option<u64> {
    let (status, body) = reader.request("GET", "/v1/channels")?;
    // 503: the hub's PostgreSQL is down or restarting.
    if status == 503 {
        return None;
    }
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    Some(v["channels"][0]["high"].as_u64().unwrap_or(0))
}

/// Waits until the sink's high-water mark for edge-b/readings exceeds `high`.
fn wait_sink_above(reader: &Reader, high: u64) -> u64 {
    poll_blocking(
        &format!("a sync above {high}"),
        Duration::from_secs(30),
        || match sink_high(reader) {
            Some(now) if now > high => Ok(now),
            other => Err(format!("{other:?}")),
        },
    )
}

/// Reads the whole sink through the hub API and checks it against what the
/// producers were told.
fn check_sink(reader: &Reader, accepted: &BTreeMap<u64, String>) {
    let last = *accepted.keys().next_back().expect("some records");
    let mut sink: BTreeMap<u64, String> = BTreeMap::new();
    let mut after = 0;
    poll_blocking("the whole sink", Duration::from_secs(60), || {
        let got = reader.request(
            "GET",
            &format!("/v1/channels/edge-b/readings/records?after={after}&limit=1000"),
        );
        let records = match got {
            Some((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                v["records"].as_array().expect("records").clone()
            }
            _ => vec![],
        };
        for r in &records {
            let seq = r["seq"].as_u64().expect("seq");
            assert!(seq > after, "sink out of order: {seq} after {after}");
            sink.insert(seq, r["body"].as_str().expect("body").to_owned());
            after = seq;
        }
        if records.is_empty() && after >= last {
            Ok(())
        } else {
            Err(format!("at {after} of {last}"))
        }
    });
    // No gap: every sequence number from 1 to the last is there once (records
    // answered only by a dying edge may be there too, under their own number).
    let seqs: Vec<u64> = sink.keys().copied().collect();
    assert_eq!(seqs, (1..=after).collect::<Vec<_>>(), "gaps in the sink");
    for (seq, body) in accepted {
        assert_eq!(
            sink.get(seq),
            Some(body),
            "record {seq} differs in the sink"
        );
    }
    println!(
        "{} records answered, {} in the sink, all once and in order",
        accepted.len(),
        sink.len()
    );
}

#[test]
fn records_survive_an_edge_killed_twenty_times() {
    let s = setup();
    let mut hub = Proc::start(&s.hub_path);
    hub.wait_log("Hub started");
    let producers = Producers::start(s.ingest);
    let mut seed = 0x51ed_270b_0a3c_9f11u64;
    for _ in 0..rounds() {
        let mut edge = Proc::start(&s.edge_path);
        edge.wait_log("Ingest listening");
        producers.edge_started();
        producers.wait_more(1 + (next(&mut seed) % 150) as usize);
        kill9(edge);
    }
    let mut edge = Proc::start(&s.edge_path);
    edge.wait_log("Ingest listening");
    producers.edge_started();
    producers.wait_more(10);
    let accepted = producers.finish();
    check_sink(&s.reader, &accepted);
    edge.signal(Signal::SIGTERM);
    hub.signal(Signal::SIGTERM);
    let _ = (edge.wait_exit(), hub.wait_exit());
}

#[test]
fn records_survive_a_hub_killed_twenty_times() {
    let s = setup();
    let mut edge = Proc::start(&s.edge_path);
    edge.wait_log("Ingest listening");
    let producers = Producers::start(s.ingest);
    let mut seed = 0x2f4a_7c15_9e37_79b9u64;
    for round in 0..rounds() {
        let mut hub = Proc::start(&s.hub_path);
        hub.wait_log("Hub started");
        let t0 = Instant::now();
        if round > 0 {
            // The restarted hub answers the old connection with a stateless
            // reset (its key is kept in the state directory): the edge learns
            // at its next packet, not after the idle timeout.
            edge.wait_next_log("Tunnel down reason=reset by peer");
        }
        // Kill it only once the edge synced through this very process.
        let high = wait_sink_above(&s.reader, sink_high(&s.reader).expect("api up"));
        println!(
            "round {round}: synced to {high} {} ms after the hub started",
            t0.elapsed().as_millis()
        );
        producers.wait_more(1 + (next(&mut seed) % 300) as usize);
        kill9(hub);
    }
    let mut hub = Proc::start(&s.hub_path);
    hub.wait_log("Hub started");
    producers.wait_more(10);
    let accepted = producers.finish();
    check_sink(&s.reader, &accepted);
    edge.signal(Signal::SIGTERM);
    hub.signal(Signal::SIGTERM);
    let _ = (edge.wait_exit(), hub.wait_exit());
}

/// The `[hub.postgres]` of a hub's config file.
fn load_hub_store(path: &std::path::Path) -> gateway_core::config::PgStore {
    let c = load(&std::fs::read_to_string(path).expect("config"));
    *c.hub()
        .expect("hub")
        .settings
        .postgres
        .clone()
        .expect("postgres")
}

/// Two hubs on one PostgreSQL: the first killed with SIGKILL over and over
/// (the edge fails over to the second), and every third round PostgreSQL
/// itself stopped at once (`pg_ctl stop -m immediate`) while producers go on
/// and started again. Every record answered is in the sink once, in order,
/// with no gap; neither hub acknowledged what PostgreSQL had not committed.
#[test]
fn records_survive_hubs_and_their_postgres_killed_over_and_over() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    // Durable, as in production: a stopped server keeps what it committed.
    let pg = Cluster::start(true).expect("PostgreSQL");
    let s = setup_on(Some(&pg));
    let mut hub2 = Proc::start(s.hub2_path.as_ref().expect("two hubs"));
    hub2.wait_log("Hub started");
    let mut edge = Proc::start(&s.edge_path);
    edge.wait_log("Ingest listening");
    let producers = Producers::start(s.ingest);
    let mut seed = 0x7c15_2f4a_79b9_9e37u64;
    for round in 0..rounds() {
        let before = poll_blocking("the sink answers", Duration::from_secs(30), || {
            sink_high(&s.reader).ok_or("no answer".to_owned())
        });
        if round % 3 == 2 {
            pg.stop_immediate();
            // The edge keeps taking records into its buffer.
            producers.wait_more(1 + (next(&mut seed) % 300) as usize);
            pg.start_again().expect("PostgreSQL restarts");
            let high = wait_sink_above(&s.reader, before);
            println!("round {round}: PostgreSQL restarted, synced to {high}");
        } else {
            let mut hub = Proc::start(&s.hub_path);
            hub.wait_log("Hub started");
            let high = wait_sink_above(&s.reader, before);
            producers.wait_more(1 + (next(&mut seed) % 300) as usize);
            kill9(hub);
            println!("round {round}: hub-01 killed, synced to {high}");
        }
    }
    producers.wait_more(10);
    let accepted = producers.finish();
    check_sink(&s.reader, &accepted);
    edge.signal(Signal::SIGTERM);
    hub2.signal(Signal::SIGTERM);
    let _ = (edge.wait_exit(), hub2.wait_exit());
}
