//! The deployment files stay valid: `deploy/nats-server.conf` passes the
//! test nats-server's own configuration check (`nats-server -t`), and
//! `deploy/hearth.toml` is checked where the configuration is parsed
//! (`config.rs`).

use std::path::Path;

#[test]
fn the_deployed_nats_server_configuration_is_valid() {
    let binary = std::env::var("HEARTH_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats-server.conf");
    let output = std::process::Command::new(&binary)
        .arg("-t")
        .arg("-c")
        .arg(&config)
        .output()
        .unwrap_or_else(|error| panic!("run {binary}: {error} (scripts/setup.sh installs it)"));
    assert!(
        output.status.success(),
        "{binary} -t -c {}: {}{}",
        config.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
