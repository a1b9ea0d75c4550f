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

impl Action {
    /// The name a request gives it.
    pub fn name(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Stop => "stop",
            Action::Auto => "auto",
            Action::Lockout => "lockout",
            Action::Release => "release",
            Action::ResetLatch => "reset_latch",
            Action::State => "state",
        }
    }

    /// The action a request names, read as a request is.
    fn named(name: &str) -> Option<Action> {
        serde_json::from_value(serde_json::Value::String(name.into())).ok()
    }
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
    /// As the request gave it (an unknown action too); null if it gave none or was not JSON.
    pub action: Option<String>,
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

/// Parses a request; `Err` is the answer to send, carrying what the request said as far as it
/// can be read (request id, pump, action, who asked: the audit record of the refusal has them
/// too).
pub fn parse(payload: &[u8], gateway_id: &str) -> Result<Request, Box<Answer>> {
    let refuse = |reason: String| {
        let said = Said::read(payload);
        Box::new(Answer {
            request_id: said.request_id.unwrap_or_default(),
            pump: said.pump,
            action: said.action,
            outcome: "refused",
            reason: Some(reason),
            requested_by: said.requested_by,
            pumps: vec![],
            sensors: vec![],
        })
    };
    if payload.len() > MAX_REQUEST {
        return Err(refuse(format!(
            "{} bytes: a request may not exceed {MAX_REQUEST}",
            payload.len()
        )));
    }
    let r: Request =
        serde_json::from_slice(payload).map_err(|e| refuse(format!("not a pump request: {e}")))?;
    if let Some(g) = &r.gateway_id {
        if !g.eq_ignore_ascii_case(gateway_id) {
            return Err(refuse(format!(
                "for gateway {g}, not this one ({gateway_id})"
            )));
        }
    }
    if r.action != Action::State && r.pump.is_none() {
        return Err(refuse("no pump named".into()));
    }
    if matches!(r.action, Action::Run | Action::Stop) && r.expires_at.is_none() {
        return Err(refuse(
            "run and stop need expiresAt (Unix milliseconds)".into(),
        ));
    }
    if r.action == Action::ResetLatch && r.interlock.is_none() {
        return Err(refuse("reset_latch needs the interlock's id".into()));
    }
    Ok(r)
}

/// What a refused request said, read from its JSON whatever else is wrong with it: a string
/// as it is, another value as its JSON text, null or absent as nothing. An oversized request
/// is read too (the broker caps it at 256 KiB), each value cut to `MAX_REQUEST` bytes (`…`
/// marks the cut) so that its refusal is no larger than an accepted request's record.
struct Said {
    request_id: Option<String>,
    pump: Option<String>,
    action: Option<String>,
    requested_by: Option<String>,
}

impl Said {
    fn read(payload: &[u8]) -> Said {
        let json = serde_json::from_slice::<serde_json::Value>(payload).ok();
        let field = |key: &str| {
            let text = match json.as_ref()?.get(key)? {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some(cut(text, MAX_REQUEST))
        };
        Said {
            request_id: field("requestId"),
            pump: field("pump"),
            action: field("action"),
            requested_by: field("requestedBy"),
        }
    }
}

/// `text` cut to at most `max` bytes (and a `…`) on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The reason of a request's audit record (`action: "command"`):
/// `Run (request 42) by scada-tours: accepted`, or `…: refused: <why>`. The action is the one
/// the request gave: a known one by its name in the engine's words, another quoted as it came,
/// none as `(no action)`.
pub fn audit_reason(
    action: Option<&str>,
    request_id: &str,
    requested_by: Option<&str>,
    refusal: Option<&str>,
) -> String {
    let action = match action {
        Some(a) => match Action::named(a) {
            Some(known) => format!("{known:?}"),
            None => format!("{a:?}"),
        },
        None => "(no action)".into(),
    };
    let request = if request_id.is_empty() {
        "no request id".to_string()
    } else {
        format!("request {request_id}")
    };
    let who = requested_by.unwrap_or("(not said)");
    match refusal {
        None => format!("{action} ({request}) by {who}: accepted"),
        Some(why) => format!("{action} ({request}) by {who}: refused: {why}"),
    }
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

    /// The answer to `payload`, refused by `parse`, as it goes on the wire.
    fn refusal(payload: &[u8]) -> serde_json::Value {
        let answer = parse(payload, "0016c001ff10a235").expect_err("refused");
        serde_json::to_value(&answer).unwrap()
    }

    #[test]
    fn every_refusal_says_what_the_request_carried() {
        use serde_json::json;
        let padding = "x".repeat(MAX_REQUEST);
        let too_large = format!(
            r#"{{"requestId":"7","pump":"P1","action":"run","expiresAt":1,"requestedBy":"ops","note":"{padding}"}}"#
        );
        // A request, what its refusal must say it carried, and how its reason begins.
        let cases = [
            (
                br#"{"requestId":"1","gatewayId":"0016c001ffffffff","pump":"P1","action":"state","requestedBy":"ops"}"#.as_slice(),
                json!({"requestId": "1", "action": "state", "requestedBy": "ops", "pump": "P1"}),
                "for gateway 0016c001ffffffff, not this one",
            ),
            (
                br#"{"requestId":"2","pump":"P1","action":"explode","requestedBy":"ops"}"#,
                json!({"requestId": "2", "action": "explode", "requestedBy": "ops", "pump": "P1"}),
                "not a pump request: unknown variant `explode`",
            ),
            (
                br#"{"requestId":"3","pump":"P1","action":"run","requestedBy":"ops"}"#,
                json!({"requestId": "3", "action": "run", "requestedBy": "ops", "pump": "P1"}),
                "run and stop need expiresAt",
            ),
            (
                br#"{"requestId":"4","action":"lockout"}"#,
                json!({"requestId": "4", "action": "lockout", "requestedBy": null, "pump": null}),
                "no pump named",
            ),
            (
                br#"{"requestId":"5","pump":"P1","action":"reset_latch","requestedBy":"ops"}"#,
                json!({"requestId": "5", "action": "reset_latch", "requestedBy": "ops", "pump": "P1"}),
                "reset_latch needs the interlock's id",
            ),
            // JSON, not a request: what it says is read all the same, a value that is not a
            // string as its JSON text; no action at all is null.
            (
                br#"{"requestId":6,"pump":"P1","requestedBy":"ops","expiresAt":"soon"}"#,
                json!({"requestId": "6", "action": null, "requestedBy": "ops", "pump": "P1"}),
                "not a pump request:",
            ),
            (
                br#"{"requestId":"8","pump":"P1","action":"stop","expiresAt":1,"requestedBy":"ops","colour":"red"}"#,
                json!({"requestId": "8", "action": "stop", "requestedBy": "ops", "pump": "P1"}),
                "not a pump request: unknown field `colour`",
            ),
            (
                too_large.as_bytes(),
                json!({"requestId": "7", "action": "run", "requestedBy": "ops", "pump": "P1"}),
                "4184 bytes: a request may not exceed 4096",
            ),
            // Not JSON: nothing can be read.
            (
                b"\xff{",
                json!({"requestId": "", "action": null, "requestedBy": null, "pump": null}),
                "not a pump request:",
            ),
        ];
        for (request, carried, reason) in cases {
            let a = refusal(request);
            let shown: String = String::from_utf8_lossy(request).chars().take(200).collect();
            assert_eq!(a["outcome"], "refused", "{shown}");
            let said = json!({
                "requestId": a["requestId"],
                "action": a["action"],
                "requestedBy": a["requestedBy"],
                "pump": a["pump"],
            });
            assert_eq!(said, carried, "{shown}");
            assert!(
                a["reason"].as_str().unwrap().starts_with(reason),
                "{shown}: {a}"
            );
        }
    }

    #[test]
    fn an_oversized_request_says_who_asked_but_no_more_than_a_request_may_hold() {
        let by = "é".repeat(MAX_REQUEST);
        let request = format!(r#"{{"requestId":"9","action":"lockout","requestedBy":"{by}"}}"#);
        let a = refusal(request.as_bytes());
        let said = a["requestedBy"].as_str().unwrap();
        assert_eq!(said, format!("{}…", "é".repeat(MAX_REQUEST / 2)));
        assert_eq!(a["requestId"], "9");
    }

    #[test]
    fn the_audit_record_says_the_action_as_it_came_and_the_outcome() {
        // As `event/rules` has always said them for the requests the engine decided.
        assert_eq!(
            audit_reason(Some("run"), "r1", Some("ops-anna"), None),
            "Run (request r1) by ops-anna: accepted"
        );
        assert_eq!(
            audit_reason(
                Some("reset_latch"),
                "c1",
                None,
                Some("interlock \"dry_run\" is not latched")
            ),
            "ResetLatch (request c1) by (not said): refused: interlock \"dry_run\" is not latched"
        );
        // Refused before the engine saw them: an unknown action quoted as it came, none said so.
        let a =
            refusal(br#"{"requestId":"b1","pump":"P1","action":"explode","requestedBy":"ops"}"#);
        assert_eq!(
            audit_reason(
                a["action"].as_str(),
                a["requestId"].as_str().unwrap(),
                a["requestedBy"].as_str(),
                a["reason"].as_str()
            ),
            "\"explode\" (request b1) by ops: refused: not a pump request: unknown variant `explode`, expected one of `run`, `stop`, `auto`, `lockout`, `release`, `reset_latch`, `state` at line 1 column 48"
        );
        assert_eq!(
            audit_reason(None, "", None, Some("not a pump request: expected value at line 1 column 1")),
            "(no action) (no request id) by (not said): refused: not a pump request: expected value at line 1 column 1"
        );
    }

    #[test]
    fn each_action_is_named_as_requests_name_it() {
        use Action::*;
        for a in [Run, Stop, Auto, Lockout, Release, ResetLatch, State] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
            assert_eq!(Action::named(a.name()), Some(a));
        }
        assert_eq!(Action::named("explode"), None);
    }
}
