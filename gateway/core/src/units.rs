//! Value types users write in the configuration: dates, sizes, durations,
//! networks (CIDR), `host:port` addresses and names.
//!
//! Each parser returns a [`ValueError`] that says what is wrong and how to fix it;
//! the config compiler adds the location.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// A malformed value: what is wrong and how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValueError {
    /// What is wrong.
    pub message: String,
    /// How to write it.
    pub hint: String,
}

fn bad(message: impl Into<String>, hint: impl Into<String>) -> ValueError {
    ValueError {
        message: message.into(),
        hint: hint.into(),
    }
}

/// A civil (calendar) date, proleptic Gregorian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i32,
    month: u8,
    day: u8,
}

impl Date {
    /// A date, if it exists.
    pub fn new(year: i32, month: u8, day: u8) -> Option<Self> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Self { year, month, day })
    }

    /// The year.
    pub fn year(self) -> i32 {
        self.year
    }

    /// The month, 1 to 12.
    pub fn month(self) -> u8 {
        self.month
    }

    /// The day of the month, from 1.
    pub fn day(self) -> u8 {
        self.day
    }

    /// Days since 1970-01-01 (negative before).
    pub fn days_since_epoch(self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date `days` after 1970-01-01.
    pub fn from_days_since_epoch(days: i64) -> Self {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year: i32::try_from(year).unwrap_or(i32::MAX),
            month,
            day,
        }
    }

    /// The UTC date of a Unix time in milliseconds.
    pub fn from_unix_ms(ms: i64) -> Self {
        Self::from_days_since_epoch(ms.div_euclid(86_400_000))
    }

    /// `self` plus `days` (may be negative).
    #[must_use]
    pub fn add_days(self, days: i64) -> Self {
        Self::from_days_since_epoch(self.days_since_epoch() + days)
    }

    /// Days from `self` to `later` (negative when `later` is earlier).
    pub fn days_until(self, later: Date) -> i64 {
        later.days_since_epoch() - self.days_since_epoch()
    }
}

/// `ms` (Unix milliseconds) as RFC 3339 with milliseconds in China Standard
/// Time: `2026-12-01T17:50:01.123+08:00`.
pub fn rfc3339_cst(ms: i64) -> String {
    let local = ms.saturating_add(8 * 3_600_000);
    let date = Date::from_unix_ms(local);
    let of_day = local.rem_euclid(86_400_000);
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}+08:00",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1_000 % 60,
        of_day % 1_000
    )
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl FromStr for Date {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let hint = "write a date as YYYY-MM-DD, for example 2027-03-31";
        let parts: Vec<&str> = s.split('-').collect();
        let [y, m, d] = parts.as_slice() else {
            return Err(bad(format!("{s:?} is not a date"), hint));
        };
        let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i32>(), m.parse::<u8>(), d.parse::<u8>()) else {
            return Err(bad(format!("{s:?} is not a date"), hint));
        };
        if y.to_string().len() != 4 {
            return Err(bad(format!("{s:?} is not a date"), hint));
        }
        Date::new(y, m, d).ok_or_else(|| bad(format!("{s} does not exist in the calendar"), hint))
    }
}

impl Serialize for Date {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes, written like `4MiB`, `2GiB`, `512KiB`, `10MB` or `100B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let hint = "write a size as a whole number and a unit: B, KiB, MiB, GiB, TiB (1024-based) or KB, MB, GB, TB (1000-based), for example \"4MiB\"";
        let (num, unit) = split_number(s.trim());
        let Ok(n) = num.parse::<u64>() else {
            return Err(bad(format!("{s:?} is not a size"), hint));
        };
        let mult: u64 = match unit {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "" => return Err(bad(format!("size {s:?} has no unit"), hint)),
            other => return Err(bad(format!("unknown size unit {other:?} in {s:?}"), hint)),
        };
        let bytes = n
            .checked_mul(mult)
            .ok_or_else(|| bad(format!("size {s:?} is too large"), hint))?;
        if bytes == 0 {
            return Err(bad(format!("size {s:?} is zero"), "give a size above zero"));
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, mult) in UNITS {
            if self.0 >= mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..end], s[end..].trim_start())
}

/// Parses a duration written like `30d`, `24h`, `15m`, `10s`, `500ms` or `2w`.
///
/// # Errors
/// When the text is not a whole number followed by one of those units, or is zero.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let hint =
        "write a duration as a whole number and a unit: ms, s, m, h, d or w, for example \"30d\"";
    let (num, unit) = split_number(s.trim());
    let Ok(n) = num.parse::<u64>() else {
        return Err(bad(format!("{s:?} is not a duration"), hint));
    };
    let ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        "" => return Err(bad(format!("duration {s:?} has no unit"), hint)),
        other => {
            return Err(bad(
                format!("unknown duration unit {other:?} in {s:?}"),
                hint,
            ));
        }
    };
    let total = n
        .checked_mul(ms)
        .ok_or_else(|| bad(format!("duration {s:?} is too long"), hint))?;
    if total == 0 {
        return Err(bad(
            format!("duration {s:?} is zero"),
            "give a duration above zero",
        ));
    }
    Ok(Duration::from_millis(total))
}

/// Parses a bandwidth like `100Mbit`, `1Gbit`, `512kbit` (bits per second) or
/// `10MB/s`, `1MiB/s` (bytes per second) into bytes per second.
///
/// # Errors
/// When the text is not a whole number and one of those units, or is zero.
pub fn parse_bandwidth(s: &str) -> Result<u64, ValueError> {
    let hint = "write a rate like \"100Mbit\", \"1Gbit\", \"512kbit\" (bits per second) or \"10MB/s\", \"1MiB/s\"";
    let (num, unit) = split_number(s.trim());
    let Ok(n) = num.parse::<u64>() else {
        return Err(bad(format!("{s:?} is not a bandwidth"), hint));
    };
    let bits: Option<u64> = match unit {
        "kbit" | "Kbit" => n.checked_mul(1_000),
        "Mbit" => n.checked_mul(1_000_000),
        "Gbit" => n.checked_mul(1_000_000_000),
        _ => None,
    };
    let bytes = match (bits, unit) {
        (Some(b), _) => Some(b / 8),
        (None, "KB/s" | "kB/s") => n.checked_mul(1_000),
        (None, "MB/s") => n.checked_mul(1_000_000),
        (None, "GB/s") => n.checked_mul(1_000_000_000),
        (None, "KiB/s") => n.checked_mul(1 << 10),
        (None, "MiB/s") => n.checked_mul(1 << 20),
        (None, "GiB/s") => n.checked_mul(1 << 30),
        (None, "") => return Err(bad(format!("bandwidth {s:?} has no unit"), hint)),
        (None, other) => {
            return Err(bad(
                format!("unknown bandwidth unit {other:?} in {s:?}"),
                hint,
            ));
        }
    };
    match bytes {
        Some(0) => Err(bad(
            format!("bandwidth {s:?} is zero"),
            "give a rate above zero, or remove the key for no cap",
        )),
        Some(b) => Ok(b),
        None => Err(bad(format!("bandwidth {s:?} is too large"), hint)),
    }
}

/// Renders a duration in the largest unit that divides it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, mult) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= mult && ms % mult == 0 {
            return format!("{}{unit}", ms / mult);
        }
    }
    format!("{ms}ms")
}

/// An IP network: an address and a prefix length, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_v4(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_v6(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

fn mask_v4(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask_v6(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl FromStr for Cidr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let hint =
            "write a network as ADDRESS/PREFIX, for example \"10.20.0.0/16\" or \"fd00::/8\"";
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(bad(
                format!("{s:?} is not a network: the /PREFIX is missing"),
                hint,
            ));
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("{addr:?} in {s:?} is not an IP address"), hint))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
            bad(
                format!("prefix {prefix:?} in {s:?} is not a number from 0 to {max}"),
                hint,
            )
        })?;
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_v4(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_v6(prefix)).into()),
        };
        if network != addr {
            return Err(bad(
                format!("{s:?} has host bits set"),
                format!("did you mean \"{network}/{prefix}\"?"),
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A `host:port` where host is a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// DNS name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port, never zero.
    pub port: std::num::NonZeroU16,
}

impl FromStr for HostPort {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let hint = "write HOST:PORT, for example \"hub1.example.gov:7443\" or \"[fd00::1]:7443\"";
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            let port = std::num::NonZeroU16::new(sa.port())
                .ok_or_else(|| bad(format!("port 0 in {s:?}"), "give the hub's real port"))?;
            return Ok(HostPort {
                host: sa.ip().to_string(),
                port,
            });
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(bad(format!("{s:?} has no port"), hint));
        };
        let port = port.parse::<std::num::NonZeroU16>().map_err(|_| {
            bad(
                format!("{port:?} in {s:?} is not a port from 1 to 65535"),
                hint,
            )
        })?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad(
                format!("{host:?} in {s:?} is not a valid host name"),
                hint,
            ));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Checks a name of a zone, service, channel or device: 1 to 64 characters,
/// lowercase ASCII letters, digits, `-` and `_`, starting with a letter or digit.
///
/// # Errors
/// When the name breaks those rules.
pub fn check_name(what: &str, s: &str) -> Result<(), ValueError> {
    let hint = "use 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit, for example \"pension-query\"";
    let first_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if s.is_empty() || s.len() > 64 || !first_ok || !rest_ok {
        return Err(bad(format!("{s:?} is not a valid {what} name"), hint));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_days() {
        for days in [-800_000i64, -1, 0, 1, 59, 60, 10_956, 20_000, 2_932_896] {
            let d = Date::from_days_since_epoch(days);
            assert_eq!(d.days_since_epoch(), days, "{d}");
        }
        assert_eq!(Date::from_days_since_epoch(0).to_string(), "1970-01-01");
        assert_eq!(
            "2024-02-29".parse::<Date>().map(|d| d.days_since_epoch()),
            Ok(19_782)
        );
        assert!("2023-02-29".parse::<Date>().is_err());
        assert!("2027-13-01".parse::<Date>().is_err());
        assert!("27-01-01".parse::<Date>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("4MiB".parse(), Ok(ByteSize(4 << 20)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("10MB".parse(), Ok(ByteSize(10_000_000)));
        assert_eq!(ByteSize(2 << 30).to_string(), "2GiB");
        assert!("4 mb".parse::<ByteSize>().is_err());
        assert!("4".parse::<ByteSize>().is_err());
        assert!("0B".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("1MiB/s"), Ok(1 << 20));
        assert!(parse_bandwidth("100").is_err());
        assert!(parse_bandwidth("100Mbps").is_err());
        assert!(parse_bandwidth("0Gbit").is_err());
    }

    #[test]
    fn cidrs() {
        let net: Cidr = "10.20.0.0/16".parse().expect("valid");
        assert!(net.contains("10.20.1.15".parse().expect("ip")));
        assert!(!net.contains("10.21.0.1".parse().expect("ip")));
        assert!(net.contains("::ffff:10.20.0.1".parse().expect("ip")));
        let err = "10.20.0.1/16".parse::<Cidr>().expect_err("host bits");
        assert!(err.hint.contains("10.20.0.0/16"), "{err:?}");
        assert!("10.20.0.0/33".parse::<Cidr>().is_err());
        assert!("10.20.0.0".parse::<Cidr>().is_err());
        assert!("10.300.0.0/16".parse::<Cidr>().is_err());
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.overlaps(&net));
    }

    #[test]
    fn host_ports() {
        let hp: HostPort = "Hub1.example.gov:7443".parse().expect("valid");
        assert_eq!(hp.to_string(), "hub1.example.gov:7443");
        assert_eq!(
            "[fd00::1]:7443".parse::<HostPort>().map(|h| h.to_string()),
            Ok("[fd00::1]:7443".into())
        );
        assert!("hub1.example.gov".parse::<HostPort>().is_err());
        assert!("hub_1:7443".parse::<HostPort>().is_err());
        assert!("hub:0".parse::<HostPort>().is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("zone", "social-security-net").is_ok());
        assert!(check_name("zone", "Social").is_err());
        assert!(check_name("zone", "").is_err());
        assert!(check_name("zone", "-x").is_err());
    }
}
