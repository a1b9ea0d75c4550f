//! Central control of the pumps, through the agent: JSON requests on
//! `<prefix>/gateway/<id>/command/pump`, each answered on `<prefix>/gateway/<id>/event/pump`
//! (through the durable store) with its request id and the outcome or a precise refusal.
//! README § Pump-safety rules, "Central control", is the reference.
//!
//! The centre never sends downlinks to a pump's own session; it asks the agent, whose engine
//! decides with every safety rule applied.

use serde::{Deserialize, Serialize};

/// The largest request taken (a real one is ~200 bytes).
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Run until `expiresAt` (capped by the pump's `remote_lease_max`).
    Run,
    /// Hold stopped until `expiresAt`, whatever local control wants (safety stops still apply).
    Stop,
    /// End the central request: local control again.
    Auto,
    Lockout,
    Release,
    ResetLatch,
    /// Pump and sensor state, changing nothing.
    State,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub request_id: String,
    /// If given, must be this gateway's id.
    pub gateway_id: Option<String>,
    /// Required except for `state`.
    pub pump: Option<String>,
    pub action: Action,
    /// Unix milliseconds; required for `run` and `stop`. An absolute time, so that a request
    /// replayed after a reconnect cannot extend anything: once past, it is refused.
    pub expires_at: Option<u64>,
    /// For `reset_latch`.
    pub interlock: Option<String>,
    /// Who asked (an operator, a SCADA job): kept in the audit record.
    pub requested_by: Option<String>,
}

/// The answer to one request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub request_id: String,
    pub pump: Option<String>,
    pub action: Option<Action>,
    /// `accepted` or `refused`.
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    /// After the request: every pump (for `state`) or the pump concerned.
    pub pumps: Vec<serde_json::Value>,
    /// For `state`: every sensor.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sensors: Vec<serde_json::Value>,
}

/// Parses a request; `Err` is the answer to send (a request id is recovered when it can be).
pub fn parse(payload: &[u8], gateway_id: &str) -> Result<Request, Box<Answer>> {
    let refuse = |request_id: String, reason: String| {
        Box::new(Answer {
            request_id,
            pump: None,
            action: None,
            outcome: "refused",
            reason: Some(reason),
            requested_by: None,
            pumps: vec![],
            sensors: vec![],
        })
    };
    if payload.len() > MAX_REQUEST {
        return Err(refuse(
            String::new(),
            format!(
                "{} bytes: a request may not exceed {MAX_REQUEST}",
                payload.len()
            ),
        ));
    }
    let r: Request = serde_json::from_slice(payload).map_err(|e| {
        let id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("requestId")?.as_str().map(String::from))
            .unwrap_or_default();
        refuse(id, format!("not a pump request: {e}"))
    })?;
    if let Some(g) = &r.gateway_id {
        if !g.eq_ignore_ascii_case(gateway_id) {
            return Err(refuse(
                r.request_id.clone(),
                format!("for gateway {g}, not this one ({gateway_id})"),
            ));
        }
    }
    if r.action != Action::State && r.pump.is_none() {
        return Err(refuse(r.request_id.clone(), "no pump named".into()));
    }
    if matches!(r.action, Action::Run | Action::Stop) && r.expires_at.is_none() {
        return Err(refuse(
            r.request_id.clone(),
            "run and stop need expiresAt (Unix milliseconds)".into(),
        ));
    }
    if r.action == Action::ResetLatch && r.interlock.is_none() {
        return Err(refuse(
            r.request_id.clone(),
            "reset_latch needs the interlock's id".into(),
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_before_the_engine_sees_them() {
        let gw = "0016c001ff10a235";
        let ok = br#"{"requestId":"1","pump":"P1","action":"run","expiresAt":1900000000000,"requestedBy":"ops"}"#;
        assert_eq!(parse(ok, gw).unwrap().action, Action::Run);
        let other = br#"{"requestId":"2","gatewayId":"0016c001ffffffff","pump":"P1","action":"stop","expiresAt":1}"#;
        let a = parse(other, gw).unwrap_err();
        assert_eq!(a.request_id, "2");
        assert!(a.reason.unwrap().contains("not this one"));
        let no_expiry = br#"{"requestId":"3","pump":"P1","action":"run"}"#;
        assert!(parse(no_expiry, gw)
            .unwrap_err()
            .reason
            .unwrap()
            .contains("expiresAt"));
        let unknown = br#"{"requestId":"4","pump":"P1","action":"explode"}"#;
        let a = parse(unknown, gw).unwrap_err();
        assert_eq!(a.request_id, "4");
        assert!(a.reason.unwrap().contains("unknown variant"));
        assert_eq!(parse(b"\xff", gw).unwrap_err().request_id, "");
        assert!(parse(&vec![b' '; 5000], gw).is_err());
    }
}
