//! The status page at `/` in a real browser: `cac-edge serve` (the built binary) on the demo
//! bundle with a folder camera and a camera that cannot connect, read by Debian's
//! chromium-headless-shell (`--dump-dom`, `--screenshot`). The expected label comes from
//! `cac-edge classify` on the same image, bundle and cache. Every wait is bounded; the service and
//! the browser are killed on drop, also when an assertion fails.
#![cfg(feature = "serve")]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::served::{free_port, get_with_headers, Served, WAIT};
use common::{cache_build_cli, text};

/// One chromium run; a hung one is killed.
const CHROMIUM_RUN: Duration = Duration::from_secs(30);
/// Where Debian's package puts it (scripts/setup-test-services installs it).
const CHROMIUM: &str = "/usr/bin/chromium-headless-shell";
/// The README's screenshot, rewritten when this variable is 1.
const UPDATE_SCREENSHOT: &str = "CAC_EDGE_UPDATE_SCREENSHOT";
/// The same threshold for the service and for `classify`, so that their decisions compare.
const THRESHOLD: &str = "0.5";

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo")
}

/// The demo bundle's cache, built by the binary in `dir` (as tests/serve.rs builds the test
/// bundle's).
fn demo_cache(dir: &Path) -> PathBuf {
    let cache = dir.join("demo.safetensors");
    let output = cache_build_cli(&demo(), &demo().join("classes.txt"), &demo().join("base.txt"), &cache);
    assert!(output.status.success(), "cache build failed: {}", text(&output.stderr));
    cache
}

/// Clearly drawn demo images (their paths only: the labels the page must show come from
/// `classify`).
fn demo_images() -> Vec<PathBuf> {
    let list = std::fs::read_to_string(demo().join("images/clear.csv")).expect("onnx/demo/images/clear.csv");
    let images: Vec<PathBuf> =
        list.lines().skip(1).filter_map(|line| line.split(',').next()).map(|path| demo().join("images").join(path)).collect();
    assert!(images.len() >= 5, "clear.csv lists at least 5 images");
    images
}

/// The demo bundle's config: `cameras` are `[[camera]]` tables.
fn write_demo_config(dir: &Path, cache: &Path, port: u16, cameras: &str) -> PathBuf {
    let config = dir.join("serve.toml");
    let text = format!(
        "[model]\nbundle = \"{}\"\ncache = \"{}\"\ndevice = \"cpu\"\nthreads = 1\nthreshold = {THRESHOLD}\n\n[service]\nhttp = \"127.0.0.1:{port}\"\n\n{cameras}\n",
        demo().display(),
        cache.display()
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// chromium-headless-shell, or a failure that says how to install it: a browser test that
/// silently skipped would let a broken page through.
fn chromium() -> PathBuf {
    if Path::new(CHROMIUM).exists() {
        return PathBuf::from(CHROMIUM);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path).map(|dir| dir.join("chromium-headless-shell")).find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!("chromium-headless-shell is not installed: run scripts/setup-test-services (Debian package chromium-headless-shell)")
        })
}

/// A chromium run in its own process group; the whole group (renderer, GPU process) is killed
/// on drop.
struct Browser {
    child: Child,
}

impl Browser {
    /// Runs chromium on `url` with `args`; its stdout, or a failure after [`CHROMIUM_RUN`].
    fn run(profile: &Path, args: &[String], url: &str) -> String {
        use std::os::unix::process::CommandExt;
        let mut browser = Command::new(chromium());
        browser.args(chromium_flags(profile)).args(args).arg(url);
        browser.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut guard = Browser { child: browser.spawn().expect("start chromium-headless-shell") };
        let read = |pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let mut pipe = pipe;
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = read(Box::new(guard.child.stdout.take().expect("stdout")));
        let stderr = read(Box::new(guard.child.stderr.take().expect("stderr")));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = guard.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(start.elapsed() < CHROMIUM_RUN, "chromium did not finish within {CHROMIUM_RUN:?}: {browser:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = text(&stderr.join().expect("stderr reader"));
        assert!(status.success(), "chromium failed ({status}): {browser:?}\n{stderr}");
        text(&stdout.join().expect("stdout reader"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The negative id names the process group (chromium's helpers with it).
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The flags of every run (the report lists the exact command line). Virtual time lets the page
/// poll several times without the test waiting for it in real time; the profile stays in the
/// test's temporary folder.
fn chromium_flags(profile: &Path) -> Vec<String> {
    vec![
        "--headless".to_string(),
        "--disable-gpu".to_string(),
        "--no-sandbox".to_string(),
        "--hide-scrollbars".to_string(),
        "--run-all-compositor-stages-before-draw".to_string(),
        "--virtual-time-budget=8000".to_string(),
        format!("--user-data-dir={}", profile.display()),
    ]
}

/// One camera's card as the browser left it.
struct Card {
    /// The `<section …>` tag.
    tag: String,
    /// Its inner HTML.
    inner: String,
}

impl Card {
    /// The card of `camera` in a `--dump-dom` page (the `<template>`'s card has no name).
    fn find(dom: &str, camera: &str) -> Option<Card> {
        let at = dom.find(&format!("data-camera=\"{camera}\""))?;
        let start = dom[..at].rfind("<section")?;
        let tag_end = start + dom[start..].find('>')?;
        let end = tag_end + dom[tag_end..].find("</section>")?;
        Some(Card { tag: dom[start..=tag_end].to_string(), inner: dom[tag_end + 1..end].to_string() })
    }

    fn attribute(&self, name: &str) -> Option<String> {
        let value = self.tag.split(&format!(" {name}=\"")).nth(1)?;
        Some(unescape(&value[..value.find('"')?]))
    }

    /// The text of the first element of `class` (no child elements in those the test reads).
    fn text_of(&self, class: &str) -> Option<String> {
        let marker = format!("class=\"{class}\"");
        let after = &self.inner[self.inner.find(&marker)? + marker.len()..];
        let after = &after[after.find('>')? + 1..];
        Some(unescape(&after[..after.find('<')?]))
    }

    /// The `<img …>` tag of the camera's frame.
    fn image_tag(&self) -> Option<&str> {
        let at = self.inner.find("<img")?;
        Some(&self.inner[at..at + self.inner[at..].find('>')?])
    }

    /// The number of points of the chart's polyline of `class`.
    fn polyline_points(&self, class: &str) -> Option<usize> {
        let at = self.inner.find(&format!("class=\"{class}\""))?;
        let tag = &self.inner[at..at + self.inner[at..].find('>')?];
        let points = tag.split("points=\"").nth(1)?;
        Some(points[..points.find('"')?].split_whitespace().count())
    }
}

fn unescape(html: &str) -> String {
    html.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&")
}

/// What the browser shows of each camera once the page has polled.
struct Shown {
    dock: Card,
    gate: Card,
}

/// Dumps the page's DOM until both cards are there and `ready` holds; bounded by [`WAIT`]. The
/// last DOM is in the failure message.
fn dump_until(profile: &Path, url: &str, ready: impl Fn(&Shown) -> bool) -> Shown {
    let start = Instant::now();
    loop {
        let dom = Browser::run(profile, &["--dump-dom".to_string()], url);
        if let (Some(dock), Some(gate)) = (Card::find(&dom, "dock"), Card::find(&dom, "gate")) {
            let shown = Shown { dock, gate };
            if ready(&shown) {
                return shown;
            }
        }
        assert!(start.elapsed() < WAIT, "the page did not show the expected cards within {WAIT:?}; last DOM:\n{dom}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_status_page_shows_each_camera_its_label_and_whether_it_is_online_in_a_real_browser() {
    let browser = chromium();
    let dir = tempfile::tempdir().expect("temporary folder");
    let cache = demo_cache(dir.path());
    std::fs::create_dir(dir.path().join("in")).expect("the camera's folder");
    let port = free_port();
    // "gate" has nothing listening at its address: its source keeps failing and restarting.
    let closed = free_port();
    let cameras = format!(
        "[[camera]]\nname = \"dock\"\nsource = \"folder:{}\"\n\n[[camera]]\nname = \"gate\"\nsource = \"http://127.0.0.1:{closed}/x.jpg\"\nstall_after = 2\n",
        dir.path().join("in").display()
    );
    let config = write_demo_config(dir.path(), &cache, port, &cameras);
    let served = Served::start(&config, port);

    // A few frames, one at a time, so that the chart has a history; the last one is the one the
    // card must show.
    let images: Vec<PathBuf> = demo_images().into_iter().take(5).collect();
    let mut lines = Vec::new();
    for (index, image) in images.iter().enumerate() {
        std::fs::copy(image, dir.path().join(format!("in/{index}.jpg"))).expect("copy a frame");
        lines.push(served.next_line());
    }
    let known = images.last().expect("images");
    let reference = common::classify_reference(&demo(), &cache, known, THRESHOLD);
    let line = lines.last().expect("lines");
    assert_eq!(line["label"], reference["label"], "the service and classify agree on {}", known.display());
    served.wait_for(|| served.camera("gate")["restarts"].as_u64() >= Some(1), "the unreachable camera to restart");
    let history = served.camera("dock")["history"].as_array().expect("a history array").len();
    assert_eq!(history, images.len(), "one history point per decision");

    let profile = dir.path().join("chromium-profile");
    let url = format!("http://127.0.0.1:{port}/");
    let expected_label = reference["label"].as_str().expect("a label").to_string();
    let shown = dump_until(&profile, &url, |shown| {
        shown.dock.text_of("label").as_deref() == Some(expected_label.as_str())
            && shown.dock.polyline_points("confidence-line") == Some(history)
    });
    assert_eq!(shown.dock.attribute("data-online").as_deref(), Some("true"), "{}", shown.dock.tag);
    assert_eq!(shown.dock.text_of("decision"), reference["decision"].as_str().map(String::from));
    let confidence = reference["confidence"].as_f64().expect("a confidence");
    assert_eq!(shown.dock.text_of("confidence"), Some(format!("{confidence:.2}")));
    assert_eq!(shown.dock.text_of("threshold"), Some("0.50".to_string()));
    assert!(shown.dock.text_of("age").is_some_and(|age| age.starts_with("frame ")), "{}", shown.dock.inner);
    assert_eq!(shown.dock.text_of("drift").as_deref(), Some("drift: no baseline"));
    // The frame's image loaded: the page unhides it only on its load event.
    let image = shown.dock.image_tag().unwrap_or_default();
    assert!(image.contains("src=\"api/cameras/dock/latest.jpg?d=") && !image.contains("hidden"), "{}", shown.dock.inner);
    assert_eq!(shown.gate.attribute("data-online").as_deref(), Some("false"), "{}", shown.gate.tag);
    assert_eq!(shown.gate.text_of("status").as_deref(), Some("offline"));
    assert!(shown.gate.text_of("reason").is_some_and(|reason| reason.starts_with("restarting")), "{}", shown.gate.inner);

    let screenshot = dir.path().join("status-page.png");
    let args = [format!("--screenshot={}", screenshot.display()), "--window-size=1200,800".to_string()];
    Browser::run(&profile, &args, &url);
    let png = std::fs::read(&screenshot).expect("chromium wrote the screenshot");
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {} bytes", png.len());
    let decoded = image::load_from_memory(&png).expect("a decodable PNG");
    assert_eq!((decoded.width(), decoded.height()), (1200, 800));
    if std::env::var(UPDATE_SCREENSHOT).as_deref() == Ok("1") {
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::copy(&screenshot, &committed).expect("update docs/status-page.png");
        eprintln!("wrote {} (chromium: {})", committed.display(), browser.display());
    }
}

#[test]
fn the_status_page_is_html_and_needs_nothing_from_the_internet() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let cache = demo_cache(dir.path());
    std::fs::create_dir(dir.path().join("in")).expect("the camera's folder");
    let port = free_port();
    let cameras = format!("[[camera]]\nname = \"dock\"\nsource = \"folder:{}\"\n", dir.path().join("in").display());
    let served = Served::start(&write_demo_config(dir.path(), &cache, port, &cameras), port);
    let (status, headers, body) = get_with_headers(served.port, "/").expect("the page");
    assert_eq!(status, 200);
    assert!(headers.to_ascii_lowercase().contains("content-type: text/html; charset=utf-8"), "{headers}");
    let page = text(&body);
    assert!(page.starts_with("<!doctype html>"), "{}", &page[..page.len().min(200)]);
    for external in ["http://", "https://", "src=\"//", "href=\"//", "@import", "url("] {
        assert!(!page.contains(external), "the page refers to `{external}`: a box without internet could not load it");
    }
    // The page reads the API it is served with.
    assert!(page.contains("api/cameras"));
    let history = &served.camera("dock")["history"];
    assert_eq!(history, &serde_json::json!([]), "no decision yet, empty history");
}
