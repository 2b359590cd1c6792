//! docs/operate.md lists the config keys only the security administrator may
//! change: the list is the classifier's (`gateway_core::fleet::policy_keys`),
//! no more and no fewer.

#[test]
fn the_operators_guide_lists_exactly_the_policy_keys() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operate.md"),
    )
    .expect("docs/operate.md");
    let table = doc
        .split("<!-- policy-keys -->")
        .nth(1)
        .and_then(|t| t.split("<!-- /policy-keys -->").next())
        .expect("the policy-keys table");
    let listed: Vec<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, gateway_core::fleet::policy_keys());
}
