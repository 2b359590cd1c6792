//! Level-3 video over UDP (issue 17): a UDP publish of an `mpegts` or `rtp`
//! service relays well-formed datagrams both ways and drops the rest,
//! counting them, auditing the first (and one per 10 s), and closing a flow
//! past `max_violations` a minute. Real hub and edge in-process on loopback.

mod net;

use std::net::SocketAddr;
use std::time::Duration;

use net::*;

fn ts(pid: u16, packets: usize) -> Vec<u8> {
    let mut d = Vec::new();
    for i in 0..packets {
        let mut p = vec![0xff; 188];
        p[0] = 0x47;
        p[1] = ((pid >> 8) as u8) & 0x1f;
        p[2] = pid as u8;
        p[3] = 0x10 | (i as u8 & 0x0f);
        d.extend(p);
    }
    d
}

fn rtp(pt: u8, seq: u16) -> Vec<u8> {
    let mut d = vec![0x80, pt];
    d.extend_from_slice(&seq.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 7]);
    d.extend(std::iter::repeat_n(0x5a, 1000));
    d
}

/// A hub publishing edge-b's UDP service `name` (app_protocol `app`, extra
/// service keys `keys`) at level 3; returns the publish address.
async fn level3(
    pki: &Pki,
    name: &'static str,
    app: &'static str,
    keys: &'static str,
) -> (HubNode, EdgeNode, SocketAddr) {
    let (echo, _) = udp_echo("127.0.2.10").await;
    let publish: &'static str = Box::leak(format!("udp:edge-b/{name}").into_boxed_str());
    let publishes: &'static [&'static str] = Box::leak(Box::new([publish]));
    let hub = start_hub(pki, HubSpec::new("hub-01", 3, publishes)).await;
    let edge = start_edge(
        pki,
        EdgeSpec {
            services: vec![(name, echo, "\"extranet\"", Some(app), None)],
            service_keys: keys,
            ..EdgeSpec::new("edge-b", 2, 3, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let at = hub.publish[0];
    (hub, edge, at)
}

/// Sends each datagram and counts the echoes that come back within 300 ms.
async fn echoed(client: &tokio::net::UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> usize {
    let mut n = 0;
    let mut buf = vec![0u8; 4096];
    for d in datagrams {
        client.send_to(d, to).await.expect("send");
        if let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await
        {
            assert_eq!(&buf[..len], &d[..], "echoed whole");
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mpegts_publish_relays_transport_streams_and_refuses_the_rest() {
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, "udp-video", "mpegts", "max_violations = 20\n").await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("client");
    let good: Vec<Vec<u8>> = (0..10).map(|_| ts(256, 7)).collect();
    assert_eq!(
        echoed(&client, at, &good).await,
        10,
        "seven TS packets a datagram, both ways"
    );
    let bad = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ts(256, 7)[..1000].to_vec(),
    ];
    assert_eq!(
        echoed(&client, at, &bad).await,
        0,
        "not transport streams: dropped"
    );
    let state = edge.state.path().to_owned();
    wait_for("the first violation audited", Duration::from_secs(5), || {
        audit_lines(&state).iter().any(|l| {
            l.starts_with("relay.violation 127.0.0.1:")
                && l.contains("[R5.app-protocol]")
                && l.contains("is not mpegts: not a whole number of 188-byte transport stream packets at byte 0")
        })
    })
    .await;
    let records = audit_lines(&state)
        .iter()
        .filter(|l| l.starts_with("relay.violation"))
        .count();
    assert_eq!(records, 1, "one record per flow per 10 s");
    // Past max_violations in a minute, the flow is closed.
    let junk: Vec<Vec<u8>> = (0..25).map(|i| vec![i; 100]).collect();
    echoed(&client, at, &junk).await;
    wait_for("the flow closed", Duration::from_secs(5), || {
        audit_lines(&state)
            .iter()
            .any(|l| l.contains("closed: more than 20 datagrams refused in a minute"))
            && audit_lines(&state)
                .iter()
                .any(|l| l.starts_with("relay.close") && l.contains("end=protocol"))
    })
    .await;
    let metrics = http_get(edge.running.admin_addr, "GET", "/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_udp_protocol_violations_total{service=\"udp-video\"}")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtp_publish_takes_its_payload_types_and_rtcp() {
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, "udp-camera", "rtp", "rtp_payload_types = [96]\n").await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("client");
    let mut ok: Vec<Vec<u8>> = (0..10).map(|i| rtp(96, i)).collect();
    // An RTCP receiver report on the same flow (RFC 5761).
    ok.push(vec![0x80, 201, 0, 1, 0, 0, 0, 7]);
    assert_eq!(echoed(&client, at, &ok).await, 11);
    assert_eq!(
        echoed(&client, at, &[rtp(8, 1), vec![0x40; 20]]).await,
        0,
        "PCMA and version 1 refused"
    );
    wait_for("the violation audited", Duration::from_secs(5), || {
        audit_lines(edge.state.path()).iter().any(|l| {
            l.starts_with("relay.violation")
                && l.contains("payload type not in rtp_payload_types at byte 1")
        })
    })
    .await;
}

fn ffmpeg_missing() -> Option<&'static str> {
    (std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_err()
        || std::process::Command::new("ffprobe")
            .arg("-version")
            .output()
            .is_err())
    .then_some("ffmpeg is not installed (apt-get install -y --no-install-recommends ffmpeg)")
}

/// Frames of the first video stream in `file`, and what decoding it said.
fn frames_and_errors(file: &std::path::Path) -> (u64, String) {
    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe");
    // One line per stream entry (csv prints the stream's, then the program's).
    let frames = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let decode = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg decode");
    (frames, String::from_utf8_lossy(&decode.stderr).into_owned())
}

/// A level-3 publish of edge-b's UDP service `name` (`app`, with `keys`)
/// whose target is `target`; an ffmpeg receiver there reading `input` (its
/// arguments before `-i`, and what follows it); a 5 s, 6 Mbit/s H.264 stream
/// from ffmpeg to the publish as `output` (`{}` the publish address). The
/// frames sent, the frames received, what decoding them said, and the edge.
async fn video_through(
    (name, app, keys): (&'static str, &'static str, &'static str),
    target: SocketAddr,
    input: (&[&str], String),
    output: &str,
) -> (u64, u64, String, EdgeNode) {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("dir");
    let publish: &'static str = Box::leak(format!("udp:edge-b/{name}").into_boxed_str());
    let publishes: &'static [&'static str] = Box::leak(Box::new([publish]));
    let hub = start_hub(&pki, HubSpec::new("hub-01", 3, publishes)).await;
    let edge = start_edge(
        &pki,
        EdgeSpec {
            services: vec![(name, target, "\"extranet\"", Some(app), None)],
            service_keys: keys,
            ..EdgeSpec::new("edge-b", 2, 3, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let out = dir.path().join("received.ts");
    let mut receiver = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(input.0)
        .arg("-i")
        .arg(&input.1)
        .args(["-c", "copy", "-f", "mpegts"])
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("receiver");
    // The receiver holds its socket before the first datagram.
    wait_for("the receiver's socket", Duration::from_secs(10), || {
        std::net::UdpSocket::bind(target).is_err()
    })
    .await;
    let sent = dir.path().join("sent.ts");
    let sender = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=1280x720:rate=30",
        ])
        .args([
            "-t",
            "5",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-b:v",
            "6M",
        ])
        .args([
            "-pix_fmt", "yuv420p", "-g", "30", "-f", "tee", "-map", "0:v",
        ])
        .arg(format!(
            "[f=mpegts]{}|{}",
            sent.display(),
            output.replace("{}", &hub.publish[0].to_string())
        ))
        .output()
        .expect("sender");
    assert!(
        sender.status.success(),
        "{}",
        String::from_utf8_lossy(&sender.stderr)
    );
    let _ = receiver.wait();
    let (sent_frames, _) = frames_and_errors(&sent);
    let (got_frames, errors) = frames_and_errors(&out);
    println!("{app}: frames sent {sent_frames}, received {got_frames}; decode errors: {errors:?}");
    (sent_frames, got_frames, errors, edge)
}

/// A 6 Mbit/s H.264 stream in MPEG-TS from ffmpeg to ffmpeg through a
/// level-3 `mpegts` publish: every frame arrives and decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_video_crosses_an_mpegts_publish_whole() {
    if let Some(why) = ffmpeg_missing() {
        println!("skipped: {why}");
        return;
    }
    let target = std::net::UdpSocket::bind("127.0.2.10:0")
        .and_then(|s| s.local_addr())
        .expect("a port");
    let input = format!("udp://{target}?timeout=4000000&fifo_size=1000000&overrun_nonfatal=1");
    let (sent, got, errors, edge) = video_through(
        ("udp-video", "mpegts", ""),
        target,
        (&[], input),
        "[f=mpegts]udp://{}?pkt_size=1316",
    )
    .await;
    assert_eq!(sent, 150);
    assert_eq!(got, sent, "every frame crossed");
    assert!(errors.trim().is_empty(), "decoded without error: {errors}");
    let metrics = http_get(edge.running.admin_addr, "GET", "/metrics").await.1;
    assert!(
        !metrics.contains("gateway_udp_protocol_violations_total{service=\"udp-video\"}"),
        "no datagram refused"
    );
}

/// The same stream as H.264 over RTP (payload type 96) through a level-3
/// `rtp` publish limited to that payload type: every frame arrives and
/// decodes; the receiver is told the stream by an SDP file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_video_crosses_an_rtp_publish_whole() {
    if let Some(why) = ffmpeg_missing() {
        println!("skipped: {why}");
        return;
    }
    // An even port for RTP (the receiver takes the next one for RTCP).
    let target: SocketAddr = (0..100)
        .find_map(|_| {
            let s = std::net::UdpSocket::bind("127.0.2.10:0").ok()?;
            let port = s.local_addr().ok()?.port();
            (port % 2 == 0 && port < 65_000).then(|| SocketAddr::from(([127, 0, 2, 10], port)))
        })
        .expect("an even port");
    let dir = tempfile::tempdir().expect("dir");
    let sdp = dir.path().join("camera.sdp");
    std::fs::write(
        &sdp,
        format!(
            "v=0\no=- 0 0 IN IP4 127.0.2.10\ns=camera\nc=IN IP4 127.0.2.10\nt=0 0\nm=video {} RTP/AVP 96\nb=AS:6000\na=rtpmap:96 H264/90000\na=fmtp:96 packetization-mode=1\n",
            target.port()
        ),
    )
    .expect("sdp");
    let (sent, got, errors, _edge) = video_through(
        ("udp-camera", "rtp", "rtp_payload_types = [96]\n"),
        target,
        (
            &[
                "-protocol_whitelist",
                "file,udp,rtp",
                "-rw_timeout",
                "4000000",
            ],
            sdp.display().to_string(),
        ),
        "[f=rtp]rtp://{}?pkt_size=1200",
    )
    .await;
    assert_eq!(sent, 150);
    assert_eq!(got, sent, "every frame crossed");
    assert!(errors.trim().is_empty(), "decoded without error: {errors}");
}
