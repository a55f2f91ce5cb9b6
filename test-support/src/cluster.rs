//! A NATS cluster with JetStream on loopback, for tests of replicated
//! streams: every node a real nats-server on free ports with its own store,
//! joined by routes, killed and started again one by one.
//!
//! ```no_run
//! # async fn example() {
//! let mut cluster = hearth_test_support::TestCluster::start(3).await;
//! let client = async_nats::connect(cluster.url(0)).await.unwrap();
//! cluster.kill(1).await; // the other two keep a quorum
//! cluster.restart(1).await;
//! # drop(client);
//! # }
//! ```
//!
//! The servers are started, not made ready as a cluster: JetStream elects
//! its meta leader only once the routes are up, so a test waits for that
//! with a client (e.g. until it can create a stream with the replicas it
//! needs) before relying on it.

use hearth_gateway::embedded::{NatsServer, NatsServerConfig};
use tempfile::TempDir;

use crate::{free_port, from_workspace, init_tracing};

/// The cluster name in every node's `cluster` block.
const CLUSTER_NAME: &str = "hearth-test";

/// One node: its server and store, and its route port.
#[derive(Debug)]
struct Node {
    name: String,
    // Declared before the directory: the server goes first on drop.
    server: NatsServer,
    _dir: TempDir,
}

/// A cluster of nats-servers with JetStream, named `node-0`, `node-1`, ...
/// (their `server_name`, which JetStream reports as stream and consumer
/// leaders). Every node is killed and its store removed on drop.
#[derive(Debug)]
pub struct TestCluster {
    nodes: Vec<Node>,
}

impl TestCluster {
    /// Starts `size` nodes (and [`init_tracing`]), each listing every other
    /// node's route.
    ///
    /// # Panics
    ///
    /// If a node cannot be started.
    pub async fn start(size: usize) -> TestCluster {
        init_tracing();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(size);
        for (index, route_port) in route_ports.iter().enumerate() {
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, port)| format!("\"nats-route://127.0.0.1:{port}\""))
                .collect();
            let name = format!("node-{index}");
            let dir = tempfile::Builder::new()
                .prefix(&format!("hearth-nats-{name}-"))
                .tempdir()
                .expect("creating a temporary directory for a cluster node");
            let mut config = NatsServerConfig::new(dir.path());
            config.binary = from_workspace(&config.binary);
            config.server_name.clone_from(&name);
            config.extra_config = format!(
                "cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{route_port}\"\n  \
                 routes: [{}]\n}}\n",
                routes.join(", ")
            );
            let server = match NatsServer::start(config).await {
                Ok(server) => server,
                Err(error) => panic!(
                    "could not start cluster node {name}: {error}\n\
                     (scripts/setup.sh installs nats-server; HEARTH_NATS_SERVER picks one)"
                ),
            };
            nodes.push(Node {
                name,
                server,
                _dir: dir,
            });
        }
        TestCluster { nodes }
    }

    /// How many nodes the cluster has, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `nats://127.0.0.1:PORT` of node `index`; the same after a restart.
    pub fn url(&self, index: usize) -> String {
        self.nodes[index].server.url()
    }

    /// Every node's URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.server.url()).collect()
    }

    /// The `server_name` of node `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    /// The node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// Kills node `index` (SIGKILL: no chance to hand over leadership or
    /// flush); [`TestCluster::restart`] brings it back.
    pub async fn kill(&mut self, index: usize) {
        self.nodes[index].server.kill().await;
    }

    /// Starts node `index` again (stopping it gracefully first if it runs)
    /// on the same ports and store, so it rejoins the cluster and catches up.
    ///
    /// # Panics
    ///
    /// If it does not start again.
    pub async fn restart(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Err(error) = node.server.restart().await {
            panic!("could not restart cluster node {}: {error}", node.name);
        }
    }

    /// The server of node `index`, e.g. for its version or pid.
    pub fn server(&self, index: usize) -> &NatsServer {
        &self.nodes[index].server
    }
}
