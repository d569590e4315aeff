//! `--max-in-flight inventory=200,payment=100`: how many commands each
//! participant may have in flight at once. Parsed and checked here; the
//! dispatcher's driver holds back what is past a limit.

use std::{collections::BTreeMap, fmt, str::FromStr};

/// Most participants a limit list may name.
const MAX_ENTRIES: usize = 64;
/// Largest limit (a bigger one is no limit in practice, and likely a typo).
const MAX_LIMIT: usize = 1_000_000;

/// Commands in flight allowed per participant; a participant not named has
/// no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlightLimits(BTreeMap<String, usize>);

impl InFlightLimits {
    /// The limit of `participant`, if it has one.
    pub(crate) fn of(&self, participant: &str) -> Option<usize> {
        self.0.get(participant).copied()
    }

    /// Whether no participant has a limit.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for InFlightLimits {
    type Err = String;

    /// `name=limit` pairs separated by commas; empty for none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut limits = BTreeMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, limit) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected <participant>=<limit>"))?;
            let name = name.trim();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "`{name}`: a participant name is 1 to 64 letters, digits, `-` or `_`"
                ));
            }
            let limit: usize = limit
                .trim()
                .parse()
                .map_err(|_| format!("`{pair}`: the limit must be a whole number"))?;
            if !(1..=MAX_LIMIT).contains(&limit) {
                return Err(format!("`{pair}`: the limit must be 1 to {MAX_LIMIT}"));
            }
            if limits.insert(name.to_string(), limit).is_some() {
                return Err(format!("`{name}` is named twice"));
            }
            if limits.len() > MAX_ENTRIES {
                return Err(format!("at most {MAX_ENTRIES} participants"));
            }
        }
        Ok(InFlightLimits(limits))
    }
}

impl fmt::Display for InFlightLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self.0.iter().map(|(n, l)| format!("{n}={l}")).collect();
        f.write_str(&pairs.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_print_back() {
        let l: InFlightLimits = " inventory=200, payment=100 ".parse().expect("parses");
        assert_eq!(
            (l.of("inventory"), l.of("payment"), l.of("shipping")),
            (Some(200), Some(100), None)
        );
        assert_eq!(l.to_string(), "inventory=200,payment=100");
        assert!("".parse::<InFlightLimits>().expect("empty").is_empty());
    }

    #[test]
    fn bad_lists_are_refused_naming_the_pair() {
        for (input, says) in [
            ("inventory", "expected <participant>=<limit>"),
            ("inventory=0", "1 to 1000000"),
            ("inventory=-3", "whole number"),
            ("inventory=2000000", "1 to 1000000"),
            ("inv.entory=2", "participant name"),
            ("=2", "participant name"),
            ("a=1,a=2", "named twice"),
        ] {
            let e = input.parse::<InFlightLimits>().expect_err(input);
            assert!(e.contains(says), "{input}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("p{i}=1")).collect();
        assert!(many.join(",").parse::<InFlightLimits>().is_err());
    }
}
