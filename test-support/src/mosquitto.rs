//! A real Mosquitto broker for the bridge tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

/// A TLS listener's certificate, key and the CA of its clients' certificates.
type TlsFiles<'a> = (
    &'a std::path::Path,
    &'a std::path::Path,
    Option<&'a std::path::Path>,
);

/// A `mosquitto` on a free loopback port, anonymous, with persistence in a
/// temporary directory (so that a bridge's persistent session survives a
/// [`TestMosquitto::restart`]); killed and removed on drop.
#[derive(Debug)]
pub struct TestMosquitto {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// A second listener, speaking TLS.
    tls_port: Option<u16>,
}

impl TestMosquitto {
    /// Starts the broker and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If it cannot start, e.g. `mosquitto` is not installed
    /// (`scripts/setup.sh` installs it).
    pub async fn start() -> TestMosquitto {
        Self::start_with(None).await
    }

    /// Like [`TestMosquitto::start`], with a second listener that speaks
    /// TLS with the certificate chain and key in `cert` and `key` (PEM
    /// files): [`TestMosquitto::url`] names that one, [`TestMosquitto::addr`]
    /// the plain one. With `client_ca`, the TLS listener lets in only
    /// clients with a certificate that CA signed.
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> TestMosquitto {
        Self::start_with(Some((cert, key, client_ca))).await
    }

    async fn start_with(tls: Option<TlsFiles<'_>>) -> TestMosquitto {
        crate::init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("hearth-mosquitto-")
            .tempdir()
            .expect("creating a temporary directory for mosquitto");
        let port = crate::free_port();
        // Queue limits far above Mosquitto's defaults (1000 queued, 20 in
        // flight): a bridge away for a while must find everything again, as
        // deploy/README.md tells users to configure.
        let config = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             max_queued_messages 100000\n\
             max_inflight_messages 100\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n",
            dir.path().display()
        );
        // Two free ports, not the same one twice.
        let tls_port = tls.map(|_| {
            std::iter::repeat_with(crate::free_port)
                .find(|other| *other != port)
                .unwrap_or(port)
        });
        let config = match (tls, tls_port) {
            (Some((cert, key, client_ca)), Some(tls_port)) => {
                let client_ca = client_ca.map_or_else(String::new, |ca| {
                    format!("cafile {}\nrequire_certificate true\n", ca.display())
                });
                format!(
                    "{config}listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n{client_ca}",
                    cert.display(),
                    key.display()
                )
            }
            _ => config,
        };
        std::fs::write(dir.path().join("mosquitto.conf"), config).expect("writing mosquitto.conf");
        let mut broker = TestMosquitto {
            child: None,
            port,
            dir,
            tls_port,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let binary = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|binary| !binary.starts_with('/') || std::path::Path::new(binary).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot run mosquitto ({error}); scripts/setup.sh installs it")
            });
        self.child = Some(child);
        let tls = self
            .tls_port
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        for _ in 0..200 {
            let plain = tokio::net::TcpStream::connect(self.addr()).await.is_ok();
            let tls = match tls {
                Some(tls) => tokio::net::TcpStream::connect(tls).await.is_ok(),
                None => true,
            };
            if plain && tls {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mosquitto does not listen on {}", self.addr());
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `mqtt://127.0.0.1:PORT` (`mqtts://` with TLS), as `--bridge-url`
    /// takes it.
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(port) => format!("mqtts://127.0.0.1:{port}"),
            None => format!("mqtt://{}", self.addr()),
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is
    /// answered until [`TestMosquitto::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("mosquitto is running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the broker (SIGKILL, also when frozen) and starts it again on
    /// the same port with nothing saved: every session is gone, as after a
    /// crash of a broker without persistence.
    pub async fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(self.dir.path().join("mosquitto.db"));
        self.spawn().await;
    }

    /// Stops the broker gracefully (SIGTERM: it saves its sessions) and
    /// starts it again on the same port and persistence.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            // A frozen broker would not stop.
            self.thaw();
        }
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        self.spawn().await;
    }
}
