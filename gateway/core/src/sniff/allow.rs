//! A service's `http_allow` (rule R5.http-allow): the methods and path
//! prefixes its clients may request, matched on the path as a server would
//! read it (percent-decoded, `;` parameters dropped, repeated slashes and dot
//! segments removed), so that no spelling of a forbidden path passes.

use crate::config::HttpAllow;
use crate::refusals::peer_text;
use crate::urlpath::normalise_path;

/// A request `http_allow` refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    /// Its method.
    pub method: String,
    /// Its path as matched (normalised), or as sent when it cannot be read.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl Forbidden {
    /// The gateway's answer to the client: `403 Forbidden`, and the
    /// connection closes.
    pub fn response(&self) -> Vec<u8> {
        let body = format!(
            "403 Forbidden: {} {} is refused by the boundary gateway (rule R5.http-allow: {})\n",
            self.method, self.path, self.reason
        );
        let mut out = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend(body.into_bytes());
        out
    }
}

/// Whether a request for `method` and request target `target` passes
/// `rules` (no rules: every request does).
///
/// # Errors
/// What was refused and why.
pub fn permits(rules: &[HttpAllow], method: &str, target: &str) -> Result<(), Forbidden> {
    if rules.is_empty() {
        return Ok(());
    }
    let refuse = |path: String, reason: String| Forbidden {
        method: peer_text(method),
        path,
        reason,
    };
    let path = match request_path(target) {
        Some(p) => normalise_path(p).map_err(|why| refuse(peer_text(target), why.to_owned()))?,
        None => {
            return Err(refuse(
                peer_text(target),
                "the request target is not a path".to_owned(),
            ));
        }
    };
    let allowed = rules.iter().any(|r| {
        (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
            && (r.paths.is_empty() || r.paths.iter().any(|p| under(&path, p)))
    });
    if allowed {
        Ok(())
    } else {
        Err(refuse(
            peer_text(&path),
            "not in the service's http_allow".to_owned(),
        ))
    }
}

/// The path of a request target: origin form (`/a?b`) or absolute form
/// (`http://host/a?b`), without its query.
fn request_path(target: &str) -> Option<&str> {
    let rest = if target.starts_with('/') {
        target
    } else {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let after = if lower.starts_with("http://") {
            &target[7..]
        } else if lower.starts_with("https://") {
            &target[8..]
        } else {
            return None;
        };
        match after.find('/') {
            Some(i) if !after[..i].contains(['?', '#']) => &after[i..],
            _ => "/",
        }
    };
    Some(rest.split(['?', '#']).next().unwrap_or("/"))
}

/// Whether `path` is `prefix` or below it, segment by segment: `/api` covers
/// `/api` and `/api/x`, not `/apix`; `/api/` covers `/api/` and below.
fn under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix) || path == prefix.trim_end_matches('/')
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: &[&str], paths: &[&str]) -> HttpAllow {
        HttpAllow {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn only_listed_methods_and_paths_pass() {
        let rules = [
            rule(&["GET", "HEAD"], &["/reports/", "/status"]),
            rule(&["POST"], &["/forms/submit"]),
        ];
        for (m, t) in [
            ("GET", "/reports/2026/q3?x=1"),
            ("HEAD", "/reports"),
            ("GET", "/status"),
            ("GET", "/status/detail"),
            ("POST", "/forms/submit"),
            ("GET", "http://pension.jl.gov.cn/reports/a"),
        ] {
            assert_eq!(permits(&rules, m, t), Ok(()), "{m} {t}");
        }
        for (m, t) in [
            ("DELETE", "/reports/1"),
            ("POST", "/reports/1"),
            ("GET", "/statusx"),
            ("GET", "/admin"),
            ("GET", "/reports/../admin"),
            ("GET", "/reports/%2e%2e/admin"),
            ("GET", "/reports/..;/admin"),
            ("GET", "//reports/../admin"),
            ("GET", "*"),
            ("GET", "http://host"),
            ("get", "/reports/"),
        ] {
            let f = permits(&rules, m, t).expect_err(t);
            assert_eq!(f.method, m);
        }
        assert_eq!(permits(&[], "DELETE", "/anything"), Ok(()));
        let any_path = [rule(&["GET"], &[])];
        assert_eq!(permits(&any_path, "GET", "/x"), Ok(()));
        assert!(permits(&any_path, "PUT", "/x").is_err());
    }

    #[test]
    fn the_answer_is_a_whole_http_response() {
        let f = permits(&[rule(&["GET"], &["/a"])], "GET", "/b").expect_err("refused");
        let r = f.response();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut res = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = res.parse(&r) else {
            panic!("not a response");
        };
        assert_eq!(res.code, Some(403));
        let body = std::str::from_utf8(&r[n..]).expect("text");
        assert!(body.contains("GET /b"), "{body}");
    }
}
