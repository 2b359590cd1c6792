//! The guides do not lie about the command line: every `gatewayd` and
//! `gatewayctl` command in a code block of README.md or docs/*.md names a real
//! subcommand, and every `--flag` it uses is one that subcommand takes.

mod common;

use std::process::Command;

/// `gatewayd ...` and `gatewayctl ...` lines inside ``` blocks (README's `$G`
/// is gatewayd too): (file, binary, command).
fn documented_commands() -> Vec<(String, &'static str, String)> {
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
    let mut out = Vec::new();
    for f in files {
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
