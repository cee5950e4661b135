//! End-to-end check in a real browser: renders the fake project's reports, opens them in
//! headless Chromium driven over the DevTools protocol (https://chromedevtools.github.io/devtools-protocol/),
//! and checks that each page loads with no console errors, no exceptions and no network request
//! besides the file itself. Saves full-page screenshots (desktop and narrow) under
//! `target/report-screenshots/` for a person to look at. Skipped when /usr/bin/chromium is absent.

use std::fs;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::report::tests::{build_fake_project, RUN_A, RUN_B};
use crate::report::write_report;

const CHROMIUM: &str = "/usr/bin/chromium";
const TIMEOUT: Duration = Duration::from_secs(60);

/// A headless Chromium we started, closed (then killed if need be) on drop.
struct Browser {
    child: Child,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    events: Vec<Value>,
}

impl Browser {
    fn launch(profile: &Path) -> Browser {
        let log = fs::File::create(profile.with_extension("log")).expect("chromium log file");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it picked and the browser target's path into the profile.
        let port_file = profile.join("DevToolsActivePort");
        let started = Instant::now();
        let (port, path) = loop {
            if let Ok(text) = fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break (port.to_string(), path.to_string());
                }
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "chromium wrote no DevToolsActivePort; see {}",
                profile.with_extension("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect to devtools");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let (socket, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream)
            .expect("devtools websocket");
        Browser {
            child,
            socket,
            next_id: 0,
            events: Vec::new(),
        }
    }

    fn read(&mut self) -> Value {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str()).expect("devtools json")
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    panic!("devtools: no message within {TIMEOUT:?}")
                }
                Err(e) => panic!("devtools: {e}"),
            }
        }
    }

    /// Sends a command and returns its result; events read meanwhile are kept.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .expect("devtools send");
        loop {
            let reply = self.read();
            if reply["id"] == json!(id) {
                assert!(
                    reply.get("error").is_none(),
                    "{method} failed: {}",
                    reply["error"]
                );
                return reply["result"].clone();
            }
            self.events.push(reply);
        }
    }

    fn wait_for(&mut self, method: &str) {
        if self.events.iter().any(|e| e["method"] == method) {
            return;
        }
        loop {
            let event = self.read();
            let found = event["method"] == method;
            self.events.push(event);
            if found {
                return;
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.next_id += 1;
        let close = json!({"id": self.next_id, "method": "Browser.close"}).to_string();
        let _ = self.socket.send(Message::text(close));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loads `page` at the given viewport width; returns problems seen and saves a full-page PNG.
fn load_and_capture(
    browser: &mut Browser,
    page: &Path,
    width: u32,
    mobile: bool,
    png: &Path,
    pdf: Option<&Path>,
) -> Vec<String> {
    let target = browser.call(None, "Target.createTarget", json!({"url": "about:blank"}));
    let target_id = target["targetId"].as_str().expect("target id").to_string();
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        json!({"targetId": target_id, "flatten": true}),
    );
    let session = attached["sessionId"]
        .as_str()
        .expect("session id")
        .to_string();
    let s = Some(session.as_str());
    for domain in [
        "Page.enable",
        "Runtime.enable",
        "Log.enable",
        "Network.enable",
    ] {
        browser.call(s, domain, json!({}));
    }
    browser.call(
        s,
        "Emulation.setDeviceMetricsOverride",
        json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile}),
    );
    browser.events.clear();
    let url = format!("file://{}", page.display());
    browser.call(s, "Page.navigate", json!({"url": url}));
    browser.wait_for("Page.loadEventFired");
    std::thread::sleep(Duration::from_millis(300));
    let resources = browser.call(s, "Runtime.evaluate", json!({"expression": "performance.getEntriesByType('resource').length", "returnByValue": true}));
    let layout = browser.call(s, "Page.getLayoutMetrics", json!({}));
    let content = &layout["cssContentSize"];
    let (page_width, page_height) = (
        content["width"].as_f64().unwrap_or(1280.0),
        content["height"].as_f64().unwrap_or(900.0),
    );
    let shot = browser.call(
        s,
        "Page.captureScreenshot",
        json!({"format": "png", "captureBeyondViewport": true, "clip": {"x": 0, "y": 0, "width": page_width, "height": page_height.min(16_000.0), "scale": 1}}),
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("screenshot base64");
    fs::write(png, bytes).expect("write screenshot");
    if let Some(pdf) = pdf {
        // Print layout (the @media print rules) must render too.
        let printed = browser.call(
            s,
            "Page.printToPDF",
            json!({"printBackground": true, "preferCSSPageSize": false}),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(printed["data"].as_str().expect("pdf data"))
            .expect("pdf base64");
        assert!(bytes.starts_with(b"%PDF"), "printToPDF gave no PDF");
        fs::write(pdf, bytes).expect("write pdf");
    }

    let mut problems = Vec::new();
    if resources["result"]["value"] != json!(0) {
        problems.push(format!(
            "page loaded resources: {}",
            resources["result"]["value"]
        ));
    }
    if page_width > f64::from(width) + 1.0 {
        problems.push(format!("page is {page_width}px wide in a {width}px window"));
    }
    for event in browser
        .events
        .iter()
        .filter(|e| e["sessionId"] == json!(session))
    {
        let params = &event["params"];
        match event["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => {
                problems.push(format!("exception: {}", params["exceptionDetails"]))
            }
            "Runtime.consoleAPICalled"
                if matches!(
                    params["type"].as_str(),
                    Some("error" | "assert" | "warning")
                ) =>
            {
                problems.push(format!("console {}: {}", params["type"], params["args"]))
            }
            "Log.entryAdded"
                if matches!(params["entry"]["level"].as_str(), Some("error" | "warning")) =>
            {
                problems.push(format!("log: {}", params["entry"]["text"]))
            }
            "Network.requestWillBeSent" if params["request"]["url"] != json!(url) => {
                problems.push(format!("network request: {}", params["request"]["url"]))
            }
            "Network.loadingFailed" => {
                problems.push(format!("loading failed: {}", params["errorText"]))
            }
            _ => {}
        }
    }
    browser.call(None, "Target.closeTarget", json!({"targetId": target_id}));
    problems
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshots");
    fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

#[test]
fn report_loads_in_chromium_without_errors_or_requests() {
    if !Path::new(CHROMIUM).exists() {
        crate::testing::test_skip(&format!(
            "{CHROMIUM} not installed (apt-get install -y chromium)"
        ));
        return;
    }
    let project = tempfile::tempdir().expect("temp dir");
    let runs = build_fake_project(project.path());
    let out = screenshot_dir();
    let single = write_report(&runs, RUN_A, None, Some(&out.join("report.html"))).expect("report");
    let compare =
        write_report(&runs, RUN_A, Some(RUN_B), Some(&out.join("compare.html"))).expect("report");
    let profile = project.path().join("chromium-profile");
    fs::create_dir_all(&profile).expect("profile dir");
    let mut browser = Browser::launch(&profile);
    let mut problems = Vec::new();
    for (page, name) in [(&single, "report"), (&compare, "compare")] {
        for (width, mobile, suffix) in [(1280, false, "desktop"), (390, true, "narrow")] {
            let png = out.join(format!("{name}-{suffix}.png"));
            let pdf = (!mobile).then(|| out.join(format!("{name}.pdf")));
            let found = load_and_capture(&mut browser, page, width, mobile, &png, pdf.as_deref());
            problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("{name} at {width}px: {p}")),
            );
            let size = fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
            assert!(size > 10_000, "{} is only {size} bytes", png.display());
            println!("screenshot: {}", png.display());
        }
    }
    // The checks themselves must catch a page that breaks the rules.
    let bad = out.join("bad.html");
    fs::write(&bad, "<!DOCTYPE html><html><body><img src=\"http://127.0.0.1:9/x.png\"><script>console.error('boom')</script></body></html>").expect("write");
    let caught = load_and_capture(&mut browser, &bad, 800, false, &out.join("bad.png"), None);
    drop(browser);
    let _ = fs::remove_file(&bad);
    let _ = fs::remove_file(out.join("bad.png"));
    assert!(
        caught
            .iter()
            .any(|p| p.contains("network request: \"http://127.0.0.1:9/x.png\"")),
        "{caught:#?}"
    );
    assert!(
        caught
            .iter()
            .any(|p| p.contains("console \"error\"") && p.contains("boom")),
        "{caught:#?}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}
