//! The client's DNS name for upstream (XCLIENT NAME and REVERSE_NAME), from
//! the same PTR-plus-forward lookup as iprev, whatever iprev's mode: Postfix
//! behind us must see the client as it would have seen it itself.

use crate::wire::identity::DnsName;
use crate::wire::path;
use mail_auth::{IprevOutput, IprevResult};

/// `(NAME, REVERSE_NAME)`: the forward-confirmed name, and the PTR name
/// whether confirmed or not. A name that is not a valid host name (a
/// hostile PTR record) is treated as no name, so that upstream is never
/// sent an attribute it refuses.
pub fn from_iprev(r: &IprevOutput) -> (DnsName, DnsName) {
    let ptr = r
        .ptr
        .as_ref()
        .and_then(|p| p.first())
        .map(|n| n.trim_end_matches('.'))
        .filter(|n| n.is_ascii() && path::check_domain(n.as_bytes()).is_ok())
        .map(|n| DnsName::Known(n.to_ascii_lowercase()));
    match (r.result(), ptr) {
        (IprevResult::Pass, Some(name)) => (name.clone(), name),
        // The PTR name exists but does not map back (or not yet).
        (IprevResult::TempError(_), Some(name)) => (DnsName::TempUnavailable, name),
        (_, Some(name)) => (DnsName::Unavailable, name),
        (IprevResult::TempError(_), None) => (DnsName::TempUnavailable, DnsName::TempUnavailable),
        (_, None) => (DnsName::Unavailable, DnsName::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::{DnsError, Error};
    use std::sync::Arc;

    fn out(result: IprevResult, ptr: &[&str]) -> IprevOutput {
        IprevOutput {
            result,
            ptr: (!ptr.is_empty())
                .then(|| Arc::from(ptr.iter().map(|p| Box::from(*p)).collect::<Vec<_>>())),
        }
    }

    fn known(n: &str) -> DnsName {
        DnsName::Known(n.into())
    }

    #[test]
    fn names_follow_the_lookup() {
        let temp = || IprevResult::TempError(Error::Dns(DnsError::Resolver("timeout".into())));
        let perm = || IprevResult::PermError(Error::Dns(DnsError::Resolver("nx".into())));
        assert_eq!(
            from_iprev(&out(IprevResult::Pass, &["Mail.Good.test."])),
            (known("mail.good.test"), known("mail.good.test"))
        );
        assert_eq!(
            from_iprev(&out(IprevResult::Fail(Error::NotAligned), &["liar.test."])),
            (DnsName::Unavailable, known("liar.test"))
        );
        assert_eq!(
            from_iprev(&out(temp(), &["slow.test."])),
            (DnsName::TempUnavailable, known("slow.test"))
        );
        assert_eq!(
            from_iprev(&out(temp(), &[])),
            (DnsName::TempUnavailable, DnsName::TempUnavailable)
        );
        assert_eq!(
            from_iprev(&out(perm(), &[])),
            (DnsName::Unavailable, DnsName::Unavailable)
        );
        // A PTR record no MTA would take as a host name.
        assert_eq!(
            from_iprev(&out(IprevResult::Pass, &["bad name;rm.test."])),
            (DnsName::Unavailable, DnsName::Unavailable)
        );
    }
}
