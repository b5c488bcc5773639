//! MetaStore versions and the rules for changing them.
//!
//! A change is allowed when it moves at most one minor version (up or down) within one major
//! version, and a downgrade never goes below the version that was running when the on-disk
//! format last moved: older binaries cannot read the newer format.
//!
//! Worked example: a cluster runs 1.2.3 on format 1, is upgraded to 1.3.0 and migrated to
//! format 2 there (`formatVersionSince` = 1.3.0). 1.3.0 → 1.4.x is allowed, 1.3.0 → 1.5.0 is a
//! skip, 1.4.x → 1.3.0 is a rollback that stays on a binary reading format 2, and 1.3.0 → 1.2.3
//! is refused because 1.2.3 predates format 2.

use std::cmp::Ordering;
use std::fmt;

use super::Refusal;

/// A `major.minor.patch[-pre]` version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
    /// Pre-release suffix (`rc.1`), if any.
    pub pre: Option<String>,
}

impl Version {
    /// Parses `1.2.3`, `v1.2.3` or `1.2.3-rc.1`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Version> {
        let text = text.strip_prefix('v').unwrap_or(text);
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre.to_string())),
            Some(_) => return None,
            None => (text, None),
        };
        let mut parts = core.split('.');
        let mut number = || -> Option<u64> {
            let part = parts.next()?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let (major, minor, patch) = (number()?, number()?, number()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Version {
            major,
            minor,
            patch,
            pre,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(pre) = &self.pre {
            write!(f, "-{pre}")?;
        }
        Ok(())
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (&self.pre, &other.pre) {
                // A release sorts after its pre-releases.
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Checks moving a cluster whose members run versions `lowest..=highest` to `target`.
///
/// `format_since` is the version that was running when the on-disk format last moved.
pub fn check_change(
    lowest: &Version,
    highest: &Version,
    target: &Version,
    format_since: Option<&Version>,
) -> Result<(), Refusal> {
    if target.major != lowest.major || target.major != highest.major {
        return Err(Refusal::MajorVersionChange {
            from: highest.to_string(),
            to: target.to_string(),
        });
    }
    if target.minor > lowest.minor + 1 {
        return Err(Refusal::VersionSkip {
            from: lowest.to_string(),
            to: target.to_string(),
        });
    }
    if target < highest {
        if highest.minor > target.minor + 1 {
            return Err(Refusal::VersionSkip {
                from: highest.to_string(),
                to: target.to_string(),
            });
        }
        if let Some(since) = format_since {
            if target < since {
                return Err(Refusal::DowngradeAfterFormatChange {
                    to: target.to_string(),
                    since: since.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).expect("test versions parse")
    }

    #[test]
    fn parse_and_print() {
        let cases = [
            ("1.2.3", Some("1.2.3")),
            ("v1.2.3", Some("1.2.3")),
            ("1.2.3-rc.1", Some("1.2.3-rc.1")),
            ("1.2", None),
            ("1.2.3.4", None),
            ("1.2.x", None),
            ("1.2.3-", None),
            ("", None),
            ("latest", None),
        ];
        for (text, want) in cases {
            let got = Version::parse(text).map(|v| v.to_string());
            assert_eq!(got.as_deref(), want, "{text}");
        }
    }

    #[test]
    fn ordering() {
        assert!(v("1.2.3") < v("1.2.4"));
        assert!(v("1.2.9") < v("1.10.0"));
        assert!(v("1.3.0-rc.1") < v("1.3.0"));
        assert!(v("1.3.0-rc.1") < v("1.3.0-rc.2"));
        assert_eq!(v("v1.3.0"), v("1.3.0"));
    }

    #[test]
    fn change_rules() {
        // (case, lowest, highest, target, format_since, allowed)
        let cases = [
            ("same version", "1.2.3", "1.2.3", "1.2.3", None, true),
            ("patch upgrade", "1.2.3", "1.2.3", "1.2.9", None, true),
            ("one minor up", "1.2.3", "1.2.3", "1.3.0", None, true),
            ("two minors up", "1.2.3", "1.2.3", "1.4.0", None, false),
            ("major up", "1.2.3", "1.2.3", "2.0.0", None, false),
            (
                "one minor up from mixed",
                "1.2.3",
                "1.3.0",
                "1.3.0",
                None,
                true,
            ),
            (
                "rollback before format moved",
                "1.2.3",
                "1.3.0",
                "1.2.3",
                None,
                true,
            ),
            (
                "rollback before format moved, since older",
                "1.3.0",
                "1.3.0",
                "1.2.3",
                Some("1.1.0"),
                true,
            ),
            (
                "rollback after format moved",
                "1.3.0",
                "1.3.0",
                "1.2.3",
                Some("1.3.0"),
                false,
            ),
            (
                "rollback to the format's own version",
                "1.4.0",
                "1.4.0",
                "1.3.0",
                Some("1.3.0"),
                true,
            ),
            ("two minors down", "1.4.0", "1.4.0", "1.2.0", None, false),
            ("patch downgrade", "1.3.2", "1.3.2", "1.3.1", None, true),
            (
                "skip from the lowest member",
                "1.2.0",
                "1.3.0",
                "1.4.0",
                None,
                false,
            ),
        ];
        for (case, lowest, highest, target, since, allowed) in cases {
            let since = since.map(v);
            let got = check_change(&v(lowest), &v(highest), &v(target), since.as_ref());
            assert_eq!(got.is_ok(), allowed, "{case}: {got:?}");
        }
    }
}
