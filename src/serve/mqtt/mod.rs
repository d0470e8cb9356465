//! The MQTT output (feature `mqtt`): decisions, states and the service's availability published
//! to a broker, with nothing lost while the broker is away (docs/SERVE.md § MQTT).
//!
//! Topics, under `mqtt.prefix` (default `cac-edge/<hostname>`):
//! - `<prefix>/<camera>/decision`: every decision, the JSON line of the service's output, QoS 1;
//! - `<prefix>/<camera>/state`: the debounced state (the label, plain text), retained, sent
//!   when it changes;
//! - `<prefix>/<camera>/drift`: the shift alarm (`{"score","alarm","alarm_changed","frames",
//!   "window"}`), retained, sent when the alarm is raised or cleared and every
//!   [`DRIFT_EVERY`] otherwise;
//! - `<prefix>/available`: `online` when connected, `offline` on a clean stop and as the Last
//!   Will (the broker sends it when the box vanishes), retained.
//!
//! Delivery: the encoder's sink ([`MqttSink`]) appends each message to the on-disk queue
//! ([`queue`]) and returns; the publisher's thread sends the queue in order at QoS 1, at most
//! [`WINDOW`] unacknowledged at a time, and a message leaves the queue only when the broker has
//! acknowledged it. A lost connection is dropped whole and a fresh one, after a backoff, resends
//! from the first unacknowledged message: order is kept, and a message in flight when the link
//! fell may arrive twice (QoS 1 is "at least once"; `captured_at` + `camera` identify a decision).

pub mod queue;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{
    Client, ConnectReturnCode, Connection, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    RecvTimeoutError, TlsConfiguration, Transport,
};

use self::queue::{DiskQueue, Message};
pub use super::config::MqttConfig;
use super::frame::{join_by, lock};
use super::output::{DecisionEvent, DecisionSink};

/// Messages sent and not yet acknowledged, at most.
pub const WINDOW: usize = 32;
/// How long the publisher waits for the broker before it looks at the queue again (new
/// messages are sent within this).
const POLL: Duration = Duration::from_millis(50);
/// How long the publisher waits for a connection being made: longer than rumqttc's own
/// connection timeout (5 s), because rumqttc drops a half-made connection (TCP, TLS, CONNECT)
/// when its poll is cancelled, so a [`POLL`]-long wait would never let a connection slower than
/// 50 ms (a remote broker, a TLS handshake) complete.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Reconnection backoff: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));
/// The queue's head is saved at most this often (and at stop).
const SAVE_HEAD_EVERY: Duration = Duration::from_secs(1);
/// A camera's drift score is published at least this often while it has one.
pub const DRIFT_EVERY: Duration = Duration::from_secs(10);
/// At a stop, this much of the time left goes to the `offline` message and the disconnect.
const GOODBYE: Duration = Duration::from_millis(500);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Whether the broker is connected now.
    pub connected: AtomicBool,
    /// Connections made (the first and each reconnection).
    pub connections: AtomicU64,
    /// Messages the broker acknowledged.
    pub acknowledged: AtomicU64,
    /// Messages deleted unsent because the queue was full.
    pub dropped: AtomicU64,
    /// Messages waiting in the queue.
    pub queued: AtomicU64,
}

impl MqttStats {
    /// Appends the MQTT metrics in Prometheus' text format.
    pub fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let metrics = [
            (
                "cac_edge_mqtt_connected",
                "gauge",
                "1 while the MQTT broker is connected.",
                u64::from(self.connected.load(Ordering::Relaxed)),
            ),
            (
                "cac_edge_mqtt_connections_total",
                "counter",
                "Connections made to the broker (the first and each reconnection).",
                load(&self.connections),
            ),
            (
                "cac_edge_mqtt_acknowledged_total",
                "counter",
                "Messages the broker acknowledged (QoS 1).",
                load(&self.acknowledged),
            ),
            (
                "cac_edge_mqtt_dropped_total",
                "counter",
                "Messages deleted unsent because the on-disk queue was full.",
                load(&self.dropped),
            ),
            ("cac_edge_mqtt_queued", "gauge", "Messages in the on-disk queue, waiting for the broker.", load(&self.queued)),
        ];
        for (name, kind, help, value) in metrics {
            super::metrics::header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

/// What the sink and the publisher share.
struct Shared {
    queue: Mutex<DiskQueue>,
    stats: Arc<MqttStats>,
    /// Set by [`MqttPublisher::stop`]: deliver what is queued until then, then say goodbye.
    stop_at: Mutex<Option<Instant>>,
    prefix: String,
}

impl Shared {
    fn stopping_at(&self) -> Option<Instant> {
        *lock(&self.stop_at)
    }

    fn update_queue_stats(&self, queue: &DiskQueue) {
        self.stats.queued.store(queue.len(), Ordering::Relaxed);
        self.stats.dropped.store(queue.dropped(), Ordering::Relaxed);
    }
}

/// The publisher: its thread, and the handle sinks are made from.
pub struct MqttPublisher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    config: MqttConfig,
}

impl MqttPublisher {
    /// Opens the queue and starts the publisher's thread (it connects in the background; a
    /// broker that is down is not an error, the queue holds the messages). Errors: the queue's
    /// folder, or a CA file that cannot be read.
    pub fn start(config: &MqttConfig, cameras: &[String]) -> io::Result<MqttPublisher> {
        let options = mqtt_options(config)?;
        let queue = DiskQueue::open(&config.queue_dir, config.queue_max_bytes)?;
        let shared = Arc::new(Shared {
            stats: Arc::default(),
            queue: Mutex::new(queue),
            stop_at: Mutex::new(None),
            prefix: config.prefix.clone(),
        });
        shared.update_queue_stats(&lock(&shared.queue));
        let context = Context { shared: Arc::clone(&shared), options, config: config.clone(), cameras: cameras.to_vec() };
        let thread = std::thread::Builder::new().name("mqtt".to_string()).spawn(move || context.run())?;
        tracing::info!("MQTT: publishing to {} under {}/", config.broker(), config.prefix);
        Ok(MqttPublisher { shared, thread: Some(thread), config: config.clone() })
    }

    /// A sink for the encoder.
    pub fn sink(&self) -> MqttSink {
        MqttSink { shared: Arc::clone(&self.shared), drift_published: HashMap::new() }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// Delivers what is queued until shortly before `deadline`, then publishes `offline` and
    /// disconnects; what is left stays queued for the next start.
    pub fn stop(mut self, deadline: Instant) {
        *lock(&self.shared.stop_at) = Some(deadline);
        if let Some(thread) = self.thread.take() {
            if !join_by(thread, deadline + GOODBYE) {
                tracing::warn!("MQTT: the publisher did not stop in time; queued messages stay on disk");
            }
        }
        let mut queue = lock(&self.shared.queue);
        if let Err(error) = queue.save_head() {
            tracing::warn!("MQTT: {error}");
        }
    }
}

/// The encoder's end: appends to the queue.
pub struct MqttSink {
    shared: Arc<Shared>,
    /// When each camera's drift was last published.
    drift_published: HashMap<String, Instant>,
}

impl DecisionSink for MqttSink {
    fn decision(&mut self, event: &DecisionEvent<'_>) -> io::Result<()> {
        let payload = serde_json::to_vec(event.record).map_err(io::Error::other)?;
        let prefix = &self.shared.prefix;
        let mut queue = lock(&self.shared.queue);
        queue.push(&Message { topic: format!("{prefix}/{}/decision", event.camera), payload, retain: false })?;
        if let (true, Some(state)) = (event.record.state_changed, event.record.state) {
            let message =
                Message { topic: format!("{prefix}/{}/state", event.camera), payload: state.as_bytes().to_vec(), retain: true };
            queue.push(&message)?;
        }
        if let Some(drift) = &event.record.drift {
            let last = self.drift_published.get(event.camera);
            if drift.alarm_changed || last.is_none_or(|last| last.elapsed() >= DRIFT_EVERY) {
                let payload = serde_json::to_vec(drift).map_err(io::Error::other)?;
                queue.push(&Message { topic: format!("{prefix}/{}/drift", event.camera), payload, retain: true })?;
                self.drift_published.insert(event.camera.to_string(), Instant::now());
            }
        }
        self.shared.update_queue_stats(&queue);
        Ok(())
    }
}

fn mqtt_options(config: &MqttConfig) -> io::Result<MqttOptions> {
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(config.keep_alive);
    options.set_clean_session(true);
    options.set_inflight(WINDOW as u16 + 8);
    options.set_last_will(LastWill::new(config.availability_topic(), "offline", QoS::AtLeastOnce, true));
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    if config.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls_config(config)?))));
    }
    Ok(options)
}

/// rustls with the ring provider, trusting `ca_file` or else the system's certificates.
fn tls_config(config: &MqttConfig) -> io::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let invalid = |error: &dyn std::fmt::Display| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: mqtt.ca_file: not a PEM certificate file: {error}", path.display()),
                )
            };
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|error| invalid(&error))?
                .collect::<Result<_, _>>()
                .map_err(|error| invalid(&error))?;
            if certificates.is_empty() {
                return Err(invalid(&"no certificate in it"));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|error| invalid(&error))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for certificate in found.certs {
                let _ = roots.add(certificate);
            }
            if roots.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "mqtt: no system certificate authorities found for mqtts://; set mqtt.ca_file to the broker's CA (PEM)",
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The publisher thread's state across connections.
struct Context {
    shared: Arc<Shared>,
    options: MqttOptions,
    config: MqttConfig,
    cameras: Vec<String>,
}

/// How a connection ended.
enum Ended {
    /// Stopped as asked.
    Stopped,
    /// Lost (or never made); try again after a backoff.
    Lost(ConnectionError),
}

impl Context {
    fn run(self) {
        let mut backoff = BACKOFF.0;
        let mut failures = 0u32;
        loop {
            let (client, mut connection) = Client::new(self.options.clone(), 2 * WINDOW);
            let mut session = Session::new(&self, client);
            match session.run(&mut connection) {
                Ended::Stopped => return,
                Ended::Lost(error) => {
                    self.shared.stats.connected.store(false, Ordering::Relaxed);
                    if session.was_connected {
                        backoff = BACKOFF.0;
                        failures = 0;
                    }
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(
                            "MQTT: {}: {}; decisions are queued on disk until it is back",
                            self.config.broker(),
                            explain(&error)
                        );
                    } else {
                        tracing::debug!("MQTT: {}: {} (attempt {failures})", self.config.broker(), explain(&error));
                    }
                }
            }
            if !self.sleep(backoff) {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    /// Sleeps unless a stop comes; returns false when stopping.
    fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if self.shared.stopping_at().is_some() {
                return false;
            }
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
        self.shared.stopping_at().is_none()
    }
}

fn explain(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized) => {
            "the broker refused the user name or password (mqtt.username, mqtt.password)".to_string()
        }
        ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection ({code:?})"),
        ConnectionError::Tls(error) => {
            format!("TLS failed: {error} (is mqtt.ca_file the broker's CA, and the host the name in its certificate?)")
        }
        other => other.to_string(),
    }
}

/// What a publish request was, in the order rumqttc numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Queued(u64),
    Control,
    Goodbye,
}

/// One connection.
struct Session<'a> {
    context: &'a Context,
    client: Client,
    was_connected: bool,
    /// Requests whose packet id rumqttc has not told yet.
    awaiting_pkid: VecDeque<Sent>,
    /// Packet id → what it carries.
    in_flight: HashMap<u16, Sent>,
    /// Queue messages sent and not acknowledged.
    unacknowledged: BTreeSet<u64>,
    /// The next queue message to send.
    cursor: u64,
    goodbye_sent: bool,
    last_save: Instant,
}

impl<'a> Session<'a> {
    fn new(context: &'a Context, client: Client) -> Session<'a> {
        Session {
            context,
            client,
            was_connected: false,
            awaiting_pkid: VecDeque::new(),
            in_flight: HashMap::new(),
            unacknowledged: BTreeSet::new(),
            cursor: 0,
            goodbye_sent: false,
            last_save: Instant::now(),
        }
    }

    fn shared(&self) -> &Shared {
        &self.context.shared
    }

    fn run(&mut self, connection: &mut Connection) -> Ended {
        loop {
            if let Some(deadline) = self.shared().stopping_at() {
                if !self.was_connected || Instant::now() >= deadline {
                    return Ended::Stopped;
                }
                let drained = self.unacknowledged.is_empty() && self.cursor >= lock(&self.context.shared.queue).next_seq();
                if !self.goodbye_sent && (drained || Instant::now() + GOODBYE >= deadline) {
                    self.say_goodbye();
                }
            }
            if self.was_connected && !self.goodbye_sent {
                if let Err(error) = self.send_window() {
                    tracing::error!("MQTT: {error}");
                }
            }
            self.save_head_now_and_then();
            let wait = if self.was_connected { POLL } else { CONNECT_WAIT };
            match connection.recv_timeout(wait) {
                Ok(Ok(event)) => {
                    if self.handle(event) {
                        return Ended::Stopped;
                    }
                }
                Ok(Err(error)) => return Ended::Lost(error),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ended::Stopped,
            }
        }
    }

    /// Handles one event; true when the goodbye is done.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => self.connected(),
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(sent) = self.awaiting_pkid.pop_front() {
                    self.in_flight.insert(pkid, sent);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => match self.in_flight.remove(&ack.pkid) {
                Some(Sent::Queued(seq)) => self.acknowledged(seq),
                Some(Sent::Goodbye) => {
                    let _ = self.client.try_disconnect();
                }
                Some(Sent::Control) | None => {}
            },
            Event::Outgoing(Outgoing::Disconnect) => return true,
            _ => {}
        }
        false
    }

    fn connected(&mut self) {
        self.was_connected = true;
        let stats = &self.shared().stats;
        stats.connected.store(true, Ordering::Relaxed);
        let connections = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if connections > 1 {
            tracing::info!("MQTT: connected again to {}", self.context.config.broker());
        }
        self.cursor = lock(&self.context.shared.queue).head();
        let config = &self.context.config;
        self.publish(Sent::Control, &config.availability_topic(), b"online".to_vec(), true);
        if let Some(discovery) = &config.home_assistant {
            for (topic, payload) in home_assistant_discovery(config, discovery, &self.context.cameras) {
                self.publish(Sent::Control, &topic, payload.into_bytes(), true);
            }
        }
    }

    /// Sends queued messages while the window has room.
    fn send_window(&mut self) -> io::Result<()> {
        while self.unacknowledged.len() < WINDOW {
            let message = {
                let queue = lock(&self.context.shared.queue);
                // The queue may have dropped its oldest (full) past the cursor.
                self.cursor = self.cursor.max(queue.head());
                if self.cursor >= queue.next_seq() {
                    return Ok(());
                }
                queue.get(self.cursor)?
            };
            let Some(message) = message else { return Ok(()) };
            if !self.publish(Sent::Queued(self.cursor), &message.topic, message.payload, message.retain) {
                return Ok(());
            }
            self.unacknowledged.insert(self.cursor);
            self.cursor += 1;
        }
        Ok(())
    }

    /// Hands one QoS 1 publish to rumqttc; false when its channel is full (try again later).
    fn publish(&mut self, sent: Sent, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        match self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            Ok(()) => {
                self.awaiting_pkid.push_back(sent);
                true
            }
            Err(_) => false,
        }
    }

    fn acknowledged(&mut self, seq: u64) {
        self.unacknowledged.remove(&seq);
        self.shared().stats.acknowledged.fetch_add(1, Ordering::Relaxed);
        let first_open = self.unacknowledged.first().copied().unwrap_or(self.cursor);
        let mut queue = lock(&self.context.shared.queue);
        if let Err(error) = queue.acknowledge_before(first_open) {
            tracing::warn!("MQTT: {error}");
        }
        self.shared().update_queue_stats(&queue);
    }

    fn say_goodbye(&mut self) {
        self.goodbye_sent = true;
        let topic = self.context.config.availability_topic();
        if !self.publish(Sent::Goodbye, &topic, b"offline".to_vec(), true) {
            let _ = self.client.try_disconnect();
        }
    }

    fn save_head_now_and_then(&mut self) {
        if self.last_save.elapsed() >= SAVE_HEAD_EVERY {
            self.last_save = Instant::now();
            if let Err(error) = lock(&self.context.shared.queue).save_head() {
                tracing::warn!("MQTT: {error}");
            }
        }
    }
}

/// Home Assistant MQTT discovery: one sensor per camera (its state), retained.
fn home_assistant_discovery(config: &MqttConfig, discovery: &str, cameras: &[String]) -> Vec<(String, String)> {
    let node: String = config.client_id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    cameras
        .iter()
        .map(|camera| {
            let object = format!("{node}_{}", camera.replace(['-', '.'], "_"));
            let payload = serde_json::json!({
                "name": format!("{camera} state"),
                "unique_id": object,
                "state_topic": format!("{}/{camera}/state", config.prefix),
                "availability_topic": config.availability_topic(),
                "json_attributes_topic": format!("{}/{camera}/decision", config.prefix),
                "icon": "mdi:cctv",
                "device": { "identifiers": [node], "name": config.client_id, "manufacturer": "cac-edge", "sw_version": env!("CARGO_PKG_VERSION") },
            });
            (format!("{discovery}/sensor/{object}/config"), payload.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config() -> MqttConfig {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            tls: false,
            ca_file: None,
            credentials: None,
            client_id: "cac-edge-box.1".into(),
            prefix: "site/box1".into(),
            queue_dir: PathBuf::from("/tmp/q"),
            queue_max_bytes: 1 << 20,
            keep_alive: Duration::from_secs(15),
            home_assistant: Some("homeassistant".into()),
        }
    }

    #[test]
    fn home_assistant_discovery_announces_one_sensor_per_camera() {
        let messages = home_assistant_discovery(&config(), "homeassistant", &["door".into(), "yard-2".into()]);
        assert_eq!(messages.len(), 2);
        let (topic, payload) = &messages[1];
        assert_eq!(topic, "homeassistant/sensor/cac_edge_box_1_yard_2/config");
        let payload: serde_json::Value = serde_json::from_str(payload).expect("JSON");
        assert_eq!(payload["state_topic"], "site/box1/yard-2/state");
        assert_eq!(payload["availability_topic"], "site/box1/available");
        assert_eq!(payload["json_attributes_topic"], "site/box1/yard-2/decision");
        assert_eq!(payload["unique_id"], "cac_edge_box_1_yard_2");
        assert_eq!(payload["device"]["identifiers"][0], "cac_edge_box_1");
    }

    #[test]
    fn connection_errors_say_what_to_fix() {
        let refused = explain(&ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword));
        assert!(refused.contains("mqtt.username, mqtt.password"), "{refused}");
        assert_eq!(config().broker(), "mqtt://127.0.0.1:1883");
        assert_eq!(MqttConfig { tls: true, port: 8883, ..config() }.broker(), "mqtts://127.0.0.1:8883");
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let error = tls_config(&MqttConfig { tls: true, ca_file: Some(ca.clone()), ..config() }).expect_err("refused");
        assert!(error.to_string().contains("ca.pem") && error.to_string().contains("mqtt.ca_file"), "{error}");
    }
}
