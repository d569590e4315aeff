//! The web console, served on the coordinator's HTTP port under `/console`
//! (`--no-console` turns it off): server-rendered pages over the same
//! `SagaService` the gRPC clients use (one place validates and authorizes),
//! a little script, and every asset embedded in the binary.
//!
//! Trust: read pages need nothing unless `--console-token` is set (then
//! HTTP Basic with that token as the password, on every route). Write
//! actions need the operator token in `X-Saga-Operator-Token`, sent by the
//! page's script from the tab's session storage (never a URL or a cookie),
//! and the page's CSRF token in `X-Saga-Console`; a cross-site request is
//! refused before either is looked at.

mod actions;
mod assets;
mod pages;

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use base64::{
    alphabet,
    engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig},
    Engine as _,
};
use subtle::ConstantTimeEq;

use crate::{
    api::SagaApi,
    definition::Catalog,
    store::{SharedStore, StateCounts},
};

/// Standard base64, padded or not (browsers pad; curl's `-u` too, others may not).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the console reads and acts through.
#[derive(Clone)]
pub(crate) struct Console {
    api: Arc<SagaApi>,
    store: SharedStore,
    catalog: Catalog,
    /// Required on every action (`X-Saga-Console`); random per process.
    csrf: Arc<str>,
    /// `--console-token`: when set, every console route needs it (HTTP Basic password).
    read_token: Option<Arc<str>>,
    /// The last counts per state and when they were read (see `pages::counts`).
    counts: Arc<Mutex<Option<(Instant, StateCounts)>>>,
}

impl Console {
    pub(crate) fn new(
        api: Arc<SagaApi>,
        store: SharedStore,
        catalog: Catalog,
        read_token: Option<String>,
    ) -> Self {
        let csrf = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        Console {
            api,
            store,
            catalog,
            csrf: csrf.into(),
            read_token: read_token.map(Into::into),
            counts: Default::default(),
        }
    }

    /// The console's routes, to be merged into the HTTP server's router.
    pub(crate) fn router(self) -> Router {
        Router::new()
            .route("/console", get(pages::home))
            .route("/console/", get(pages::home))
            .route("/console/sagas", get(pages::sagas))
            .route("/console/sagas/{id}", get(pages::saga))
            .route("/console/sagas/{id}/live", get(pages::live))
            .route("/console/definitions", get(pages::definitions))
            .route("/console/assets/{name}", get(assets::serve))
            .route("/console/api/sagas/{id}/abort", post(actions::abort))
            .route("/console/api/sagas/{id}/retry", post(actions::retry))
            .route("/console/api/bulk", post(actions::bulk))
            .layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self)
    }
}

/// Every console request: the read token when one is set; for a POST also
/// same-origin and the CSRF token. Security headers on every answer.
async fn guard(State(c): State<Console>, req: Request, next: Next) -> Response {
    if let Some(expected) = &c.read_token {
        if !basic_password_is(req.headers(), expected) {
            crate::telemetry::console_refused("read_token");
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"saga console\", charset=\"UTF-8\"",
                )],
                "the console needs its token (--console-token): any user name, the token as the password\n",
            )
                .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        if let Err(why) = same_origin(req.headers()) {
            crate::telemetry::console_refused("cross_site");
            return actions::refused(StatusCode::FORBIDDEN, why);
        }
        let sent = req
            .headers()
            .get("x-saga-console")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(sent.ct_eq(c.csrf.as_bytes())) {
            crate::telemetry::console_refused("csrf");
            return actions::refused(
                StatusCode::FORBIDDEN,
                "missing or stale X-Saga-Console token: reload the page".into(),
            );
        }
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    // Only our own script and style; Mermaid draws with inline styles in its SVG.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    res
}

/// Whether `Authorization: Basic` carries `expected` as its password.
fn basic_password_is(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    let encoded = encoded.trim();
    if encoded.len() > 4096 {
        return false;
    }
    let Ok(decoded) = BASE64.decode(encoded) else {
        return false;
    };
    let password = decoded.splitn(2, |b| *b == b':').nth(1).unwrap_or_default();
    bool::from(password.ct_eq(expected.as_bytes()))
}

/// A POST from a page of another site is refused: the browser says so in
/// `Sec-Fetch-Site`, or its `Origin` names another host than `Host`.
fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return Err(format!("cross-site request refused (Sec-Fetch-Site: {site})"));
        }
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        if origin_host.is_none() || origin_host != host {
            return Err("cross-origin request refused (Origin is not this console)".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn basic_auth_takes_the_token_as_the_password_only() {
        // "ops:s3cret" and ":s3cret"
        assert!(basic_password_is(
            &headers(&[("authorization", "Basic b3BzOnMzY3JldA==")]),
            "s3cret"
        ));
        assert!(basic_password_is(
            &headers(&[("authorization", "Basic OnMzY3JldA")]),
            "s3cret"
        ));
        assert!(!basic_password_is(
            &headers(&[("authorization", "Basic b3BzOnMzY3JldA==")]),
            "other"
        ));
        assert!(!basic_password_is(
            &headers(&[("authorization", "Bearer s3cret")]),
            "s3cret"
        ));
        assert!(!basic_password_is(
            &headers(&[("authorization", "Basic !!!")]),
            "s3cret"
        ));
        assert!(!basic_password_is(&HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn only_same_origin_posts_pass() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9464")])).is_ok());
        let same = headers(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "http://127.0.0.1:9464"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(same_origin(&same).is_ok());
        let other = headers(&[("host", "127.0.0.1:9464"), ("origin", "https://evil.example")]);
        assert!(same_origin(&other).is_err());
        let cross = headers(&[("host", "127.0.0.1:9464"), ("sec-fetch-site", "cross-site")]);
        assert!(same_origin(&cross).is_err());
        let null = headers(&[("host", "127.0.0.1:9464"), ("origin", "null")]);
        assert!(same_origin(&null).is_err());
    }
}
