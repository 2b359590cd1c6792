//! Every error of a file at once, and no follow-on errors: an unknown key does
//! not hide the other mistakes of its table, and a refused zone is not
//! reported again by everything that names it.

use gateway_core::config;
use gateway_core::diag::Diagnostic;

fn errors(src: &str) -> Vec<Diagnostic> {
    let (config, diags) = config::compile::compile(src);
    assert!(config.is_none(), "the file has errors");
    diags.into_iter().filter(Diagnostic::is_error).collect()
}

fn messages(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| format!("{}:{}: {}", d.location.line, d.location.column, d.message))
        .collect::<Vec<_>>()
        .join("\n")
}

const NODE: &str =
    "[node]\nid = \"jl-gat-0001\"\nrole = \"edge\"\nstate_dir = \"/var/lib/gatewayd\"\n";

#[test]
fn an_unknown_key_does_not_hide_the_other_errors_of_its_table() {
    let src = format!(
        "{NODE}\n[uplink]\nhubs = [\"hub:7443\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/k\"\nheartbeet = \"5s\"\nheartbeat = \"5 seconds\"\nconfig_tri = \"1m\"\n"
    );
    let e = errors(&src);
    let all = messages(&e);
    assert!(all.contains("heartbeet"), "{all}");
    assert!(all.contains("config_tri"), "{all}");
    assert!(all.contains("uplink.heartbeat"), "{all}");
    assert_eq!(e.len(), 3, "{all}");
    // Each where it is written.
    let line = |needle: &str| {
        e.iter()
            .find(|d| d.message.contains(needle))
            .map(|d| d.location.line)
    };
    assert_eq!(line("heartbeet"), Some(11), "{all}");
    assert_eq!(line("uplink.heartbeat"), Some(12), "{all}");
}

#[test]
fn an_unknown_key_in_an_array_of_tables_is_reported_with_the_rest() {
    let src = format!(
        "{NODE}\n[uplink]\nhubs = [\"hub:7443\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/k\"\n\n[[zone]]\nname = \"legacy-a\"\nkind = \"legacy\"\nclassified = false\nlevel = 7\nnetworks = [\"10.1.0.0/16\"]\nnetwork = \"10.2.0.0/16\"\n"
    );
    let all = messages(&errors(&src));
    assert!(all.contains("network"), "{all}");
    assert!(all.contains("zone.level: 7"), "{all}");
}

#[test]
fn a_refused_zone_is_not_reported_again_by_what_names_it() {
    let src = format!(
        "{NODE}\n[uplink]\nhubs = [\"hub:7443\"]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/k\"\n\n\
         [[zone]]\nname = \"legacy-a\"\nkind = \"legacy\"\nclassified = false\nlevel = 2\nnetworks = [\"10.1.0.1/16\"]\n\n\
         [[zone]]\nname = \"extranet\"\nkind = \"extranet\"\nlevel = 2\nnetworks = [\"59.72.0.0/16\"]\n\n\
         [[service]]\nname = \"pension\"\nzone = \"legacy-a\"\ntarget = \"10.1.2.3:80\"\nallow = [\"extranet\"]\n"
    );
    let e = errors(&src);
    let all = messages(&e);
    assert!(all.contains("host bits"), "{all}");
    assert!(!all.contains("no zone named"), "{all}");
    // A zone never declared is still named.
    let typo = src.replace("zone = \"legacy-a\"", "zone = \"legacy-b\"");
    let all = messages(&errors(&typo));
    assert!(all.contains("no zone named \"legacy-b\""), "{all}");
}
