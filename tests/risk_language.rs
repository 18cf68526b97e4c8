//! The risk rule language under property tests: any input parses or is refused with a
//! position inside it, never a panic; any AST written back parses to itself; evaluation never
//! panics and follows boolean algebra.

use std::collections::HashMap;

use payrail::domain::risk::{parse, CmpOp, Expr, Operand, Signals, Value, MAX_LEN};
use proptest::prelude::*;

#[derive(Debug)]
struct S(HashMap<String, Value>);

impl Signals for S {
    fn attr(&self, name: &str) -> Option<Value> {
        self.0.get(name).cloned()
    }
    fn listed(&self, list: &str, value: &Value) -> bool {
        list == "l" && matches!(value, Value::Int(i) if i % 2 == 0)
    }
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,8}".prop_filter("not a keyword", |n| {
        !matches!(n.as_str(), "and" | "or" | "not" | "in" | "true" | "false")
    })
}

fn operand() -> impl Strategy<Value = Operand> {
    prop_oneof![
        name().prop_map(Operand::Attr),
        any::<i64>().prop_map(|i| Operand::Lit(Value::Int(i))),
        "[a-zA-Z0-9 @._-]{0,12}".prop_map(|t| Operand::Lit(Value::Text(t))),
        any::<bool>().prop_map(|b| Operand::Lit(Value::Bool(b))),
    ]
}

fn op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge)
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        (operand(), op(), operand()).prop_map(|(l, o, r)| Expr::Cmp(l, o, r)),
        (operand(), name(), any::<bool>()).prop_map(|(operand, list, negated)| Expr::In { operand, list, negated }),
        operand().prop_map(Expr::Truth),
    ];
    leaf.prop_recursive(5, 40, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|e| Expr::Not(Box::new(e))),
        ]
    })
}

fn signals() -> impl Strategy<Value = S> {
    let value = prop_oneof![any::<i64>().prop_map(Value::Int), any::<bool>().prop_map(Value::Bool)];
    prop::collection::hash_map(name(), value, 0..6).prop_map(S)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_input_parses_or_is_refused_with_a_position(src in "\\PC{0,200}") {
        if let Err(e) = parse(&src) {
            prop_assert!(e.position <= src.len().max(MAX_LEN), "{e}");
        }
    }

    #[test]
    fn any_input_of_the_language_s_own_tokens_never_panics(src in "( |:a:|:b:|@l|and|or|not|in|=|!=|<|>=|1|'x'|\\(|\\)|true){0,40}") {
        if let Ok(e) = parse(&src) {
            let _ = e.eval(&S(HashMap::new()));
        }
    }

    #[test]
    fn an_ast_written_back_parses_to_itself(e in expr()) {
        let text = e.to_string();
        prop_assume!(text.len() <= MAX_LEN);
        let parsed = parse(&text);
        prop_assert!(parsed.is_ok(), "{:?}: {}", parsed, text);
        prop_assert_eq!(parsed.unwrap(), e);
    }

    /// Three-valued, as SQL: what reads a missing attribute is unknown, `not` keeps it unknown,
    /// and a predicate fires only when true. With every attribute known it is boolean algebra.
    #[test]
    fn evaluation_follows_boolean_algebra(a in expr(), b in expr(), s in signals()) {
        let and = Expr::And(Box::new(a.clone()), Box::new(b.clone())).eval(&s);
        let or = Expr::Or(Box::new(a.clone()), Box::new(b.clone())).eval(&s);
        prop_assert_eq!(and, a.eval(&s) && b.eval(&s));
        prop_assert_eq!(or, a.eval(&s) || b.eval(&s));
        let not = |e: &Expr| Expr::Not(Box::new(e.clone()));
        prop_assert!(!(not(&a).eval(&s) && a.eval(&s)), "never a predicate and its negation");
        prop_assert_eq!(not(&not(&a)).eval(&s), a.eval(&s));
        let (mut attrs, mut lists) = (Vec::new(), Vec::new());
        a.names(&mut attrs, &mut lists);
        if attrs.iter().all(|n| s.0.contains_key(n)) {
            prop_assert_eq!(not(&a).eval(&s), !a.eval(&s));
        }
    }

    /// A predicate that holds with an attribute missing holds whatever value it is given: it
    /// did not depend on it (missing data never makes a rule fire).
    #[test]
    fn a_missing_attribute_never_makes_a_rule_fire(a in expr(), s in signals(), v in any::<i64>()) {
        let (mut attrs, mut lists) = (Vec::new(), Vec::new());
        a.names(&mut attrs, &mut lists);
        if let Some(missing) = attrs.iter().find(|n| !s.0.contains_key(*n)) {
            if a.eval(&s) {
                for value in [Value::Int(v), Value::Bool(true), Value::Bool(false)] {
                    let mut known = S(s.0.clone());
                    known.0.insert(missing.clone(), value);
                    prop_assert!(a.eval(&known), "{} holds with {} missing but not with it set", a, missing);
                }
            }
        }
    }
}
