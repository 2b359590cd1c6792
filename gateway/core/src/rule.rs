//! The ids of the boundary rules (DESIGN.md rules 1-6), stable across versions:
//! they appear in `docs/policy.md`, in `gatewayd check` output and in audit
//! records. The rules themselves are in [`crate::policy`]; diagnostics and the
//! config compiler name them through this module, so neither depends on the
//! policy engine.

use std::fmt;

use serde::Serialize;

macro_rules! rules {
    ($($variant:ident = $id:literal : $summary:literal,)*) => {
        /// The id of a boundary rule, stable across versions.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum RuleId {
            $(#[doc = $summary] $variant,)*
        }

        impl RuleId {
            /// Every rule, in documentation order.
            pub const ALL: &'static [RuleId] = &[$(RuleId::$variant,)*];

            /// The id as written in docs, errors and audit records.
            pub fn as_str(self) -> &'static str {
                match self { $(RuleId::$variant => $id,)* }
            }

            /// One line on what the rule does.
            pub fn summary(self) -> &'static str {
                match self { $(RuleId::$variant => $summary,)* }
            }

            /// The rule with this id.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($id => Some(RuleId::$variant),)* _ => None }
            }
        }
    };
}

rules! {
    DefaultDeny = "R0.default-deny": "Nothing that is not declared and allowed crosses the boundary.",
    AllowService = "R0.allow-service": "A client from a zone or device in a service's allow list may open it.",
    AllowAccess = "R0.allow-access": "A legacy client may use a declared access to another department's service.",
    AllowChannel = "R0.allow-channel": "A record that passes its channel's checks is accepted.",
    AllowPublish = "R0.allow-publish": "A provincial client may open a hub's publish listener.",
    AllowTransit = "R0.allow-transit": "A hub carries one department's gateway to another's service across its provincial zone.",
    IntranetIsolation = "R1.intranet-isolation": "The intranet never shares a box with the extranet or the internet.",
    ClassifiedBridge = "R1.classified-bridge": "A classified legacy zone bridges only to the intranet.",
    OneWayImport = "R1.one-way-import": "Unclassified data enters the intranet only through an approved one-way import device.",
    Internet = "R2.internet": "Internet zones are never bridged.",
    AssessmentMissing = "R3.assessment-missing": "A legacy zone is bridged only with an assessment.",
    AssessmentExpired = "R3.assessment-expired": "A legacy zone is bridged only while its assessment is valid.",
    AssessmentExpiring = "R3.assessment-expiring": "Warns 30 days before a bridged zone's assessment ends.",
    LevelDown = "R4.level-down": "No interactive relay from a higher-level zone to a lower one; data flows down only through a one-way, content-checked channel.",
    Address = "R5.address": "A client's address must lie in the networks of the zone it comes from.",
    AppProtocol = "R5.app-protocol": "At boundary level 3 and up a service declares its application protocol.",
    HttpAllow = "R5.http-allow": "A service's http_allow lists the methods and paths its clients may request; the gateway answers any other request 403 and it never reaches the server.",
    PgLogin = "R5.pg-login": "A postgres service's pg_users and pg_databases list who may log in to what; another login is refused before the server sees it.",
    PgReadOnly = "R5.pg-read-only": "Through a pg_read_only service only single read statements pass, as a SQL parser reads them; the gateway answers anything else with SQLSTATE 42501.",
    ChannelContent = "R5.channel-content": "At boundary level 3 and up a channel declares formats and a record size limit, and every record is checked against them.",
    Retention = "R6.retention": "Audit records are kept at least 180 days.",
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RuleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
