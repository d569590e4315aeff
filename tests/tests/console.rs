//! The web console: its guard over plain HTTP, then the pages in a real
//! browser (Debian's chromium, driven by chromedriver over WebDriver), against
//! a real nats-server, inventory, a scripted participant and the coordinator.
//! Screenshots of the main pages go to `target/console-screenshots/`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use saga_proto::pb::{self, SagaState};
use saga_testkit::*;
use saga_wire::Reply;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "console-operator-token-0123";
const WAIT: Duration = Duration::from_secs(20);

/// `fake` (its `do`, `undo` scripted by the test) then the inventory's reserve.
fn definitions(dir: &std::path::Path) -> Result<PathBuf> {
    let defs = dir.join("console-defs");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(
        defs.join("fake.yaml"),
        "name: fake\nversion: 1\ndefaults:\n  timeout: 300ms\n  retry: { max_attempts: 1000, initial_backoff: 10ms, \
         max_backoff: 50ms, multiplier: 2.0, jitter: false }\nsteps:\n  - name: fake-step\n    participant: fake\n    \
         action: do\n    compensation: undo\n    input: { channel: console }\n    compensation_input: { why: aborted }\n  \
         - name: reserve-inventory\n    participant: inventory\n    \
         action: reserve\n    compensation: release\n    timeout: 5s\n",
    )?;
    Ok(defs)
}

/// What the scripted participant does: hold `do` unanswered, refuse `undo`.
#[derive(Clone, Default)]
struct Script {
    hold: Arc<AtomicBool>,
    refuse_undo: Arc<AtomicBool>,
}

struct Setup {
    system: System,
    http: SocketAddr,
    _fake: FakeParticipant,
    script: Script,
    _definitions: tempfile::TempDir,
}

async fn setup(tweak: impl FnOnce(&mut coordinator::Config)) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let defs = definitions(dir.path())?;
    let mut system = System::bare(Some(defs)).await?;
    system.start_inventory().await?;
    let script = Script::default();
    let s = script.clone();
    let fake = FakeParticipant::start(&system.client, "fake", move |cmd, _| match cmd.action.as_str() {
        "do" if s.hold.load(Ordering::SeqCst) => FakeAnswer::Silent,
        "undo" if s.refuse_undo.load(Ordering::SeqCst) => FakeAnswer::Reply(Reply::rejected("ledger closed")),
        _ => FakeAnswer::Reply(Reply::ok(serde_json::json!({"ref": "f-1"}))),
    })
    .await?;
    let c = RunningCoordinator::start_with(
        &system.nats.access(),
        &system.dir.path().join("coordinator"),
        &system.definitions,
        |c| {
            c.operator_token = Some(TOKEN.into());
            tweak(c);
        },
    )
    .await?;
    c.wait_ready().await?;
    let http = c.http_addr;
    system.coordinator = Some(c);
    Ok(Setup {
        system,
        http,
        _fake: fake,
        script,
        _definitions: dir,
    })
}

async fn place(s: &System, customer: &str, items: &[(&str, u32)]) -> Result<String> {
    let req = pb::CreateOrderRequest {
        definition: "fake".into(),
        ..order(customer, items, 100)
    };
    Ok(s.grpc().await?.create_order(req).await?.into_inner().saga_id)
}

async fn state(s: &System, id: &str) -> Result<i32> {
    let got = s
        .grpc()
        .await?
        .get_saga(pb::GetSagaRequest { saga_id: id.into() })
        .await?;
    Ok(got.into_inner().state)
}

async fn wait_state(s: &System, id: &str, want: SagaState) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = state(s, id).await?;
        if now == want as i32 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("saga {id} is {now}, not {want:?}, after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 request: `(status, head, body)`.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of head")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, head, raw[split + 4..].to_vec()))
}

fn csrf_of(page: &[u8]) -> Result<String> {
    let page = String::from_utf8_lossy(page);
    let at = page
        .find("name=\"saga-csrf\" content=\"")
        .context("no csrf meta")?;
    let rest = &page[at + "name=\"saga-csrf\" content=\"".len()..];
    Ok(rest[..rest.find('"').context("csrf end")?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_guards_its_actions_and_serves_its_assets_embedded() -> Result<()> {
    let s = setup(|_| {}).await?;
    s.script.hold.store(true, Ordering::SeqCst);
    let id = place(&s.system, "c-1", &[("A-1", 1)]).await?;
    let (code, _, page) = http(s.http, "GET", "/console/sagas", &[], "").await?;
    assert_eq!(code, 200);
    assert!(
        String::from_utf8_lossy(&page).contains(&id),
        "the list shows the saga"
    );
    let csrf = csrf_of(&page)?;
    let abort = format!("/console/api/sagas/{id}/abort");
    let bearer = TOKEN.to_string();
    let json = ("Content-Type", "application/json");
    // No CSRF token; a stale one; another site's page: refused before the token is looked at.
    for headers in [
        vec![json, ("X-Saga-Operator-Token", bearer.as_str())],
        vec![
            json,
            ("X-Saga-Operator-Token", bearer.as_str()),
            ("X-Saga-Console", "stale"),
        ],
        vec![
            json,
            ("X-Saga-Operator-Token", bearer.as_str()),
            ("X-Saga-Console", csrf.as_str()),
            ("Origin", "https://evil.example"),
        ],
        vec![
            json,
            ("X-Saga-Operator-Token", bearer.as_str()),
            ("X-Saga-Console", csrf.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
    ] {
        let (code, _, body) = http(s.http, "POST", &abort, &headers, r#"{"reason":"x"}"#).await?;
        assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    }
    // Without the operator token, and with a wrong one.
    let (code, _, body) = http(s.http, "POST", &abort, &[json, ("X-Saga-Console", &csrf)], "{}").await?;
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("operator token"));
    let wrong = "wrong-token-0123456789";
    let (code, _, _) = http(
        s.http,
        "POST",
        &abort,
        &[json, ("X-Saga-Console", &csrf), ("X-Saga-Operator-Token", wrong)],
        "{}",
    )
    .await?;
    assert_eq!(code, 403);
    let (code, _, _) = http(
        s.http,
        "POST",
        "/console/api/bulk",
        &[json, ("X-Saga-Console", &csrf)],
        r#"{"action":"abort","confirm":false}"#,
    )
    .await?;
    assert_eq!(code, 401, "no count without the token");
    assert_eq!(
        state(&s.system, &id).await?,
        SagaState::Running as i32,
        "nothing changed"
    );
    // Malformed bodies are refused; then the real thing.
    let ok_headers = [
        json,
        ("X-Saga-Console", csrf.as_str()),
        ("X-Saga-Operator-Token", bearer.as_str()),
    ];
    let (code, _, _) = http(s.http, "POST", &abort, &ok_headers, r#"{"reason":"x","extra":1}"#).await?;
    assert_eq!(code, 422);
    let (code, _, _) = http(
        s.http,
        "POST",
        "/console/api/bulk",
        &ok_headers,
        r#"{"action":"delete"}"#,
    )
    .await?;
    assert_eq!(code, 400);
    let (code, _, body) = http(
        s.http,
        "POST",
        &abort,
        &ok_headers,
        r#"{"reason":"from the console"}"#,
    )
    .await?;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    s.script.hold.store(false, Ordering::SeqCst);
    wait_state(&s.system, &id, SagaState::Compensated).await?;
    // The pages and the assets, with their security headers.
    for path in [
        format!("/console/sagas/{id}"),
        "/console/definitions".into(),
        format!("/console/definitions?saga={id}"),
    ] {
        let (code, head, body) = http(s.http, "GET", &path, &[], "").await?;
        assert_eq!(code, 200, "{path}");
        assert!(
            head.to_ascii_lowercase().contains("content-security-policy"),
            "{head}"
        );
        assert!(String::from_utf8_lossy(&body).contains("fake@1"), "{path}");
    }
    // The saga's page shows the input the step was sent with, and its compensation's.
    let (_, _, body) = http(s.http, "GET", &format!("/console/sagas/{id}"), &[], "").await?;
    let body = String::from_utf8_lossy(&body);
    for want in ["channel&quot;:&quot;console", "why&quot;:&quot;aborted"] {
        assert!(body.contains(want), "{want} in the step's page");
    }
    let (code, head, body) = http(s.http, "GET", "/console/assets/mermaid.min.js", &[], "").await?;
    assert_eq!(code, 200);
    assert!(head.to_ascii_lowercase().contains("content-encoding: gzip"));
    assert!(body.starts_with(&[0x1f, 0x8b]), "gzip bytes");
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: ").or_else(|| l.strip_prefix("ETag: ")))
        .context("no etag")?
        .trim()
        .to_string();
    let (code, _, _) = http(
        s.http,
        "GET",
        "/console/assets/mermaid.min.js",
        &[("If-None-Match", &etag)],
        "",
    )
    .await?;
    assert_eq!(code, 304);
    let (code, _, _) = http(s.http, "GET", "/console/assets/..%2Fsecret", &[], "").await?;
    assert_eq!(code, 404);
    let (code, _, _) = http(s.http, "GET", "/console/sagas?state=bogus", &[], "").await?;
    assert_eq!(code, 400);
    let (code, _, _) = http(s.http, "GET", "/console/sagas/not-a-uuid", &[], "").await?;
    assert_eq!(code, 400);
    s.system.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_token_closes_every_page_and_no_console_serves_none() -> Result<()> {
    let s = setup(|c| c.console_token = Some("console-read-token-0123".into())).await?;
    let (code, head, _) = http(s.http, "GET", "/console/sagas", &[], "").await?;
    assert_eq!(code, 401);
    assert!(
        head.to_ascii_lowercase().contains("www-authenticate: basic"),
        "{head}"
    );
    // "ops:console-read-token-0123" and a wrong password.
    let good = "Basic b3BzOmNvbnNvbGUtcmVhZC10b2tlbi0wMTIz";
    let (code, _, _) = http(s.http, "GET", "/console/sagas", &[("Authorization", good)], "").await?;
    assert_eq!(code, 200);
    let (code, _, _) = http(
        s.http,
        "GET",
        "/console/sagas",
        &[("Authorization", "Basic b3BzOndyb25n")],
        "",
    )
    .await?;
    assert_eq!(code, 401);
    let (code, _, _) = http(s.http, "GET", "/metrics", &[], "").await?;
    assert_eq!(code, 200, "the console token guards the console only");
    // An action carries both: the browser's Basic credentials and the operator token.
    s.script.hold.store(true, Ordering::SeqCst);
    let id = place(&s.system, "c-1", &[("A-1", 1)]).await?;
    let (_, _, page) = http(s.http, "GET", "/console/sagas", &[("Authorization", good)], "").await?;
    let csrf = csrf_of(&page)?;
    let abort = format!("/console/api/sagas/{id}/abort");
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", good),
        ("X-Saga-Console", csrf.as_str()),
        ("X-Saga-Operator-Token", TOKEN),
    ];
    let (code, _, _) = http(s.http, "POST", &abort, &headers[..3], "{}").await?;
    assert_eq!(code, 401, "without the operator token");
    let (code, _, body) = http(s.http, "POST", &abort, &headers, r#"{"reason":"test"}"#).await?;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    s.script.hold.store(false, Ordering::SeqCst);
    wait_state(&s.system, &id, SagaState::Compensated).await?;
    s.system.shutdown().await?;
    let s = setup(|c| c.no_console = true).await?;
    let (code, _, _) = http(s.http, "GET", "/console/sagas", &[], "").await?;
    assert_eq!(code, 404);
    s.system.shutdown().await
}

/// chromedriver on a port it picked (it reports it), and a headless chromium session.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

async fn browser() -> Result<Browser> {
    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let mut driver = tokio::process::Command::new(&driver_bin)
        .arg("--port=0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!("{driver_bin}: not found; install chromium and chromium-driver (make tools)")
        })?;
    let stdout = driver.stdout.take().context("chromedriver stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(p) = line.split("started successfully on port ").nth(1) {
                return p
                    .trim_end_matches('.')
                    .trim()
                    .parse::<u16>()
                    .map_err(|e| anyhow!("port: {e}"));
            }
        }
        Err(anyhow!("chromedriver exited without a port"))
    })
    .await??;
    // Keep reading its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"],
        }),
    );
    caps.insert("unhandledPromptBehavior".into(), "ignore".into());
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| anyhow!("WebDriver session: {e}"))?;
    Ok(Browser {
        client,
        _driver: driver,
    })
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
}

async fn screenshot(c: &Client, name: &str) -> Result<()> {
    let dir = screenshots();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.png")), c.screenshot().await?)?;
    Ok(())
}

/// Waits until `css` matches an element whose text contains `text`.
async fn wait_text(c: &Client, css: &str, text: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if e.text().await.unwrap_or_default().contains(text) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            let body = c.source().await.unwrap_or_default();
            bail!(
                "no `{css}` with `{text}` after {WAIT:?}; page:\n{}",
                &body[..body.len().min(3000)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks `css`, finding it again when the live view replaced it meanwhile.
async fn click(c: &Client, css: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..20 {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err.to_string()),
            },
            Err(err) => last = Some(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("could not click `{css}`: {}", last.unwrap_or_default())
}

/// The alert open now: its text, after waiting for it to appear.
async fn alert(c: &Client) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.get_alert_text().await {
            Ok(t) => return Ok(t),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => bail!("no prompt: {e}"),
        }
    }
}

/// Marks the page; [`not_reloaded`] checks the mark is still there.
async fn mark(c: &Client) -> Result<()> {
    c.execute("window.__notReloaded = true;", vec![]).await?;
    Ok(())
}

async fn not_reloaded(c: &Client) -> Result<()> {
    let v = c.execute("return window.__notReloaded === true;", vec![]).await?;
    if v != serde_json::Value::Bool(true) {
        bail!("the page was reloaded");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_lists_follows_draws_and_acts() -> Result<()> {
    let s = setup(|_| {}).await?;
    let b = browser().await?;
    let c = &b.client;
    let base = format!("http://{}", s.http);
    let result = async {
        // A new saga appears in the list without a reload.
        c.goto(&format!("{base}/console/sagas")).await?;
        mark(c).await?;
        let first = place(&s.system, "c-1", &[("A-1", 1)]).await?;
        wait_state(&s.system, &first, SagaState::Completed).await?;
        wait_text(c, &format!("tr[data-saga='{first}']"), "COMPLETED").await?;
        not_reloaded(c).await?;
        let second = place(&s.system, "c-2", &[("A-1", 1)]).await?;
        wait_state(&s.system, &second, SagaState::Completed).await?;
        wait_text(c, &format!("tr[data-saga='{second}']"), "c-2").await?;
        screenshot(c, "sagas").await?;

        // The filters narrow the list.
        c.find(Locator::Css("input[name='customer']"))
            .await?
            .send_keys("c-2")
            .await?;
        c.find(Locator::Css("form#filters button[type='submit']"))
            .await?
            .click()
            .await?;
        wait_text(c, "#sagas tbody", &second).await?;
        let rows = c.find_all(Locator::Css("#sagas tbody tr[data-saga]")).await?;
        assert_eq!(rows.len(), 1, "only c-2's saga");

        // A running saga's page moves to its terminal state by itself.
        s.script.hold.store(true, Ordering::SeqCst);
        let held = place(&s.system, "c-3", &[("A-1", 1)]).await?;
        c.goto(&format!("{base}/console/sagas/{held}")).await?;
        wait_text(c, "#saga-state", "RUNNING").await?;
        mark(c).await?;
        screenshot(c, "saga-running").await?;
        s.script.hold.store(false, Ordering::SeqCst);
        wait_text(c, "#saga-state", "COMPLETED").await?;
        not_reloaded(c).await?;
        wait_text(c, "#history", "completed").await?;

        // The definitions' graphs render (Mermaid draws an SVG), and one saga's path.
        c.goto(&format!("{base}/console/definitions")).await?;
        c.wait()
            .at_most(WAIT)
            .for_element(Locator::Css("pre.mermaid svg"))
            .await?;
        screenshot(c, "definitions").await?;
        c.goto(&format!("{base}/console/definitions?saga={held}")).await?;
        c.wait()
            .at_most(WAIT)
            .for_element(Locator::Css("pre.mermaid svg"))
            .await?;

        // An abort without the token changes nothing; with it the saga compensates.
        s.script.hold.store(true, Ordering::SeqCst);
        let doomed = place(&s.system, "c-4", &[("A-1", 1)]).await?;
        c.goto(&format!("{base}/console/sagas/{doomed}")).await?;
        wait_text(c, "#saga-state", "RUNNING").await?;
        click(c, "button[data-action='abort']").await?;
        assert!(alert(c).await?.contains("Why abort"));
        c.send_alert_text("customer called").await?;
        c.accept_alert().await?;
        assert!(alert(c).await?.contains("Operator token"));
        c.dismiss_alert().await?;
        wait_text(c, "#flash", "operator token is needed").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            state(&s.system, &doomed).await?,
            SagaState::Running as i32,
            "no token, no abort"
        );
        click(c, "button[data-action='abort']").await?;
        alert(c).await?;
        c.send_alert_text("customer called").await?;
        c.accept_alert().await?;
        alert(c).await?;
        c.send_alert_text(TOKEN).await?;
        c.accept_alert().await?;
        wait_text(c, "#flash", "Aborted").await?;
        s.script.hold.store(false, Ordering::SeqCst);
        wait_state(&s.system, &doomed, SagaState::Compensated).await?;
        wait_text(c, "#saga-state", "COMPENSATED").await?;

        // A bulk retry of two FAILED sagas (their undo refused, then allowed).
        s.script.refuse_undo.store(true, Ordering::SeqCst);
        let failed = [
            place(&s.system, "c-5", &[("RARE-1", 5)]).await?,
            place(&s.system, "c-5", &[("RARE-1", 5)]).await?,
        ];
        for id in &failed {
            wait_state(&s.system, id, SagaState::Failed).await?;
        }
        s.script.refuse_undo.store(false, Ordering::SeqCst);
        c.goto(&format!("{base}/console/sagas?state=failed")).await?;
        wait_text(c, "#sagas tbody", &failed[1]).await?;
        screenshot(c, "failed").await?;
        // The token was kept for this tab: only the confirmation is asked.
        click(c, "button[data-action='bulk-retry']").await?;
        let confirm = alert(c).await?;
        assert!(confirm.contains("Retry 2 FAILED"), "{confirm}");
        c.accept_alert().await?;
        wait_text(c, "#flash", "retry: 2 done, 0 refused").await?;
        for id in &failed {
            wait_state(&s.system, id, SagaState::Compensated).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let _ = screenshot(c, "failure").await;
    }
    b.client.close().await?;
    result?;
    s.system.shutdown().await
}
