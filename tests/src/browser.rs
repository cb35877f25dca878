//! A real browser for the web console's tests: headless Chromium driven over WebDriver by
//! ChromeDriver (Debian's `chromium` and `chromium-driver`, which `scripts/test` installs),
//! and plain HTTP requests for what a browser would not send.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where Debian puts them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header lines, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request to `addr` (`host:port`) and reads the whole answer; panics
/// after a minute without one.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            request.push_str(&format!("Host: {addr}\r\n"));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        // The head, then the body: by its length when given (a server may keep the connection
        // open), else to the end of the connection.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        let split = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "{addr} closed before its answer's head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        while length.is_none_or(|length| body.len() < length) {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        if headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Response {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} at {addr}: no answer within a minute"))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 || data.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = data.get(end + 2 + size + 2..).unwrap_or_default();
    }
    out
}

/// A headless Chromium session, its ChromeDriver stopped (by PID) when dropped.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    profile: std::path::PathBuf,
}

impl Browser {
    /// Starts ChromeDriver on a free port and opens a session with a 1280x900 window.
    pub async fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: the console's browser tests need Debian's `{package}` \
                 (`apt-get install chromium chromium-driver`; `scripts/test` installs them)"
            );
        }
        use std::os::unix::process::CommandExt as _;
        let port = crate::free_port();
        // A process group of its own, so that Chromium, its child, goes with it.
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(format!("saga-chromium-{}", uuid::Uuid::new_v4()));
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        let up = crate::wait_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(&browser.addr).await.is_ok()
        })
        .await;
        assert!(up, "chromedriver did not listen on {}", browser.addr);
        let created = browser
            .call(
                "POST",
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1280,900",
                                 format!("--user-data-dir={}", browser.profile.display())],
                    }
                }}}),
            )
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver call; panics with the driver's answer on an error.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    /// One WebDriver call; the driver's error as `Err`.
    async fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
        let body = if method == "GET" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let response = http(
            &self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
        )
        .await;
        let value: Value = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}: {}", response.text()));
        if response.status < 300 {
            Ok(value["value"].clone())
        } else {
            Err(value)
        }
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), json!({ "url": url }))
            .await;
    }

    /// The page's address now.
    pub async fn url(&self) -> String {
        self.call("GET", &self.at("/url"), Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The elements matching a CSS selector.
    pub async fn all(&self, css: &str) -> Vec<Element<'_>> {
        let found = self
            .call(
                "POST",
                &self.at("/elements"),
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| Element {
                browser: self,
                id: e[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("an element id in {e}"))
                    .to_owned(),
            })
            .collect()
    }

    /// The first element matching a CSS selector; panics, with the page, if there is none.
    pub async fn find(&self, css: &str) -> Element<'_> {
        match self.all(css).await.into_iter().next() {
            Some(e) => e,
            None => panic!(
                "no `{css}` on {}:\n{}",
                self.url().await,
                self.source().await
            ),
        }
    }

    /// The text of the first element matching `css`, or `None` when there is none (or it went
    /// stale: a page that reloads itself).
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let found = self
            .try_call(
                "POST",
                &self.at("/element"),
                json!({"using": "css selector", "value": css}),
            )
            .await
            .ok()?;
        let id = found[ELEMENT].as_str()?;
        let text = self
            .try_call("GET", &self.at(&format!("/element/{id}/text")), Value::Null)
            .await
            .ok()?;
        text.as_str().map(str::to_owned)
    }

    /// The text of the first element matching `css` once there is one (after a click that
    /// loads another page, say); panics after 10 s without.
    pub async fn wait_text(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = self.text_of(css).await {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{css}` on {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the page's address ends with `suffix` (a click that loads another page);
    /// panics after 10 s.
    pub async fn wait_url(&self, suffix: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.url().await.ends_with(suffix) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still at {}, not at …{suffix}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.call("GET", &self.at("/source"), Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` in the page and returns its result.
    pub async fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let data = self.call("GET", &self.at("/screenshot"), Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 PNG"))
            .expect("a PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (Chromium quits), then ChromeDriver's whole process group.
        if let Ok(mut stream) = std::net::TcpStream::connect(&self.addr) {
            use std::io::{Read as _, Write as _};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.session, self.addr
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read(&mut [0u8; 1024]);
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    /// Clicks it.
    pub async fn click(&self) {
        self.browser
            .call(
                "POST",
                &self.browser.at(&format!("/element/{}/click", self.id)),
                json!({}),
            )
            .await;
    }

    /// Types `text` into it.
    pub async fn type_text(&self, text: &str) {
        self.browser
            .call(
                "POST",
                &self.browser.at(&format!("/element/{}/value", self.id)),
                json!({ "text": text }),
            )
            .await;
    }

    /// Its rendered text.
    pub async fn text(&self) -> String {
        self.browser
            .call(
                "GET",
                &self.browser.at(&format!("/element/{}/text", self.id)),
                Value::Null,
            )
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}
