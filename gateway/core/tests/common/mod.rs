//! Configs the core's tests share.
#![allow(dead_code)] // not every test file uses every fixture

/// An edge with a level-3 legacy zone, a channel from it and `rest`.
pub fn level3_edge(rest: &str) -> String {
    format!(
        r#"[node]
id = "jl-gat-0001"
role = "edge"
state_dir = "/var/lib/gatewayd"

[uplink]
hubs = ["hub1.example.gov:7443"]
ca = "/etc/gatewayd/ca.pem"
cert = "/var/lib/gatewayd/device.pem"
key = "/var/lib/gatewayd/device.key"

[[zone]]
name = "lab"
kind = "legacy"
classified = false
level = 3
networks = ["10.1.0.0/16"]
assessment = {{ id = "A-1", valid_until = 2099-03-31 }}

[[zone]]
name = "extranet"
kind = "extranet"
level = 3
networks = ["10.2.0.0/16"]

[[channel]]
name = "docs"
zone = "lab"
formats = ["json"]
max_record_bytes = "1MiB"
{rest}"#
    )
}
