//! The console's static files, embedded in the binary (no CDN: closed
//! networks); Mermaid is stored gzipped and served as such. Each answer
//! carries an ETag of its content, so a browser revalidates instead of
//! downloading again, and a new build is never hidden behind a cache.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::OnceLock,
};

use axum::{
    extract::Path,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};

// Statics, not consts: a const is copied into every place that uses it (Mermaid is 0.79 MB).
static SCRIPT: &[u8] = include_bytes!("../../console/console.js");
static STYLE: &[u8] = include_bytes!("../../console/console.css");
static MERMAID_GZ: &[u8] = include_bytes!("../../console/vendor/mermaid-11.12.2.min.js.gz");

struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    gzipped: bool,
}

fn asset(name: &str) -> Option<Asset> {
    let (body, content_type, gzipped) = match name {
        "console.js" => (SCRIPT, "text/javascript; charset=utf-8", false),
        "console.css" => (STYLE, "text/css; charset=utf-8", false),
        // Every browser the console targets takes gzip; it is never decompressed here.
        "mermaid.min.js" => (MERMAID_GZ, "text/javascript; charset=utf-8", true),
        _ => return None,
    };
    Some(Asset {
        body,
        content_type,
        gzipped,
    })
}

/// A strong ETag per asset, computed once.
fn etag(name: &str) -> &'static str {
    static TAGS: OnceLock<[String; 3]> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let tag = |b: &[u8]| {
            let mut h = DefaultHasher::new();
            b.hash(&mut h);
            format!("\"{:016x}\"", h.finish())
        };
        [tag(SCRIPT), tag(STYLE), tag(MERMAID_GZ)]
    });
    match name {
        "console.js" => &tags[0],
        "console.css" => &tags[1],
        "mermaid.min.js" => &tags[2],
        _ => "",
    }
}

/// `GET /console/assets/{name}`.
pub(super) async fn serve(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(a) = asset(&name) else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let tag = etag(&name);
    let cache = (header::CACHE_CONTROL, "no-cache");
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(tag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag), cache]).into_response();
    }
    let mut res = (
        [(header::CONTENT_TYPE, a.content_type), (header::ETAG, tag), cache],
        a.body,
    )
        .into_response();
    if a.gzipped {
        res.headers_mut()
            .insert(header::CONTENT_ENCODING, header::HeaderValue::from_static("gzip"));
    }
    res
}
