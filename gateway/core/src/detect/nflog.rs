//! The kernel's word on packets the nftables baseline dropped: nfnetlink_log
//! messages (the baseline's `log group` rule), read without trusting them.
//! A SYN or a datagram to a port nothing listens on is the first sign of a
//! scan, and the daemon never sees it otherwise. Pure: bytes in, packets out;
//! the daemon's shell owns the netlink socket.
//!
//! A dropped packet's source address is unproven (no handshake happened), so
//! what is read here alarms and never bans.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The NFLOG group the baseline logs new connections it drops to.
pub const GROUP: u16 = 4317;
/// Bytes of each packet the kernel copies (IP and TCP/UDP headers).
pub const COPY_RANGE: u32 = 64;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// A dropped packet: where from, to which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The source address (unproven).
    pub source: IpAddr,
    /// The source port.
    pub source_port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    /// The destination port.
    pub port: u16,
}

fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
    let len = 4 + data.len();
    let mut out = Vec::with_capacity(len + 3);
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn config_message(seq: u32, attrs: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8, 0u8];
    body.extend_from_slice(&GROUP.to_be_bytes());
    body.extend_from_slice(attrs);
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(
        &u32::try_from(16 + body.len())
            .unwrap_or(u32::MAX)
            .to_ne_bytes(),
    );
    out.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&body);
    out
}

/// The two requests that bind the socket to [`GROUP`] and ask for the first
/// [`COPY_RANGE`] bytes of each packet.
pub fn setup_messages() -> [Vec<u8>; 2] {
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    [
        config_message(1, &attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])),
        config_message(2, &attr(NFULA_CFG_MODE, &mode)),
    ]
}

/// Whether a netlink answer to a setup request is an acknowledgement
/// (`NLMSG_ERROR` with error 0); `Err` with the errno otherwise.
pub fn ack(buf: &[u8]) -> Result<(), i32> {
    let (Some(kind), Some(err)) = (
        buf.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]])),
        buf.get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
    ) else {
        return Err(-1);
    };
    match (kind, err) {
        (2, 0) => Ok(()),
        (2, e) => Err(-e),
        _ => Err(-1),
    }
}

/// The IP packet at the start of `p`: its source and transport ports.
fn packet(p: &[u8]) -> Option<Dropped> {
    let version = p.first()? >> 4;
    let (source, protocol, l4) = match version {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            // A fragment other than the first carries no ports.
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x1fff;
            if frag != 0 {
                return None;
            }
            (IpAddr::V4(Ipv4Addr::from(src)), *p.get(9)?, p.get(ihl..)?)
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(src)), *p.get(6)?, p.get(40..)?)
        }
        _ => return None,
    };
    if protocol != 6 && protocol != 17 {
        return None;
    }
    let source_port = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let port = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    Some(Dropped {
        source,
        source_port,
        protocol,
        port,
    })
}

/// The dropped packets in a buffer of netlink messages (what one `recv`
/// gave); anything malformed is skipped, never trusted.
pub fn parse(buf: &[u8]) -> Vec<Dropped> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        let msg = &rest[16..len];
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
            // After the 4-byte nfgenmsg, attributes.
            let mut attrs = msg.get(4..).unwrap_or_default();
            while attrs.len() >= 4 {
                let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                let akind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if akind == NFULA_PAYLOAD {
                    out.extend(packet(&attrs[4..alen]));
                }
                attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or_default();
            }
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink buffer holding one NFLOG packet message with `payload`.
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut attrs = attr(1, &[0, 0, 0, 0]); // NFULA_PACKET_HDR, ignored
        attrs.extend(attr(NFULA_PAYLOAD, payload));
        let mut body = vec![2u8, 0, 0x10, 0xdd];
        body.extend(attrs);
        let mut out = (u32::try_from(16 + body.len()).unwrap_or(0))
            .to_ne_bytes()
            .to_vec();
        out.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend(body);
        out
    }

    fn syn(src: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&[10, 0, 0, 1]);
        p.extend_from_slice(&40_000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn a_logged_syn_gives_its_source_and_port() {
        let mut buf = message(&syn([192, 0, 2, 7], 22));
        buf.extend(message(&syn([192, 0, 2, 7], 23)));
        let got = parse(&buf);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].source, IpAddr::from([192, 0, 2, 7]));
        assert_eq!(
            (got[0].protocol, got[0].port, got[0].source_port),
            (6, 22, 40_000)
        );
        assert_eq!(got[1].port, 23);
    }

    #[test]
    fn malformed_messages_are_skipped_not_trusted() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[0xff; 64]).is_empty());
        let mut short = message(&syn([192, 0, 2, 7], 22));
        short.truncate(30);
        assert!(parse(&short).is_empty());
        // ICMP, a later fragment, a header too short: nothing.
        let mut icmp = syn([192, 0, 2, 7], 22);
        icmp[9] = 1;
        assert!(parse(&message(&icmp)).is_empty());
        let mut frag = syn([192, 0, 2, 7], 22);
        frag[6] = 0x00;
        frag[7] = 0x10;
        assert!(parse(&message(&frag)).is_empty());
        assert!(parse(&message(&[0x45, 0, 0])).is_empty());
        let mut bad_ihl = syn([192, 0, 2, 7], 22);
        bad_ihl[0] = 0x41;
        assert!(parse(&message(&bad_ihl)).is_empty());
    }

    #[test]
    fn setup_asks_for_the_group_and_the_headers() {
        let [bind, mode] = setup_messages();
        assert_eq!(bind.len(), 16 + 4 + 8);
        assert_eq!(&bind[18..20], &GROUP.to_be_bytes());
        assert_eq!(&mode[24..28], &COPY_RANGE.to_be_bytes());
        assert_eq!(mode[28], NFULNL_COPY_PACKET);
        let mut ok = vec![0u8; 36];
        ok[4] = 2;
        assert_eq!(ack(&ok), Ok(()));
        ok[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(ack(&ok), Err(1));
    }
}
