//! URL paths as a web server reads them, so that a path rule (a service's
//! `http_allow`) sees what the server will serve, whatever the spelling.

/// A path as a server reads it: percent-decoded, each segment's `;`
/// parameters dropped, empty segments and `.` removed, `..` taking the
/// previous segment away (never above the root).
///
/// # Errors
/// Paths no server should be trusted to read the same way: a bad or double
/// percent escape, a control byte, a backslash, bytes that are not UTF-8.
pub fn normalise_path(raw: &str) -> Result<String, &'static str> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut it = raw.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = |c: Option<u8>| c.and_then(|c| char::from(c).to_digit(16));
            match (hex(it.next()), hex(it.next())) {
                (Some(h), Some(l)) => bytes.push((h * 16 + l) as u8),
                _ => return Err("a bad percent escape"),
            }
        } else {
            bytes.push(b);
        }
    }
    if bytes.contains(&b'%') {
        return Err("a percent sign left after decoding (double encoding)");
    }
    if bytes.contains(&b'\\') {
        return Err("a backslash (some servers read it as /)");
    }
    if bytes.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err("a control byte");
    }
    let text = String::from_utf8(bytes).map_err(|_| "bytes that are not UTF-8")?;
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(text.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || text.ends_with('/') {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_as_a_server_would() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/public//../admin", "/admin"),
            ("/public/..;/admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/..%2fadmin", "/admin"),
            ("/reports;jsessionid=1/q", "/reports/q"),
            ("/%E6%8A%A5%E8%A1%A8", "/报表"),
        ] {
            assert_eq!(normalise_path(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "/a%zz",
            "/a%2",
            "/%252e%252e/admin",
            "/a\\..\\admin",
            "/a%5c..%5cadmin",
            "/a%00b",
            "/%ff",
        ] {
            assert!(normalise_path(bad).is_err(), "{bad}");
        }
    }
}
