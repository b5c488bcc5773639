//! The subject common name of an X.509 certificate, read straight from its DER.
//!
//! Only what [`ClientIdentity`](super::ClientIdentity) needs: walk `Certificate →
//! TBSCertificate → subject` and take the `commonName` (OID 2.5.4.3) attribute. When a subject
//! has several, the last one wins, as Go's `pkix.Name.CommonName` (and so etcd) reads it. The
//! certificate has already been verified by rustls when this runs; anything malformed simply
//! yields `None`.

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
/// `[0] EXPLICIT Version` at the start of a TBSCertificate (absent for v1 certificates).
const TAG_VERSION: u8 = 0xa0;
/// 2.5.4.3, id-at-commonName.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// Splits one DER TLV off the front of `der`: `(tag, contents, rest)`.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        rest = rest.get(n..)?;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// Splits one TLV with the expected `tag`: `(contents, rest)`.
fn expect(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = tlv(der)?;
    (t == tag).then_some((contents, rest))
}

/// The subject common name of the DER certificate `cert`, if it has one.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (certificate, _) = expect(cert, TAG_SEQUENCE)?;
    let (tbs, _) = expect(certificate, TAG_SEQUENCE)?;
    let mut rest = tbs;
    if let Some((TAG_VERSION, _, r)) = tlv(rest) {
        rest = r;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (mut rdns, _) = expect(rest, TAG_SEQUENCE)?;
    let mut cn = None;
    while !rdns.is_empty() {
        let (mut set, r) = expect(rdns, TAG_SET)?;
        rdns = r;
        while !set.is_empty() {
            let (attribute, r) = expect(set, TAG_SEQUENCE)?;
            set = r;
            let (oid, value) = expect(attribute, TAG_OID)?;
            if oid == OID_COMMON_NAME {
                let (tag, bytes, _) = tlv(value)?;
                cn = Some(decode_string(tag, bytes)?);
            }
        }
    }
    cn
}

/// The directory-string types a common name can be written in.
fn decode_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String
        0x0c | 0x13 | 0x16 => String::from_utf8(bytes.to_vec()).ok(),
        // TeletexString: in practice Latin-1
        0x14 => Some(bytes.iter().map(|b| char::from(*b)).collect()),
        // BMPString: UTF-16 big endian
        0x1e => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(dn: rcgen::DistinguishedName) -> anyhow::Result<Vec<u8>> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate()?;
        Ok(params.self_signed(&key)?.der().to_vec())
    }

    #[test]
    fn reads_the_subject_common_name() -> anyhow::Result<()> {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "MetaStore");
        dn.push(rcgen::DnType::CommonName, "root");
        dn.push(rcgen::DnType::CountryName, "DE");
        assert_eq!(common_name(&cert_with(dn)?).as_deref(), Some("root"));

        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::PrintableString("app-1".try_into()?),
        );
        assert_eq!(common_name(&cert_with(dn)?).as_deref(), Some("app-1"));

        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::BmpString("ünï".try_into()?),
        );
        assert_eq!(common_name(&cert_with(dn)?).as_deref(), Some("ünï"));
        Ok(())
    }

    #[test]
    fn no_common_name_or_garbage_is_none() -> anyhow::Result<()> {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "MetaStore");
        let der = cert_with(dn)?;
        assert_eq!(common_name(&der), None);
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert_eq!(common_name(&der[..cut]), None, "cut at {cut}");
        }
        Ok(())
    }
}
