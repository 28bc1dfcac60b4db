//! Device state (a "device shadow"): what operators want a device to be (`desired`) and
//! what the device says it is (`reported`).
//!
//! Each side is a JSON object that changes only by JSON Merge Patch ([`merge`], RFC 7396,
//! which replaced RFC 7386 without changing the algorithm) and counts its changes in a
//! version, so that a writer can refuse to overwrite a change it has not seen. What a
//! device has yet to act on is the [`delta`] of the two. Patches are checked by
//! [`check_patch`] before they are applied, and the merged state by [`check_state`], so
//! that a state stays small enough to hold, store and send whole.

use serde_json::{Map, Value};

use crate::TimestampMs;

/// How deeply a patch or a state may nest objects and arrays; the outer object is level 1.
pub const MAX_DEPTH: usize = 32;
/// The largest a patch or a state may be, serialized as compact JSON.
pub const MAX_BYTES: usize = 64 * 1024;

/// The desired and reported state of one device.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceState {
    /// Always a JSON object.
    pub desired: Value,
    /// How many patches `desired` has had; 0 before the first.
    pub desired_version: u64,
    /// When `desired` last changed.
    pub desired_at_ms: Option<TimestampMs>,
    /// Always a JSON object.
    pub reported: Value,
    /// How many patches `reported` has had; 0 before the first.
    pub reported_version: u64,
    /// When `reported` last changed.
    pub reported_at_ms: Option<TimestampMs>,
}

impl DeviceState {
    /// The state of a device that has none yet: both sides `{}` at version 0.
    pub fn empty() -> Self {
        DeviceState {
            desired: Value::Object(Map::new()),
            desired_version: 0,
            desired_at_ms: None,
            reported: Value::Object(Map::new()),
            reported_version: 0,
            reported_at_ms: None,
        }
    }
}

/// Applies `patch` to `target` as a JSON Merge Patch (RFC 7396): an object patch sets its
/// members in `target` (an object, made one if it was not), recursively, and removes those
/// whose value is `null`; any other patch replaces `target` whole.
pub fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// The part of `desired` that `reported` does not match yet, always an object: each member
/// of `desired` whose value `reported` lacks or differs from, and of two objects only the
/// members that differ, recursively. Numbers compare by value (`1` matches `1.0`).
pub fn delta(desired: &Value, reported: &Value) -> Value {
    let mut out = Map::new();
    if let Value::Object(desired) = desired {
        for (key, want) in desired {
            match (want, reported.get(key)) {
                (Value::Object(_), Some(have @ Value::Object(_))) => {
                    let sub = delta(want, have);
                    if sub.as_object().is_some_and(|m| !m.is_empty()) {
                        out.insert(key.clone(), sub);
                    }
                }
                (_, Some(have)) if same(want, have) => {}
                _ => {
                    out.insert(key.clone(), want.clone());
                }
            }
        }
    }
    Value::Object(out)
}

/// JSON equality, with numbers equal by value whichever way they were written.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            // Integers compare exactly (an f64 cannot hold every i64 and u64); an integer
            // and a float compare as floats.
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), ..) => x == y,
                (.., Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Whether `patch` may be applied to a device state: it must be a JSON object (RFC 7396
/// allows any value, but a patch that is not an object would replace the state with
/// something that is not), nest at most [`MAX_DEPTH`] levels and serialize to at most
/// [`MAX_BYTES`]. The error says which did not hold, in words for the one who sent it.
pub fn check_patch(patch: &Value) -> Result<(), String> {
    check(patch, "a state patch")
}

/// Whether `state`, a side of a device state after a patch, is within the limits
/// [`check_patch`] sets for a patch, so that patches cannot grow it without bound.
pub fn check_state(state: &Value) -> Result<(), String> {
    check(state, "the patched state")
}

fn check(value: &Value, what: &str) -> Result<(), String> {
    let kind = match value {
        Value::Object(_) => None,
        Value::Null => Some("null"),
        Value::Bool(_) => Some("a boolean"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("a string"),
        Value::Array(_) => Some("an array"),
    };
    if let Some(kind) = kind {
        return Err(format!("{what} must be a JSON object, not {kind}"));
    }
    // Depth first: serializing walks the value recursively, so it must be known shallow.
    if deeper_than(value, MAX_DEPTH) {
        return Err(format!("{what} nests deeper than {MAX_DEPTH} levels"));
    }
    let mut sink = Bounded { left: MAX_BYTES };
    if serde_json::to_writer(&mut sink, value).is_err() {
        return Err(format!(
            "{what} is larger than {} KiB as JSON",
            MAX_BYTES / 1024
        ));
    }
    Ok(())
}

/// Whether `value` nests objects and arrays more than `levels` deep; recurses at most
/// `levels + 1` calls however deep the value is.
fn deeper_than(value: &Value, levels: usize) -> bool {
    match value {
        Value::Object(m) => levels == 0 || m.values().any(|c| deeper_than(c, levels - 1)),
        Value::Array(a) => levels == 0 || a.iter().any(|c| deeper_than(c, levels - 1)),
        _ => false,
    }
}

/// Counts what is written to it and fails once more than `left` bytes came, so that an
/// oversized value is never serialized whole.
struct Bounded {
    left: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.left = self
            .left
            .checked_sub(buf.len())
            .ok_or_else(|| std::io::Error::other("too large"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// RFC 7396 Appendix A: (original, patch, result).
    #[test]
    fn merge_follows_the_rfc_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (original, patch, result) in cases {
            let mut target = original.clone();
            merge(&mut target, &patch);
            assert_eq!(target, result, "{original} patched with {patch}");
        }
    }

    #[test]
    fn merge_replaces_a_member_that_is_not_an_object_and_keeps_the_rest() {
        let mut state = json!({"led": "on", "net": {"mode": "wifi", "interval_s": 10}});
        merge(
            &mut state,
            &json!({"led": {"r": 255}, "net": {"mode": null}}),
        );
        assert_eq!(state, json!({"led": {"r": 255}, "net": {"interval_s": 10}}));
        // An empty patch changes nothing.
        let before = state.clone();
        merge(&mut state, &json!({}));
        assert_eq!(state, before);
    }

    #[test]
    fn delta_keeps_what_reported_lacks_or_differs_in() {
        let desired = json!({
            "led": "on",
            "fan": 3,
            "net": {"mode": "lte", "interval_s": 10, "apn": {"name": "x"}},
            "list": [1, 2],
            "empty": {},
        });
        let reported = json!({
            "led": "off",
            "fan": 3,
            "net": {"mode": "lte", "interval_s": 5, "apn": {"name": "x"}, "extra": true},
            "list": [1, 2],
            "empty": {},
            "uptime_s": 100,
        });
        assert_eq!(
            delta(&desired, &reported),
            json!({"led": "on", "net": {"interval_s": 10}})
        );
        // Nothing reported: all of desired.
        assert_eq!(delta(&desired, &json!({})), desired);
        // Everything reported: nothing.
        assert_eq!(delta(&desired, &desired), json!({}));
        assert_eq!(delta(&json!({}), &reported), json!({}));
    }

    #[test]
    fn delta_keeps_the_whole_desired_value_when_the_kinds_differ() {
        assert_eq!(
            delta(&json!({"net": {"mode": "lte"}}), &json!({"net": "lte"})),
            json!({"net": {"mode": "lte"}})
        );
        assert_eq!(
            delta(&json!({"net": "lte"}), &json!({"net": {"mode": "lte"}})),
            json!({"net": "lte"})
        );
        // An empty object desired and nothing reported is still something to report.
        assert_eq!(delta(&json!({"a": {}}), &json!({})), json!({"a": {}}));
        assert_eq!(
            delta(&json!({"a": [1]}), &json!({"a": [1, 2]})),
            json!({"a": [1]})
        );
        // Not objects at all: nothing to compare.
        assert_eq!(delta(&json!("x"), &json!({})), json!({}));
        assert_eq!(delta(&json!({"a": 1}), &json!(null)), json!({"a": 1}));
    }

    #[test]
    fn delta_compares_numbers_by_value() {
        let desired = json!({"t": 21, "f": 0.5, "n": [1, {"x": 2}], "big": u64::MAX});
        let reported = json!({"t": 21.0, "f": 0.5, "n": [1.0, {"x": 2.0}], "big": u64::MAX});
        assert_eq!(delta(&desired, &reported), json!({}));
        assert_eq!(
            delta(
                &json!({"t": 21, "big": u64::MAX}),
                &json!({"t": 21.5, "big": u64::MAX - 1})
            ),
            json!({"t": 21, "big": u64::MAX})
        );
        assert_eq!(delta(&json!({"t": -1}), &json!({"t": -1.0})), json!({}));
        assert_eq!(delta(&json!({"t": 1}), &json!({"t": "1"})), json!({"t": 1}));
    }

    #[test]
    fn check_patch_wants_an_object() {
        assert_eq!(check_patch(&json!({})), Ok(()));
        assert_eq!(check_patch(&json!({"a": null, "b": [1, {"c": 2}]})), Ok(()));
        for (patch, kind) in [
            (json!(null), "null"),
            (json!(true), "a boolean"),
            (json!(1), "a number"),
            (json!("x"), "a string"),
            (json!([{}]), "an array"),
        ] {
            let why = check_patch(&patch).unwrap_err();
            assert!(
                why.ends_with(&format!("must be a JSON object, not {kind}")),
                "{why}"
            );
        }
    }

    /// An object nesting `levels` levels: `{"a": {"a": … {}}}`.
    fn nested(levels: usize) -> Value {
        let mut v = json!({});
        for _ in 1..levels {
            v = json!({ "a": v });
        }
        v
    }

    #[test]
    fn check_patch_limits_nesting() {
        assert_eq!(check_patch(&nested(MAX_DEPTH)), Ok(()));
        let why = check_patch(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(why.contains("nests deeper than 32 levels"), "{why}");
        // Arrays count as levels too, and a scalar inside the deepest level does not.
        let mut v = json!([1]);
        for _ in 2..MAX_DEPTH {
            v = json!([v]);
        }
        assert_eq!(check_patch(&json!({ "a": v.clone() })), Ok(()));
        assert!(check_patch(&json!({ "a": [v] })).is_err());
        // Far deeper than a test thread's stack would take serialized recursively.
        let mut deep = json!({});
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        // (Not `json!`, which would serialize it to take it in.)
        let deep = Value::Object(Map::from_iter([("a".to_owned(), deep)]));
        assert!(check_patch(&deep).unwrap_err().contains("nests deeper"));
        // Dropping it recurses as well: a thread with room for that does it.
        std::thread::Builder::new()
            .stack_size(256 * 1024 * 1024)
            .spawn(move || drop(deep))
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn check_patch_limits_size() {
        // `{"a":"…"}` is 8 bytes around the string.
        let at_limit = json!({"a": "x".repeat(MAX_BYTES - 8)});
        assert_eq!(serde_json::to_vec(&at_limit).unwrap().len(), MAX_BYTES);
        assert_eq!(check_patch(&at_limit), Ok(()));
        let over = json!({"a": "x".repeat(MAX_BYTES - 7)});
        let why = check_patch(&over).unwrap_err();
        assert!(why.contains("larger than 64 KiB"), "{why}");
        assert!(check_state(&over)
            .unwrap_err()
            .starts_with("the patched state"));
    }

    #[test]
    fn an_empty_state_has_two_empty_objects_at_version_zero() {
        let s = DeviceState::empty();
        assert_eq!((s.desired_version, s.reported_version), (0, 0));
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({
                "desired": {}, "desired_version": 0, "desired_at_ms": null,
                "reported": {}, "reported_version": 0, "reported_at_ms": null,
            })
        );
    }
}
