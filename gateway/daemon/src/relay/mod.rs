//! Relays: a connection is terminated on one side of the boundary and its
//! bytes carried on the other, never a packet routed across (DESIGN.md "Data
//! paths"). Every open is decided by the policy in force, audited with its
//! verdict, and its close audited with bytes and duration.
//!
//! - [`splice`]: moving bytes between two streams, half-close and reset propagated.
//! - [`pipes`]: the same, moved by a tunnel lane's own task (no task per relay).
//! - [`listen`]: accept loops of `[[publish]]` and `[[access]]` listeners.
//! - [`publish`]: a hub's provincial listener for an edge's service.
//! - [`access`]: an edge's listener for another department's service.
//! - [`service`]: an edge opening one of its services for a hub.
//! - [`transit`]: a hub carrying one edge to another's service.
//! - [`app_protocol`]: the level-3 check of a relay's first bytes.
//! - [`postgres`]: a `postgres` service's relay, a checking proxy.
//! - [`udp`]: UDP flows as QUIC datagrams: fronts, the flow table, idle expiry.
//!
//! Relays reach their tunnels through [`crate::tunnel`]; a bandwidth cap is
//! [`crate::node::limit::Limiter`].

pub mod access;
pub mod app_protocol;
pub mod listen;
pub mod pipes;
pub mod postgres;
pub mod publish;
pub mod service;
pub mod splice;
pub mod transit;
pub mod udp;

/// A refusal to send the peer: code, rule, message.
pub type Refusal = (gateway_core::wire::RefuseCode, String, String);

/// A crossing the policy denied: audited (`relay.refuse`), and the refusal
/// to send the peer.
pub(crate) fn denied(
    ctx: &crate::node::Ctx,
    (subject, object): (&str, &str),
    decision: gateway_core::policy::Decision,
) -> Refusal {
    ctx.refuse(
        "relay.refuse",
        subject,
        object,
        decision.rule.as_str(),
        &decision.reason,
    );
    let rule = decision.rule.as_str().to_owned();
    (
        gateway_core::wire::RefuseCode::Policy,
        rule,
        decision.reason,
    )
}
