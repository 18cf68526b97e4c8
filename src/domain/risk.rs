//! The risk rule language: a small, safe predicate language in the manner of Stripe Radar's,
//! parsed once into an AST and evaluated against a payment's signals. No eval, no loops, no
//! calls: a predicate is comparisons of attributes (`:amount:`), literals and lists (`@name`)
//! joined by `and`, `or`, `not`. Bounded: at most [`MAX_LEN`] characters, [`MAX_NODES`] nodes and
//! [`MAX_DEPTH`] levels of nesting, so a merchant's rule can never cost more than a few
//! microseconds. A predicate that does not parse is refused with the position of the error.
//!
//! ```text
//! :amount: > 100000 and :card_country: != :ip_country:
//! :card_bin: in @high_risk_bins or :email_domain: in @disposable_domains
//! :ip_attempts_1h: > 20 and :amount: <= 500
//! ```
//!
//! An attribute the payment does not have (no IP given, say) makes every comparison that uses
//! it unknown, `!=` and `not in` included, and `not` keeps it unknown: a rule fires only when
//! its predicate is true, so never on missing data.

use std::fmt;

pub const MAX_LEN: usize = 1_000;
pub const MAX_NODES: usize = 200;
pub const MAX_DEPTH: usize = 32;

/// A value a predicate compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Text(String),
    Bool(bool),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Text(s) => write!(f, "'{s}'"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Attr(String),
    Lit(Value),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, CmpOp, Operand),
    /// `operand in @list`, or with `negated`, `not in`.
    In {
        operand: Operand,
        list: String,
        negated: bool,
    },
    /// A bare boolean attribute or literal (`:card_is_prepaid:`, `true`).
    Truth(Operand),
}

/// Why a predicate does not parse, and where (a character offset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct ParseError {
    pub position: usize,
    pub message: String,
}

/// What a predicate is evaluated against: the payment's signals and the merchant's lists.
pub trait Signals {
    /// The attribute's value, if the payment has it.
    fn attr(&self, name: &str) -> Option<Value>;
    /// Whether `value` is an item of the list `name` (an unknown list holds nothing).
    fn listed(&self, list: &str, value: &Value) -> bool;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Attr(String),
    List(String),
    Int(i64),
    Text(String),
    Bool(bool),
    And,
    Or,
    Not,
    In,
    Op(CmpOp),
    Open,
    Close,
}

fn err(position: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        position,
        message: message.into(),
    }
}

fn is_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((at, Tok::Open));
                i += 1
            }
            ')' => {
                out.push((at, Tok::Close));
                i += 1
            }
            ':' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && is_name(chars[j].1) {
                    j += 1;
                }
                if j == start || j >= chars.len() || chars[j].1 != ':' {
                    return Err(err(at, "an attribute is written :name:"));
                }
                out.push((at, Tok::Attr(chars[start..j].iter().map(|c| c.1).collect())));
                i = j + 1;
            }
            '@' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && is_name(chars[j].1) {
                    j += 1;
                }
                if j == start {
                    return Err(err(at, "a list is written @name"));
                }
                out.push((at, Tok::List(chars[start..j].iter().map(|c| c.1).collect())));
                i = j;
            }
            '\'' | '"' => {
                let quote = c;
                let mut j = i + 1;
                let mut text = String::new();
                while j < chars.len() && chars[j].1 != quote {
                    text.push(chars[j].1);
                    j += 1;
                }
                if j >= chars.len() {
                    return Err(err(at, "unterminated string"));
                }
                out.push((at, Tok::Text(text)));
                i = j + 1;
            }
            '0'..='9' | '-' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].1.is_ascii_digit() || chars[j].1 == '_') {
                    j += 1;
                }
                let digits: String = chars[i..j].iter().map(|c| c.1).filter(|c| *c != '_').collect();
                let n = digits
                    .parse::<i64>()
                    .map_err(|_| err(at, "not a whole number in range"))?;
                out.push((at, Tok::Int(n)));
                i = j;
            }
            '=' | '!' | '<' | '>' => {
                let next = chars.get(i + 1).map(|c| c.1);
                let (op, len) = match (c, next) {
                    ('=', Some('=')) => (CmpOp::Eq, 2),
                    ('=', _) => (CmpOp::Eq, 1),
                    ('!', Some('=')) => (CmpOp::Ne, 2),
                    ('<', Some('=')) => (CmpOp::Le, 2),
                    ('<', _) => (CmpOp::Lt, 1),
                    ('>', Some('=')) => (CmpOp::Ge, 2),
                    ('>', _) => (CmpOp::Gt, 1),
                    _ => return Err(err(at, "unknown operator")),
                };
                out.push((at, Tok::Op(op)));
                i += len;
            }
            c if c.is_ascii_alphabetic() => {
                let mut j = i;
                while j < chars.len() && is_name(chars[j].1) {
                    j += 1;
                }
                let word: String = chars[i..j].iter().map(|c| c.1).collect();
                let tok = match word.to_ascii_lowercase().as_str() {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "in" => Tok::In,
                    "true" => Tok::Bool(true),
                    "false" => Tok::Bool(false),
                    _ => {
                        return Err(err(
                            at,
                            format!("unknown word {word:?} (attributes are written :name:)"),
                        ))
                    }
                };
                out.push((at, tok));
                i = j;
            }
            _ => return Err(err(at, format!("unexpected character {c:?}"))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    at: usize,
    end: usize,
    nodes: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.1)
    }

    fn position(&self) -> usize {
        self.toks.get(self.at).map(|t| t.0).unwrap_or(self.end)
    }

    fn node(&mut self) -> Result<(), ParseError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(err(self.position(), format!("more than {MAX_NODES} terms")));
        }
        Ok(())
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.and(depth)?;
        while self.peek() == Some(&Tok::Or) {
            self.at += 1;
            self.node()?;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.unary(depth)?;
        while self.peek() == Some(&Tok::And) {
            self.at += 1;
            self.node()?;
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return Err(err(self.position(), format!("nested more than {MAX_DEPTH} deep")));
        }
        if self.peek() == Some(&Tok::Not) {
            self.at += 1;
            self.node()?;
            return Ok(Expr::Not(Box::new(self.unary(depth + 1)?)));
        }
        if self.peek() == Some(&Tok::Open) {
            self.at += 1;
            let inner = self.or(depth + 1)?;
            if self.peek() != Some(&Tok::Close) {
                return Err(err(self.position(), "expected )"));
            }
            self.at += 1;
            return Ok(inner);
        }
        self.comparison()
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        let at = self.position();
        let op = match self.toks.get(self.at).map(|t| t.1.clone()) {
            Some(Tok::Attr(a)) => Operand::Attr(a),
            Some(Tok::Int(i)) => Operand::Lit(Value::Int(i)),
            Some(Tok::Text(s)) => Operand::Lit(Value::Text(s)),
            Some(Tok::Bool(b)) => Operand::Lit(Value::Bool(b)),
            Some(_) => return Err(err(at, "expected an attribute or a value")),
            None => return Err(err(at, "the predicate ends too soon")),
        };
        self.at += 1;
        self.node()?;
        Ok(op)
    }

    fn list(&mut self) -> Result<String, ParseError> {
        match self.toks.get(self.at).map(|t| t.1.clone()) {
            Some(Tok::List(l)) => {
                self.at += 1;
                self.node()?;
                Ok(l)
            }
            _ => Err(err(self.position(), "expected a list, @name")),
        }
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.operand()?;
        match self.peek().cloned() {
            Some(Tok::Op(op)) => {
                self.at += 1;
                let right = self.operand()?;
                Ok(Expr::Cmp(left, op, right))
            }
            Some(Tok::In) => {
                self.at += 1;
                Ok(Expr::In {
                    operand: left,
                    list: self.list()?,
                    negated: false,
                })
            }
            Some(Tok::Not) if self.toks.get(self.at + 1).map(|t| &t.1) == Some(&Tok::In) => {
                self.at += 2;
                Ok(Expr::In {
                    operand: left,
                    list: self.list()?,
                    negated: true,
                })
            }
            _ => Ok(Expr::Truth(left)),
        }
    }
}

/// Parses a predicate into its AST, or says what is wrong and where.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    if src.len() > MAX_LEN {
        return Err(err(MAX_LEN, format!("longer than {MAX_LEN} characters")));
    }
    let toks = lex(src)?;
    if toks.is_empty() {
        return Err(err(0, "the predicate is empty"));
    }
    let mut p = Parser {
        toks,
        at: 0,
        end: src.len(),
        nodes: 0,
    };
    let expr = p.or(0)?;
    if p.at != p.toks.len() {
        return Err(err(p.position(), "unexpected text after the predicate"));
    }
    Ok(expr)
}

impl Expr {
    /// Whether the predicate holds for `signals`. Never fails: a comparison of values of
    /// different kinds is false, and one that reads an attribute the payment does not have is
    /// unknown, which `not` leaves unknown; a rule fires only when its predicate is true, so
    /// never on missing data (`not (:ip_country: = 'US')` included).
    pub fn eval(&self, s: &dyn Signals) -> bool {
        self.truth(s) == Some(true)
    }

    /// `and` (`decisive` false) and `or` (true): either side with the decisive value decides
    /// (the right one is not read when the left does); both known and not decisive, the other
    /// value; otherwise unknown.
    fn either_decides(a: &Expr, b: &Expr, s: &dyn Signals, decisive: bool) -> Option<bool> {
        let left = a.truth(s);
        if left == Some(decisive) {
            return left;
        }
        match (left, b.truth(s)) {
            (_, Some(v)) if v == decisive => Some(decisive),
            (Some(_), Some(_)) => Some(!decisive),
            _ => None,
        }
    }

    /// Three-valued: `None` is unknown. `and` is false when either side is, `or` true when
    /// either side is (each short-circuits as before).
    fn truth(&self, s: &dyn Signals) -> Option<bool> {
        match self {
            Expr::And(a, b) => Self::either_decides(a, b, s, false),
            Expr::Or(a, b) => Self::either_decides(a, b, s, true),
            Expr::Not(e) => e.truth(s).map(|t| !t),
            Expr::Truth(o) => value(o, s).map(|v| matches!(v, Value::Bool(true))),
            Expr::In { operand, list, negated } => value(operand, s).map(|v| s.listed(list, &v) != *negated),
            Expr::Cmp(l, op, r) => match (value(l, s), value(r, s)) {
                (Some(a), Some(b)) => Some(compare(&a, *op, &b)),
                _ => None,
            },
        }
    }

    /// Refuses a predicate with a part that can never hold: a comparison of values of two kinds
    /// (`:card_bin: = 424242`, text against a number, is never true, so a block rule written so
    /// would never block), or a bare operand that is not a yes-or-no (`not :email:`). `kind`
    /// names an attribute's kind: `number`, `text` or `boolean`. Message: what is wrong, in the
    /// predicate's words.
    pub fn check_kinds(&self, kind: &dyn Fn(&str) -> Option<&'static str>) -> Result<(), String> {
        let of = |o: &Operand| match o {
            Operand::Attr(a) => kind(a),
            Operand::Lit(Value::Int(_)) => Some("number"),
            Operand::Lit(Value::Text(_)) => Some("text"),
            Operand::Lit(Value::Bool(_)) => Some("boolean"),
        };
        let shown = |o: &Operand| match o {
            Operand::Attr(a) => format!(":{a}:"),
            Operand::Lit(v) => v.to_string(),
        };
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.check_kinds(kind)?;
                b.check_kinds(kind)
            }
            Expr::Not(e) => e.check_kinds(kind),
            Expr::Truth(o) => match of(o) {
                Some("boolean") | None => Ok(()),
                Some(k) => Err(format!("{} is {k}, not a yes-or-no: compare it", shown(o))),
            },
            Expr::In { .. } => Ok(()),
            Expr::Cmp(l, _, r) => match (of(l), of(r)) {
                (Some(a), Some(b)) if a != b => Err(format!(
                    "{} is {a} and {} is {b}: they never compare equal",
                    shown(l),
                    shown(r)
                )),
                _ => Ok(()),
            },
        }
    }

    /// The attributes and lists the predicate reads, for validation and for docs.
    pub fn names(&self, attrs: &mut Vec<String>, lists: &mut Vec<String>) {
        let operand = |o: &Operand, attrs: &mut Vec<String>| {
            if let Operand::Attr(a) = o {
                attrs.push(a.clone());
            }
        };
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.names(attrs, lists);
                b.names(attrs, lists);
            }
            Expr::Not(e) => e.names(attrs, lists),
            Expr::Truth(o) => operand(o, attrs),
            Expr::In { operand: o, list, .. } => {
                operand(o, attrs);
                lists.push(list.clone());
            }
            Expr::Cmp(l, _, r) => {
                operand(l, attrs);
                operand(r, attrs);
            }
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        })
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Attr(a) => write!(f, ":{a}:"),
            Operand::Lit(v) => write!(f, "{v}"),
        }
    }
}

/// The predicate written back, fully parenthesized: `parse` reads it as the same AST.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::Not(e) => write!(f, "not ({e})"),
            Expr::Cmp(l, op, r) => write!(f, "{l} {op} {r}"),
            Expr::In { operand, list, negated } => {
                write!(f, "{operand} {}in @{list}", if *negated { "not " } else { "" })
            }
            Expr::Truth(o) => write!(f, "{o}"),
        }
    }
}

fn value(o: &Operand, s: &dyn Signals) -> Option<Value> {
    match o {
        Operand::Attr(a) => s.attr(a),
        Operand::Lit(v) => Some(v.clone()),
    }
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> bool {
    let ord = match (a, b) {
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        // Text compares without regard to case: countries, brands, domains.
        (Value::Text(x), Value::Text(y)) => x.to_ascii_lowercase().cmp(&y.to_ascii_lowercase()),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => return false,
    };
    match op {
        CmpOp::Eq => ord.is_eq(),
        CmpOp::Ne => ord.is_ne(),
        CmpOp::Lt => ord.is_lt(),
        CmpOp::Le => ord.is_le(),
        CmpOp::Gt => ord.is_gt(),
        CmpOp::Ge => ord.is_ge(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct S(HashMap<&'static str, Value>, Vec<(&'static str, Value)>);

    impl Signals for S {
        fn attr(&self, name: &str) -> Option<Value> {
            self.0.get(name).cloned()
        }
        fn listed(&self, list: &str, value: &Value) -> bool {
            self.1.iter().any(|(l, v)| *l == list && v == value)
        }
    }

    fn signals() -> S {
        S(
            HashMap::from([
                ("amount", Value::Int(150_000)),
                ("card_country", Value::Text("US".into())),
                ("ip_country", Value::Text("FR".into())),
                ("card_bin", Value::Text("400000".into())),
                ("ip_attempts_1h", Value::Int(25)),
                ("card_is_prepaid", Value::Bool(true)),
            ]),
            vec![("high_risk_bins", Value::Text("400000".into()))],
        )
    }

    fn holds(src: &str) -> bool {
        parse(src).unwrap_or_else(|e| panic!("{src}: {e}")).eval(&signals())
    }

    #[test]
    fn radar_like_predicates_evaluate() {
        assert!(holds(":amount: > 100000 and :card_country: != :ip_country:"));
        assert!(holds(":card_bin: in @high_risk_bins"));
        assert!(!holds(":card_bin: not in @high_risk_bins"));
        assert!(holds(
            ":ip_attempts_1h: > 20 and (:amount: <= 500 or :card_is_prepaid:)"
        ));
        assert!(holds("not :amount: < 10 and :card_country: = 'us'"));
        assert!(!holds(":amount: >= 150_001"));
        assert!(holds("true"));
    }

    #[test]
    fn missing_attributes_never_fire() {
        assert!(!holds(":email: = 'a@b.c'"));
        assert!(!holds(":email: != 'a@b.c'"));
        assert!(!holds(":email: in @high_risk_bins"));
        assert!(!holds(":email: not in @high_risk_bins"));
        assert!(!holds(":amount: = 'text'"), "kinds differ: false");
        // `not` of what is unknown stays unknown; `and`/`or` decide when one side does.
        assert!(!holds("not (:email: = 'a@b.c')"));
        assert!(!holds("not (:email: in @high_risk_bins)"));
        assert!(!holds("not (:email: = 'a@b.c' or :amount: < 10)"));
        assert!(holds("not (:email: = 'a@b.c' and :amount: < 10)"), "the amount decides");
        assert!(holds(":email: = 'a@b.c' or :amount: > 10"), "the amount decides");
        assert!(!holds("not (:email: = 'a@b.c' or :amount: > 10)"));
        assert!(
            holds("not (:amount: = 'text')"),
            "kinds differ: false, so its negation holds"
        );
    }

    #[test]
    fn errors_name_their_position() {
        let e = parse(":amount: > ").unwrap_err();
        assert_eq!(e.position, 11, "{e}");
        let e = parse(":amount > 5").unwrap_err();
        assert_eq!(e.position, 0, "{e}");
        let e = parse(":amount: > 5 bogus").unwrap_err();
        assert_eq!(e.position, 13, "{e}");
        let e = parse("(:amount: > 5").unwrap_err();
        assert!(e.message.contains(')'), "{e}");
        assert!(parse("").is_err());
        assert!(parse(&"(".repeat(40)).is_err());
        let long = vec![":amount: > 1"; 120].join(" and ");
        assert!(parse(&long).is_err(), "too many terms");
    }
}

/// An IP address in its one form (an IPv4-mapped IPv6 address as the IPv4 one, IPv6 compressed
/// in lower case), as payments and list items store it; text that is not an address as it is.
pub fn canonical_ip(text: &str) -> String {
    text.parse::<std::net::IpAddr>()
        .map_or_else(|_| text.to_owned(), |a| a.to_canonical().to_string())
}

/// What a payment's customer is known by (sent by the merchant with the payment).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Customer {
    pub email: Option<String>,
    pub ip: Option<String>,
    /// ISO 3166-1 alpha-2, as the merchant knows it (billing or shipping).
    pub country: Option<String>,
}

/// What the PSP's tokenizer knows of a card: never the number. `fingerprint` is a keyed hash
/// of the number (not reversible), the same for the same card whatever its token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CardSignals {
    pub fingerprint: String,
    pub bin: String,
    pub brand: String,
    /// ISO 3166-1 alpha-2 of the issuer.
    pub country: String,
    /// `credit`, `debit` or `prepaid`.
    pub funding: String,
    /// The last four digits, for receipts (cards stored before they were kept: empty).
    #[serde(default)]
    pub last4: String,
}

/// What a rule does when its predicate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskAction {
    /// Let the payment through, whatever other rules say.
    Allow,
    /// Fail it before the PSP hears of it.
    Block,
    /// Authorize it, then hold it for the merchant's decision.
    Review,
    /// Ask the PSP for 3-D Secure.
    #[serde(rename = "request_3ds")]
    RequestThreeDs,
}

impl RiskAction {
    pub const ALL: [RiskAction; 4] = [
        RiskAction::Allow,
        RiskAction::Block,
        RiskAction::Review,
        RiskAction::RequestThreeDs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskAction::Allow => "allow",
            RiskAction::Block => "block",
            RiskAction::Review => "review",
            RiskAction::RequestThreeDs => "request_3ds",
        }
    }

    pub fn parse(s: &str) -> Option<RiskAction> {
        RiskAction::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Which action wins when several rules hold: allow, then block, then review, then 3DS.
    fn precedence(self) -> u8 {
        match self {
            RiskAction::Allow => 0,
            RiskAction::Block => 1,
            RiskAction::Review => 2,
            RiskAction::RequestThreeDs => 3,
        }
    }
}

/// A merchant's rule, parsed.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub action: RiskAction,
    pub predicate: Expr,
}

/// The decision recorded on a payment (`"risk"` in its object).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RiskDecision {
    /// 0 to 100: how many of the usual risk signals the payment shows (see [`score`]).
    pub score: u8,
    /// `allow` when no rule held.
    pub outcome: RiskAction,
    /// The rule that decided, if one did.
    pub rule: Option<String>,
}

/// The rules' verdict: every rule is evaluated, and the holding rule whose action has the
/// highest precedence (allow > block > review > request_3ds) decides; the first such rule in
/// the merchant's order names it.
pub fn decide_risk(rules: &[Rule], signals: &dyn Signals) -> RiskDecision {
    let mut best: Option<&Rule> = None;
    for r in rules {
        if r.predicate.eval(signals)
            && best
                .map(|b| r.action.precedence() < b.action.precedence())
                .unwrap_or(true)
        {
            best = Some(r);
        }
    }
    RiskDecision {
        score: score(signals),
        outcome: best.map(|r| r.action).unwrap_or(RiskAction::Allow),
        rule: best.map(|r| r.id.clone()),
    }
}

/// A plain score from the usual signals, each adding its weight: card and IP countries differ
/// (30), a prepaid card (15), more than 5 attempts from the IP in the hour (25), more than 3
/// cards from the IP in the hour (30). Informative: only rules decide.
pub fn score(s: &dyn Signals) -> u8 {
    let text = |n: &str| match s.attr(n) {
        Some(Value::Text(t)) => Some(t.to_ascii_lowercase()),
        _ => None,
    };
    let int = |n: &str| match s.attr(n) {
        Some(Value::Int(i)) => i,
        _ => 0,
    };
    let mut total = 0u8;
    if let (Some(c), Some(i)) = (text("card_country"), text("ip_country")) {
        if c != i {
            total += 30;
        }
    }
    if text("card_funding").as_deref() == Some("prepaid") {
        total += 15;
    }
    if int("ip_attempts_1h") > 5 {
        total += 25;
    }
    if int("ip_cards_1h") > 3 {
        total += 30;
    }
    total.min(100)
}
