//! The query behind a page of the device table, shared by both engines:
//! the registry's part of a selector ([`Stored`]) becomes conditions on the
//! stored columns, so a query for 3 revoked devices of 10,000 reads 3 rows,
//! not 10,000. The values are always bound parameters, never spliced.

use gateway_core::selector::Stored;

/// A bound value of the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    /// Text (an id, a label key or value).
    Text(String),
    /// A number (a time, the page's size).
    Int(i64),
}

/// The columns every page reads, in the order both engines map them.
const COLUMNS: &str = "ids.id, d.enrolled_ms, d.not_after_ms, d.revoked_ms, s.last_ms, s.json,
       (SELECT MAX(version) FROM config c WHERE c.device = ids.id),
       cs.applied, cs.result, cs.result_ms, h.head_seq, h.broken";

/// Every device id after `$1` that any table knows.
const ALL_IDS: &str = "SELECT id FROM device WHERE id > $1
    UNION SELECT device FROM status WHERE device > $1
    UNION SELECT device FROM config WHERE device > $1
    UNION SELECT device FROM config_state WHERE device > $1";

/// The SQL and its parameters for a page of at most `limit` devices after
/// `after` that pass `filter`, with `$N` placeholders (`mark` rewrites them
/// for the engine) and `audit_join` the engine's join of the audit head.
/// `None` when `filter` admits no device.
pub(crate) fn page(
    after: &str,
    limit: usize,
    filter: &Stored,
    audit_join: &str,
) -> Option<(String, Vec<Param>)> {
    if filter.nothing {
        return None;
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut params = vec![Param::Text(after.to_owned()), Param::Int(limit)];
    let joins = format!(
        "LEFT JOIN device d ON d.id = ids.id
LEFT JOIN status s ON s.device = ids.id
LEFT JOIN config_state cs ON cs.device = ids.id
{audit_join}"
    );
    if filter.is_empty() {
        return Some((
            format!(
                "WITH ids(id) AS ({ALL_IDS} ORDER BY 1 LIMIT $2)
SELECT {COLUMNS}
FROM ids
{joins}
ORDER BY ids.id"
            ),
            params,
        ));
    }
    let mut conds: Vec<String> = Vec::new();
    let bind = |p: Param, params: &mut Vec<Param>| {
        params.push(p);
        format!("${}", params.len())
    };
    // A revoked device is one the device table holds; a drifting one has a
    // pushed config.
    let ids = if filter.revoked == Some(true) {
        "SELECT id FROM device WHERE id > $1 AND revoked_ms IS NOT NULL"
    } else if filter.drift == Some(true) {
        "SELECT DISTINCT device FROM config WHERE device > $1"
    } else {
        ALL_IDS
    };
    if filter.revoked == Some(false) {
        conds.push("d.revoked_ms IS NULL".into());
    }
    if filter.no_heartbeat {
        conds.push("s.last_ms IS NULL".into());
    }
    // As the hub decides it: a pushed version newer than the applied one.
    let desired = "(SELECT MAX(version) FROM config c WHERE c.device = ids.id)";
    match filter.drift {
        Some(true) => conds.push(format!(
            "{desired} IS NOT NULL AND (cs.applied IS NULL OR cs.applied < {desired})"
        )),
        Some(false) => conds.push(format!(
            "NOT ({desired} IS NOT NULL AND (cs.applied IS NULL OR cs.applied < {desired}))"
        )),
        None => {}
    }
    for t in &filter.labels {
        let key = bind(Param::Text(t.key.clone()), &mut params);
        let mut test =
            format!("SELECT 1 FROM device_label l WHERE l.device = ids.id AND l.key = {key}");
        if !t.values.is_empty() {
            let values: Vec<String> = t
                .values
                .iter()
                .map(|v| bind(Param::Text(v.clone()), &mut params))
                .collect();
            test.push_str(&format!(" AND l.value IN ({})", values.join(", ")));
        }
        conds.push(format!(
            "{}EXISTS ({test})",
            if t.present { "" } else { "NOT " }
        ));
    }
    if let Some(b) = filter.cert_before_ms {
        let b = bind(Param::Int(b), &mut params);
        conds.push(format!("d.not_after_ms < {b}"));
    }
    if let Some(a) = filter.cert_after_ms {
        let a = bind(Param::Int(a), &mut params);
        conds.push(format!("d.not_after_ms > {a}"));
    }
    let conds = if conds.is_empty() {
        "TRUE".to_owned()
    } else {
        conds.join("\n  AND ")
    };
    Some((
        format!(
            "WITH ids(id) AS ({ids})
SELECT {COLUMNS}
FROM ids
{joins}
WHERE {conds}
ORDER BY ids.id
LIMIT $2"
        ),
        params,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::selector::Selector;

    fn sql(s: &str) -> Option<(String, Vec<Param>)> {
        page("", 10, &Selector::parse(s).expect(s).stored(0), "")
    }

    #[test]
    fn values_are_bound_and_never_spliced() {
        let (text, params) = sql("city in (changchun,jilin),!retired").expect("a query");
        assert!(!text.contains("changchun") && !text.contains("retired"));
        assert!(text.contains("l.value IN ($4, $5)"), "{text}");
        assert!(text.contains("NOT EXISTS"), "{text}");
        assert_eq!(params.len(), 6);
        assert_eq!(params[5], Param::Text("retired".into()));
    }

    #[test]
    fn states_that_exclude_each_other_read_nothing() {
        assert!(sql("state=online,state=revoked").is_none());
        let (text, _) = sql("state=revoked").expect("a query");
        assert!(text.contains("revoked_ms IS NOT NULL"), "{text}");
        let (text, _) = sql("").expect("a query");
        assert!(
            text.contains("ORDER BY 1 LIMIT $2)") && !text.contains("EXISTS"),
            "{text}"
        );
    }
}
