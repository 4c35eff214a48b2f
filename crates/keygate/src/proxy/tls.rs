//! The TLS client configuration of `https://` upstreams (rustls, ring).

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::UpstreamError;
use crate::config::Roots;

pub(super) fn client_config(
    roots: Roots,
    extra_ca: &[Vec<u8>],
) -> Result<ClientConfig, UpstreamError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::Webpki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(UpstreamError::Tls(
                    "no usable certificate in the system's root store".to_owned(),
                ));
            }
        }
        Roots::None => {}
    }
    for pem in extra_ca {
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| UpstreamError::Ca(e.to_string()))?;
            store
                .add(cert)
                .map_err(|e| UpstreamError::Ca(e.to_string()))?;
            count += 1;
        }
        if count == 0 {
            return Err(UpstreamError::Ca(
                "no PEM CERTIFICATE block found".to_owned(),
            ));
        }
    }
    if store.is_empty() {
        return Err(UpstreamError::Tls(
            "no root certificate to verify https upstreams with".to_owned(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth())
}

/// An http(s) client verifying servers against `roots` and `extra_ca`.
pub(super) fn client<B>(
    roots: Roots,
    extra_ca: &[Vec<u8>],
    connect_timeout: Option<Duration>,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, UpstreamError>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let tls = client_config(roots, extra_ca)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(connect_timeout);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
