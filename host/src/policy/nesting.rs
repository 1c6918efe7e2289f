//! How deep Cedar policy text may nest, checked before Cedar parses it.
//!
//! cedar-policy 4.14 has no depth limit in its parser: turning the parse
//! tree into an AST, printing a policy and dropping its trees all recurse
//! once per level (and several frames per level of parentheses), so a
//! policy file with 150 nested `(` overflows a thread's stack and aborts
//! the process (Cedar tracks this class of input upstream; 4.14 does not
//! bound it). Evaluation and validation are
//! guarded by Cedar itself (`stacker`); everything before them is bounded
//! here, without recursion, on the text:
//! - brackets (`(`, `[`, `{`) nest at most [`MAX_NESTING`] deep;
//! - one policy has at most [`MAX_OPERATORS`] operators (`&&`, `||`, `!`,
//!   `-`, `+`, `*`, comparisons, `.`, `if`, `in`, `has`, `like`, `is`):
//!   chains of them nest the AST without brackets (100,000 chained `+`,
//!   `.a` or `if ... else` overflowed a 2 MiB stack; `&&` chains and `!`
//!   Cedar handles itself, but one count for all keeps the rule simple).
//!
//! Strings and `//` comments are skipped. Both limits are far above what a
//! hand-written policy needs, and far below what a 2 MiB thread stack can
//! take (tests/tests/parsers.rs parses policies at both limits on such a
//! thread).

/// Deepest bracket nesting a policy file may have.
pub const MAX_NESTING: usize = 32;

/// Most operators one policy may have.
pub const MAX_OPERATORS: usize = 1000;

/// Where policy text nests too deep: the byte offset and why.
#[derive(Debug, PartialEq, Eq)]
pub struct TooDeep {
    pub offset: usize,
    pub reason: String,
}

/// Refuses policy `text` that nests brackets deeper than [`MAX_NESTING`]
/// or has a policy with more than [`MAX_OPERATORS`] operators.
pub fn check(text: &str) -> Result<(), TooDeep> {
    let bytes = text.as_bytes();
    let (mut depth, mut operators, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        let start = i;
        let b = bytes[i];
        i += 1;
        match b {
            b'"' => {
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'/' if bytes.get(i) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    let reason = format!("brackets nest deeper than {MAX_NESTING} levels (too deep to parse safely)");
                    return Err(TooDeep { offset: start, reason });
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => operators = 0,
            b'&' | b'|' | b'=' | b'!' | b'<' | b'>' | b'-' | b'+' | b'*' | b'.' => {
                // Two-character operators count once.
                if matches!((b, bytes.get(i)), (b'&', Some(b'&')) | (b'|', Some(b'|')) | (b'=' | b'!' | b'<' | b'>', Some(b'='))) {
                    i += 1;
                }
                operators += 1;
            }
            b if b.is_ascii_alphabetic() || b == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if matches!(&text[start..i], "if" | "in" | "has" | "like" | "is") {
                    operators += 1;
                }
            }
            _ => {}
        }
        if operators > MAX_OPERATORS {
            let reason = format!("the policy has more than {MAX_OPERATORS} operators (too deep to parse safely)");
            return Err(TooDeep { offset: start, reason });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_and_operator_chains_are_bounded_strings_and_comments_are_not() {
        let nested = |n: usize| format!("permit (principal, action, resource) when {{ {}true{} }};", "(".repeat(n), ")".repeat(n));
        assert_eq!(check(&nested(MAX_NESTING - 2)), Ok(()));
        let err = check(&nested(150)).unwrap_err();
        assert!(err.reason.contains("deeper than 32"), "{err:?}");
        assert_eq!(err.offset, nested(150).find("((").unwrap() + MAX_NESTING - 1, "the bracket one level too deep");
        let chain = |n: usize| format!("permit (principal, action, resource) when {{ true{} }};", " && true".repeat(n));
        assert_eq!(check(&chain(MAX_OPERATORS)), Ok(()));
        assert!(check(&chain(MAX_OPERATORS + 1)).unwrap_err().reason.contains("more than 1000 operators"));
        // Each policy has its own operator budget.
        assert_eq!(check(&chain(MAX_OPERATORS).repeat(3)), Ok(()));
        let quoted = format!("permit (principal, action, resource) when {{ context.s == \"{}\\\"\" }}; // {}", "((((".repeat(100), "!!".repeat(2000));
        assert_eq!(check(&quoted), Ok(()));
    }
}
