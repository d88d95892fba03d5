//! The names of a verified client certificate, which `auth.read_subjects`
//! and `auth.write_subjects` map to scopes.

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_cert::{
    Certificate,
    der::{Decode, Tag, Tagged, asn1::Any, oid::AssociatedOid, oid::db::rfc4519},
    ext::pkix::{SubjectAltName, name::GeneralName},
};

/// The names a client certificate claims: subject common names, and DNS
/// names and URIs among its subject alternative names.
pub(super) fn subject_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(cert) else {
        return Vec::new();
    };
    let tbs = &cert.tbs_certificate;
    let common_names = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|attribute| attribute.oid == rfc4519::CN)
        .filter_map(|attribute| directory_string(&attribute.value));
    let alt_names = tbs
        .extensions
        .iter()
        .flatten()
        .filter(|extension| extension.extn_id == SubjectAltName::OID)
        .filter_map(|extension| SubjectAltName::from_der(extension.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0)
        .filter_map(|name| match name {
            GeneralName::DnsName(name) | GeneralName::UniformResourceIdentifier(name) => {
                Some(name.to_string())
            }
            _ => None,
        });
    common_names.chain(alt_names).collect()
}

/// A DirectoryString's text, for the string types certificates use.
fn directory_string(value: &Any) -> Option<String> {
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(value.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}
