//! The guides do not lie about the command line: every `gatewayd` and
//! `gatewayctl` command in a code block of README.md or docs/*.md names a real
//! subcommand, and every `--flag` it uses is one that subcommand takes.

mod common;

use std::process::Command;

/// `gatewayd ...` and `gatewayctl ...` lines inside ``` blocks (README's `$G`
/// is gatewayd too): (file, binary, command).
/// README.md and every docs/*.md page.
fn pages() -> Vec<std::path::PathBuf> {
    let root = common::root();
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs"))
        .expect("docs")
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "md") {
            files.push(e.path());
        }
    }
    files
}

fn documented_commands() -> Vec<(String, &'static str, String)> {
    let mut out = Vec::new();
    for f in pages() {
        let text = std::fs::read_to_string(&f).expect("read");
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            let l = line.trim_start();
            let found = l
                .strip_prefix("gatewayd ")
                .or_else(|| l.strip_prefix("$G "))
                .map(|r| (env!("CARGO_BIN_EXE_gatewayd"), r))
                .or_else(|| {
                    l.strip_prefix("gatewayctl ")
                        .map(|r| (env!("CARGO_BIN_EXE_gatewayctl"), r))
                });
            if let (true, Some((bin, rest))) = (in_code, found) {
                // Up to a comment or the next shell command.
                let cmd = rest
                    .split(" #")
                    .next()
                    .unwrap_or("")
                    .split(['|', ';', '&'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                out.push((f.display().to_string(), bin, cmd));
            }
        }
    }
    out
}

#[test]
fn every_documented_command_and_flag_exists() {
    let commands = documented_commands();
    assert!(commands.len() > 10, "found only {commands:?}");
    assert!(
        commands.iter().any(|c| c.1.ends_with("gatewayctl")),
        "no gatewayctl command documented"
    );
    for (file, bin, cmd) in commands {
        let name = if bin.ends_with("gatewayctl") {
            "gatewayctl"
        } else {
            "gatewayd"
        };
        let words: Vec<&str> = cmd.split_whitespace().collect();
        // The subcommand path: the leading words that are not flags or values.
        let path: Vec<&str> = words
            .iter()
            .take_while(|w| {
                !w.starts_with('-') && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .take(2)
            .copied()
            .collect();
        let help = Command::new(bin)
            .args(&path)
            .arg("--help")
            .output()
            .expect("run gatewayd --help");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.status.success(),
            "{file}: `{name} {cmd}`: `{name} {} --help` fails",
            path.join(" ")
        );
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or(flag);
            assert!(
                text.contains(flag),
                "{file}: `{name} {cmd}` uses {flag}, which `{name} {}` does not take:\n{text}",
                path.join(" ")
            );
        }
    }
}

/// deploy.md's exit-code table is the code's: every code, each meaning word
/// for word, nothing more.
#[test]
fn exit_code_table_is_the_code_s() {
    let text = std::fs::read_to_string(common::root().join("docs/deploy.md")).expect("deploy.md");
    let documented: Vec<(u8, String)> = text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix('|')?.split('|').map(str::trim).collect();
            Some((cells.first()?.parse().ok()?, (*cells.get(1)?).to_owned()))
        })
        .collect();
    let code: Vec<(u8, String)> = gateway_daemon::os::exit::TABLE
        .iter()
        .map(|(c, m)| (*c, (*m).to_owned()))
        .collect();
    assert_eq!(
        documented, code,
        "docs/deploy.md's exit-code table differs from gateway/daemon/src/os/exit.rs TABLE"
    );
}

/// No page says that work which is done is still to come: the phrases in
/// docs_refused_phrases.txt (next to this test) appear nowhere.
#[test]
fn no_page_promises_finished_work_for_later() {
    let root = common::root();
    let list = std::fs::read_to_string(root.join("tests/e2e/docs_refused_phrases.txt"))
        .expect("docs_refused_phrases.txt");
    let phrases: Vec<String> = list
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_lowercase)
        .collect();
    let mut found = Vec::new();
    for f in pages() {
        let text = std::fs::read_to_string(&f).expect("read");
        for (n, line) in text.lines().enumerate() {
            let l = line.to_lowercase();
            for p in phrases.iter().filter(|p| l.contains(p.as_str())) {
                found.push(format!("{}:{}: {p:?}", f.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "stale sentences (tests/e2e/docs_refused_phrases.txt):\n{}",
        found.join("\n")
    );
}

/// The rows of the table between `<!-- NAME -->` markers in docs/audit.md:
/// (first cell without `prefix` and backticks, second cell).
fn audit_table(name: &str, prefix: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::root().join("docs/audit.md")).expect("audit.md");
    let table = text
        .split(&format!("<!-- {name} -->"))
        .nth(1)
        .and_then(|t| t.split(&format!("<!-- /{name} -->")).next())
        .unwrap_or_else(|| panic!("docs/audit.md has no {name} table"));
    table
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .strip_prefix(&format!("| `{prefix}"))?
                .splitn(2, "` |")
                .collect();
            let what = cells.get(1)?.trim().strip_suffix('|')?.trim();
            Some(((*cells.first()?).to_owned(), what.to_owned()))
        })
        .collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(e, w)| ((*e).to_owned(), (*w).to_owned()))
        .collect()
}

/// docs/audit.md's table of operator events is the hub's list, in order.
#[test]
fn admin_events_are_the_code_s() {
    assert_eq!(
        audit_table("admin-events", "admin."),
        owned(gateway_core::fleet::ADMIN_EVENTS),
        "docs/audit.md differs from gateway_core::fleet::ADMIN_EVENTS"
    );
}

/// docs/audit.md's table of refusal reasons is the code's list, in order.
#[test]
fn refusal_reasons_are_the_code_s() {
    assert_eq!(
        audit_table("refusal-reasons", ""),
        owned(gateway_core::refusals::REASONS),
        "docs/audit.md differs from gateway_core::refusals::REASONS"
    );
}
