//! A fast path for the CEL that rules are mostly written in: comparisons and arithmetic over
//! a reading's metrics, the device's id and tags, and times, joined by `&&`, `||` and `!`.
//!
//! [`Fast::compile`] turns such an expression's tree into a small tree of its own, which
//! reads the input where it lies (no CEL context is built); anything else (macros other than
//! `has`, functions, lists, maps, other triggers' names) is not compiled, and the expression
//! always runs through the CEL interpreter. When a compiled expression meets a case whose
//! CEL meaning it does not model exactly (a missing key, a type mismatch, an overflow,
//! division by zero, `==` between an int and a double), it answers [`None`] and the caller
//! asks the interpreter, so results never differ from CEL's: the fast path is exact where it
//! answers. A randomised test (`agrees_with_cel`) holds it to that.

use std::collections::BTreeMap;

use cel::common::ast::{operators, Expr as Ast, IdedExpr, LiteralValue};
use tellus_core::{rule::InputKind, RuleInput, Value};

/// A value the fast path computes with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum V<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug)]
enum Node {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
    Metric(String),
    HasMetric(String),
    Tag(String),
    HasTag(String),
    DeviceId,
    Ts,
    At,
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
}

/// What the fast path reads: one telemetry input and its device's tags.
pub struct Reading<'a> {
    pub input: &'a RuleInput,
    pub tags: &'a BTreeMap<String, String>,
}

impl<'a> Reading<'a> {
    fn metric(&self, name: &str) -> Option<V<'a>> {
        let InputKind::Telemetry { metrics, .. } = &self.input.kind else {
            return None;
        };
        // The last of a name given twice, as in the interpreter's scope.
        metrics
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| match v {
                Value::Bool(b) => V::Bool(*b),
                Value::Int(i) => V::Int(*i),
                Value::Float(f) => V::Double(*f),
                Value::Text(s) => V::Str(s),
            })
    }

    fn ts(&self) -> Option<i64> {
        match &self.input.kind {
            InputKind::Telemetry { ts_ms, .. } => Some(*ts_ms),
            _ => None,
        }
    }
}

/// A compiled telemetry expression.
#[derive(Debug)]
pub struct Fast(Node);

impl Fast {
    /// The fast form of a telemetry expression, if it has one.
    pub fn compile(expr: &IdedExpr) -> Option<Fast> {
        node(expr).map(Fast)
    }

    /// A condition's outcome: `Some(bool)` where the fast path is exact, else `None`.
    pub fn test(&self, r: &Reading<'_>) -> Option<bool> {
        match eval(&self.0, r)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A derived metric's value, where the fast path is exact (finite numbers only).
    pub fn value(&self, r: &Reading<'_>) -> Option<Value> {
        Some(match eval(&self.0, r)? {
            V::Bool(b) => Value::Bool(b),
            V::Int(i) => Value::Int(i),
            V::Double(f) if f.is_finite() => Value::Float(f),
            V::Double(_) => return None,
            V::Str(s) => Value::Text(s.to_owned()),
        })
    }
}

fn literal_str(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Ast::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

fn is_ident(e: &IdedExpr, name: &str) -> bool {
    matches!(&e.expr, Ast::Ident(n) if n == name)
}

/// `device.tags`
fn is_tags(e: &IdedExpr) -> bool {
    matches!(&e.expr, Ast::Select(s) if !s.test && s.field == "tags" && is_ident(&s.operand, "device"))
}

fn node(e: &IdedExpr) -> Option<Node> {
    Some(match &e.expr {
        Ast::Literal(LiteralValue::Boolean(b)) => Node::Bool(*b.inner()),
        Ast::Literal(LiteralValue::Int(i)) => Node::Int(*i.inner()),
        Ast::Literal(LiteralValue::Double(d)) => Node::Double(*d.inner()),
        Ast::Literal(LiteralValue::String(s)) => Node::Str(s.inner().to_owned()),
        Ast::Ident(name) => match name.as_str() {
            "ts" => Node::Ts,
            "at" => Node::At,
            _ => return None,
        },
        Ast::Select(s) => {
            if is_ident(&s.operand, "metrics") {
                if s.test {
                    Node::HasMetric(s.field.clone())
                } else {
                    Node::Metric(s.field.clone())
                }
            } else if is_tags(&s.operand) {
                if s.test {
                    Node::HasTag(s.field.clone())
                } else {
                    Node::Tag(s.field.clone())
                }
            } else if !s.test && s.field == "id" && is_ident(&s.operand, "device") {
                Node::DeviceId
            } else {
                return None;
            }
        }
        Ast::Call(call) if call.target.is_none() => {
            let arg = |i: usize| call.args.get(i).and_then(node).map(Box::new);
            match (call.func_name.as_str(), call.args.len()) {
                (operators::INDEX, 2) => {
                    let key = literal_str(&call.args[1])?.to_owned();
                    if is_ident(&call.args[0], "metrics") {
                        Node::Metric(key)
                    } else if is_tags(&call.args[0]) {
                        Node::Tag(key)
                    } else {
                        return None;
                    }
                }
                (operators::LOGICAL_NOT, 1) => Node::Not(arg(0)?),
                (operators::NEGATE, 1) => Node::Neg(arg(0)?),
                (operators::LOGICAL_AND, 2) => Node::And(arg(0)?, arg(1)?),
                (operators::LOGICAL_OR, 2) => Node::Or(arg(0)?, arg(1)?),
                (operators::CONDITIONAL, 3) => Node::Cond(arg(0)?, arg(1)?, arg(2)?),
                (name, 2) => {
                    let (l, r) = (arg(0)?, arg(1)?);
                    match name {
                        operators::LESS => Node::Cmp(Cmp::Lt, l, r),
                        operators::LESS_EQUALS => Node::Cmp(Cmp::Le, l, r),
                        operators::GREATER => Node::Cmp(Cmp::Gt, l, r),
                        operators::GREATER_EQUALS => Node::Cmp(Cmp::Ge, l, r),
                        operators::EQUALS => Node::Cmp(Cmp::Eq, l, r),
                        operators::NOT_EQUALS => Node::Cmp(Cmp::Ne, l, r),
                        operators::ADD => Node::Arith(Arith::Add, l, r),
                        operators::SUBSTRACT => Node::Arith(Arith::Sub, l, r),
                        operators::MULTIPLY => Node::Arith(Arith::Mul, l, r),
                        operators::DIVIDE => Node::Arith(Arith::Div, l, r),
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    })
}

fn eval<'a>(n: &'a Node, r: &Reading<'a>) -> Option<V<'a>> {
    Some(match n {
        Node::Bool(b) => V::Bool(*b),
        Node::Int(i) => V::Int(*i),
        Node::Double(d) => V::Double(*d),
        Node::Str(s) => V::Str(s),
        Node::Metric(name) => r.metric(name)?,
        Node::HasMetric(name) => V::Bool(r.metric(name).is_some()),
        Node::Tag(name) => V::Str(r.tags.get(name)?),
        Node::HasTag(name) => V::Bool(r.tags.contains_key(name)),
        Node::DeviceId => V::Str(r.input.device.as_str()),
        Node::Ts => V::Int(r.ts()?),
        Node::At => V::Int(r.input.at_ms),
        Node::Not(x) => match eval(x, r)? {
            V::Bool(b) => V::Bool(!b),
            _ => return None,
        },
        Node::Neg(x) => match eval(x, r)? {
            V::Int(i) => V::Int(i.checked_neg()?),
            V::Double(d) => V::Double(-d),
            _ => return None,
        },
        // Exact only where both sides are known: an error on either side may be absorbed
        // by the other (CEL's commutative `&&` and `||`), which the interpreter decides.
        Node::And(a, b) => match eval(a, r)? {
            V::Bool(false) => V::Bool(false),
            V::Bool(true) => match eval(b, r)? {
                V::Bool(b) => V::Bool(b),
                _ => return None,
            },
            _ => return None,
        },
        Node::Or(a, b) => match eval(a, r)? {
            V::Bool(true) => V::Bool(true),
            V::Bool(false) => match eval(b, r)? {
                V::Bool(b) => V::Bool(b),
                _ => return None,
            },
            _ => return None,
        },
        Node::Cond(c, a, b) => match eval(c, r)? {
            V::Bool(true) => eval(a, r)?,
            V::Bool(false) => eval(b, r)?,
            _ => return None,
        },
        Node::Cmp(op, a, b) => V::Bool(compare(*op, eval(a, r)?, eval(b, r)?)?),
        Node::Arith(op, a, b) => arith(*op, eval(a, r)?, eval(b, r)?)?,
    })
}

fn compare(op: Cmp, a: V<'_>, b: V<'_>) -> Option<bool> {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (V::Int(x), V::Int(y)) => x.cmp(&y),
        (V::Double(x), V::Double(y)) => x.partial_cmp(&y)?,
        // Mixed numbers: ordered by value; equality is left to the interpreter.
        (V::Int(x), V::Double(y)) if !matches!(op, Cmp::Eq | Cmp::Ne) => {
            (x as f64).partial_cmp(&y)?
        }
        (V::Double(x), V::Int(y)) if !matches!(op, Cmp::Eq | Cmp::Ne) => {
            x.partial_cmp(&(y as f64))?
        }
        (V::Str(x), V::Str(y)) => x.cmp(y),
        (V::Bool(x), V::Bool(y)) if matches!(op, Cmp::Eq | Cmp::Ne) => x.cmp(&y),
        _ => return None,
    };
    Some(match op {
        Cmp::Lt => ordering == Ordering::Less,
        Cmp::Le => ordering != Ordering::Greater,
        Cmp::Gt => ordering == Ordering::Greater,
        Cmp::Ge => ordering != Ordering::Less,
        Cmp::Eq => ordering == Ordering::Equal,
        Cmp::Ne => ordering != Ordering::Equal,
    })
}

fn arith<'a>(op: Arith, a: V<'a>, b: V<'a>) -> Option<V<'a>> {
    Some(match (a, b) {
        (V::Int(x), V::Int(y)) => V::Int(match op {
            Arith::Add => x.checked_add(y)?,
            Arith::Sub => x.checked_sub(y)?,
            Arith::Mul => x.checked_mul(y)?,
            Arith::Div => x.checked_div(y)?,
        }),
        (V::Double(x), V::Double(y)) => V::Double(match op {
            Arith::Add => x + y,
            Arith::Sub => x - y,
            Arith::Mul => x * y,
            // Division by zero: the interpreter's answer, whatever it is.
            Arith::Div if y == 0.0 => return None,
            Arith::Div => x / y,
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use tellus_core::{DeviceId, Trigger};

    use super::*;
    use crate::expr::{with_stack, Expr, Outcome, Scope};

    /// A tiny deterministic generator (xorshift), so failures can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    fn leaf(rng: &mut Rng) -> String {
        rng.pick(&[
            "metrics.a",
            "metrics.b",
            "metrics.s",
            "metrics.flag",
            "metrics.missing",
            "metrics['a']",
            "device.tags.site",
            "device.tags['none']",
            "device.id",
            "ts",
            "at",
            "1",
            "0",
            "2.5",
            "0.0",
            "-3",
            "'lab'",
            "'x'",
            "true",
            "false",
            "9223372036854775807",
        ])
        .to_owned()
    }

    fn gen(rng: &mut Rng, depth: u32) -> String {
        if depth == 0 || rng.next().is_multiple_of(4) {
            return leaf(rng);
        }
        let (a, b) = (gen(rng, depth - 1), gen(rng, depth - 1));
        match rng.next() % 13 {
            0 => format!("({a} && {b})"),
            1 => format!("({a} || {b})"),
            2 => format!("!({a})"),
            3 => format!("-({a})"),
            4 => format!("({a} ? {b} : {})", gen(rng, depth - 1)),
            5 => format!("has(metrics.{})", rng.pick(&["a", "missing"])),
            n => {
                let op = ["<", "<=", ">", ">=", "==", "!=", "+", "-", "*", "/"]
                    [(n as usize + rng.next() as usize) % 10];
                format!("({a} {op} {b})")
            }
        }
    }

    #[test]
    fn agrees_with_cel() {
        with_stack(|| {
            let tags: BTreeMap<String, String> = [("site".into(), "lab".into())].into();
            let inputs: Vec<RuleInput> = [
                vec![
                    ("a", Value::Int(3)),
                    ("b", Value::Float(2.5)),
                    ("s", Value::Text("lab".into())),
                    ("flag", Value::Bool(true)),
                ],
                vec![
                    ("a", Value::Float(0.0)),
                    ("b", Value::Int(i64::MAX)),
                    ("s", Value::Text("x".into())),
                    ("flag", Value::Bool(false)),
                ],
                vec![("a", Value::Int(-1))],
                // A reading may name a metric twice (two objects of one message with one
                // timestamp): the last counts.
                vec![
                    ("a", Value::Int(1)),
                    ("b", Value::Float(1.0)),
                    ("a", Value::Int(7)),
                    ("b", Value::Text("x".into())),
                ],
            ]
            .into_iter()
            .map(|m| RuleInput {
                device: DeviceId::parse("lab").unwrap(),
                at_ms: 7,
                kind: InputKind::Telemetry {
                    ts_ms: 5,
                    metrics: m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                },
            })
            .collect();
            let mut rng = Rng(0x5eed_1234_abcd_0001);
            let (mut compared, mut answered) = (0, 0);
            for _ in 0..20_000 {
                let source = gen(&mut rng, 3);
                let Ok(expr) = Expr::compile(&source, Trigger::Telemetry) else {
                    continue;
                };
                let Some(fast) = Fast::compile(expr.ast()) else {
                    continue;
                };
                for input in &inputs {
                    compared += 1;
                    let scope = Scope::new(input, &tags);
                    let reading = Reading { input, tags: &tags };
                    if let Some(b) = fast.test(&reading) {
                        answered += 1;
                        let want = if b { Outcome::True } else { Outcome::False };
                        assert_eq!(expr.test_slow(&scope), want, "{source} on {input:?}");
                    }
                    if let Some(v) = fast.value(&reading) {
                        assert_eq!(
                            expr.value_slow(&scope),
                            Ok(Some(v)),
                            "{source} on {input:?}"
                        );
                    }
                }
            }
            // The generator must reach both the fast answers and the cases left to CEL.
            assert!(
                answered > 5_000 && answered < compared,
                "{answered} of {compared}"
            );
        });
    }
}
