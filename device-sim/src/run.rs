//! One run: devices connect (ramping up), the world is stepped along the
//! simulated clock and its outputs handed to the device tasks, what comes
//! back (light states, the alarm) fed into the world; then the run settles,
//! the devices drain and disconnect, and the report is made.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::check::{self, Facts};
use crate::clock::SimClock;
use crate::devices::{self, Connect, Control, DeviceInfo};
use crate::homes_file::{self, Timings};
use crate::measure::Measure;
use crate::model::layout::{Convention, Layout, RoomKind};
use crate::model::world::{World, WorldConfig};
use crate::model::{clock_text, Output};
use crate::options::{ConventionChoice, Options};
use crate::report::Report;
use crate::scenario::{Knobs, Scenario};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--mqtt-url {0}: {1}")]
    Url(String, &'static str),
    #[error("--convention zigbee2mqtt takes one home (the gateway files all Zigbee2MQTT devices under one home); use --convention mixed")]
    Zigbee2mqttHomes,
    #[error("{0} must be above 0")]
    NotPositive(&'static str),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    HomesFile(#[from] homes_file::HomesFileError),
    #[error("--nats-url {url}: {error}")]
    Nats { url: String, error: String },
    #[error("writing the homes file {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

/// Where the gateway listens, from `--mqtt-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// `mqtt://host:port` or `mqtts://host:port` (a bare `host:port` is plain).
pub fn parse_mqtt_url(url: &str) -> Result<MqttUrl, RunError> {
    let bad = |why| RunError::Url(url.to_owned(), why);
    let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true)
    } else if url.contains("://") {
        return Err(bad("only mqtt:// and mqtts:// are supported"));
    } else {
        (url, false)
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        // `[::1]`: an IPv6 address without a port.
        Some(_) if rest.ends_with(']') => (rest, default_port),
        Some((host, port)) => (
            host,
            port.parse().map_err(|_| bad("the port is not a number"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(MqttUrl {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        tls,
    })
}

pub fn layout(options: &Options) -> Result<Layout, RunError> {
    if options.convention == ConventionChoice::Zigbee2mqtt && options.homes > 1 {
        return Err(RunError::Zigbee2mqttHomes);
    }
    if options.homes == 0 {
        return Err(RunError::NotPositive("--homes"));
    }
    let choice = options.convention;
    Ok(Layout::new(
        options.homes,
        options.people,
        move |home| match choice {
            ConventionChoice::Native => Convention::Native,
            ConventionChoice::Zigbee2mqtt => Convention::Zigbee2mqtt,
            ConventionChoice::Mixed if home == 0 => Convention::Zigbee2mqtt,
            ConventionChoice::Mixed => Convention::Native,
        },
    ))
}

fn timings(options: &Options) -> Timings {
    let mut timings = Timings::for_speed(
        options.speed,
        options.pir_cooldown.as_secs(),
        options.entry_delay,
    );
    if let Some(exit_delay) = options.exit_delay {
        timings.exit_delay = exit_delay;
    }
    timings
}

/// Writes the homes file when asked to.
pub fn write_homes(options: &Options, layout: &Layout) -> Result<(), RunError> {
    let Some(path) = &options.write_homes else {
        return Ok(());
    };
    let text = homes_file::render(layout, &options.code, &timings(options))?;
    std::fs::write(path, text).map_err(|error| RunError::Write {
        path: path.display().to_string(),
        error,
    })?;
    info!(path = %path.display(), "homes file written");
    Ok(())
}

fn dispatch(output: Output, senders: &[mpsc::Sender<Control>], layout: &Layout, measure: &Measure) {
    let (device, control) = match output {
        Output::Reading {
            device,
            value,
            mark,
        } => (device, Control::Publish { value, mark }),
        Output::Keypad { home, action } => match layout.find(home, RoomKind::Hall, "keypad") {
            Some(keypad) => (keypad, Control::Keypad(action)),
            None => return,
        },
        Output::Connectivity { device, online } => (
            device,
            if online {
                Control::Online
            } else {
                Control::Offline
            },
        ),
    };
    if senders[device].try_send(control).is_err() {
        measure.error("device_busy");
    }
}

/// Runs the scenario the options say until its end or `shutdown`.
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<Report, RunError> {
    if options.speed <= 0.0 {
        return Err(RunError::NotPositive("--speed"));
    }
    if options.ramp <= 0.0 {
        return Err(RunError::NotPositive("--ramp"));
    }
    let url = parse_mqtt_url(&options.mqtt_url)?;
    let tls = if url.tls {
        let client = options
            .client_cert
            .as_deref()
            .zip(options.client_key.as_deref());
        Some(crate::tls::client_config(
            options.ca_file.as_deref(),
            client,
        )?)
    } else {
        None
    };
    let layout = layout(&options)?;
    write_homes(&options, &layout)?;
    let knobs = Knobs {
        seed: options.seed,
        start: options.start,
        entry_delay: options.entry_delay,
        dropouts_per_day: options.dropouts,
        base: WorldConfig {
            pir_cooldown: options.pir_cooldown.as_secs().max(1),
            climate_every: options.climate_every.as_secs().max(60),
            lux_every: options.lux_every.as_secs().max(30),
            ..WorldConfig::default()
        },
    };
    let scenario = Scenario::new(options.scenario, &knobs);
    let start = scenario.start;
    let duration = options.duration.map_or(scenario.duration, |d| d.as_secs());
    let end = start + duration;
    let qos = if options.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let connect = Arc::new(Connect {
        host: url.host,
        port: url.port,
        tls,
        credentials: options
            .username
            .clone()
            .map(|user| (user, options.password.clone().unwrap_or_default())),
        qos,
        keep_alive: options.keep_alive,
        drain: options.drain,
    });
    let flood = scenario
        .flood
        .and_then(|(home, room, name)| layout.find(home, room, name));

    let measure = Arc::new(Measure::default());
    measure
        .devices
        .store(layout.devices.len() as u64, Ordering::Relaxed);
    measure.sim_now.store(start, Ordering::Relaxed);
    let (feedback_tx, mut feedback_rx) = mpsc::channel(4096);
    let infos: Vec<DeviceInfo> = layout
        .devices
        .iter()
        .enumerate()
        .map(|(id, spec)| {
            let home = &layout.homes[spec.home];
            DeviceInfo {
                id,
                home: spec.home,
                room: spec.room,
                kind: spec.kind,
                convention: home.convention,
                home_name: home.name.clone(),
                room_name: home.rooms[spec.room].kind.name(),
                name: spec.name,
                code: options.code.clone(),
                flood: flood == Some(id),
            }
        })
        .collect();
    let clients: std::collections::HashMap<String, usize> = infos
        .iter()
        .map(|info| (info.client_id(), info.id))
        .collect();
    let mut senders = Vec::with_capacity(infos.len());
    let mut tasks = JoinSet::new();
    for info in infos {
        let (tx, rx) = mpsc::channel(32);
        senders.push(tx);
        let start_after = Duration::from_secs_f64(info.id as f64 / options.ramp);
        let span = info_span!("device", client_id = %info.client_id());
        tasks.spawn(
            devices::run(
                info,
                Arc::clone(&connect),
                rx,
                feedback_tx.clone(),
                Arc::clone(&measure),
                start_after,
            )
            .instrument(span),
        );
    }
    drop(feedback_tx);
    let stop_progress = CancellationToken::new();
    let correlating = match &options.nats_url {
        Some(url) => {
            let nats_error = |error: String| RunError::Nats {
                url: url.clone(),
                error,
            };
            let client = async_nats::connect(url.as_str())
                .await
                .map_err(|e| nats_error(e.to_string()))?;
            let subscriber = client
                .subscribe(crate::correlate::MOTION_SUBJECTS)
                .await
                .map_err(|e| nats_error(e.to_string()))?;
            Some(tokio::spawn(crate::correlate::follow(
                subscriber,
                clients,
                Arc::clone(&measure),
                stop_progress.clone(),
            )))
        }
        None => None,
    };
    let progress = tokio::spawn(crate::progress::show(
        Arc::clone(&measure),
        stop_progress.clone(),
    ));

    info!(
        scenario = ?options.scenario,
        homes = layout.homes.len(),
        devices = layout.devices.len(),
        url = %options.mqtt_url,
        "connecting devices"
    );
    let ramp_started = Instant::now();
    let ramp_limit = Duration::from_secs_f64(layout.devices.len() as f64 / options.ramp)
        + Duration::from_secs(30);
    loop {
        let connected = measure.connected.load(Ordering::Relaxed);
        if connected >= layout.devices.len() as i64 {
            break;
        }
        if ramp_started.elapsed() > ramp_limit {
            warn!(
                connected,
                devices = layout.devices.len(),
                "not every device connected; going on"
            );
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let ramp_seconds = ramp_started.elapsed().as_secs_f64();
    // Subscriptions and the retained alarm state arrive right after CONNACK.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut world = World::new(layout.clone(), scenario.world.clone(), start);
    let run_started = Instant::now();
    let acked_before = measure.publishes_acked.load(Ordering::Relaxed);
    let clock = SimClock::new(start, run_started, options.speed);
    if let Some(device) = flood {
        let _ = senders[device].send(Control::Flood).await;
    }
    info!(from = %clock_text(start), to = %clock_text(end), speed = options.speed, "simulating");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut interrupted = false;
    while world.now() < end {
        tokio::select! {
            () = shutdown.cancelled() => {
                interrupted = true;
                break;
            }
            _ = tick.tick() => {}
        }
        while let Ok(feedback) = feedback_rx.try_recv() {
            world.feedback(feedback);
        }
        let target = clock.at(Instant::now()).min(end);
        while world.now() < target {
            world.step(&mut out);
            for output in out.drain(..) {
                dispatch(output, &senders, &layout, &measure);
            }
        }
        measure.sim_now.store(world.now(), Ordering::Relaxed);
    }
    let wall_seconds = run_started.elapsed().as_secs_f64();
    let acked_while_simulating = measure.publishes_acked.load(Ordering::Relaxed) - acked_before;

    // Settle: what the scenario waits for may come after its last second.
    if options.check && !interrupted {
        let longest = scenario
            .expectations
            .iter()
            .map(check::Expectation::settle)
            .max()
            .unwrap_or_default();
        let until = Instant::now() + longest + Duration::from_secs(1);
        let at_least = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let facts = observed_facts(&measure);
            if (now >= at_least && check::decided(&scenario.expectations, &facts, now))
                || now >= until
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let connected_at_end = measure.connected.load(Ordering::Relaxed);

    info!("stopping devices");
    for sender in &senders {
        let _ = sender.send(Control::Stop).await;
    }
    drop(senders);
    while tasks.join_next().await.is_some() {}
    stop_progress.cancel();
    let _ = progress.await;
    if let Some(correlating) = correlating {
        let _ = correlating.await;
    }

    let errors = measure.errors();
    let check = options.check.then(|| {
        let mut facts = observed_facts(&measure);
        facts.since = Some(run_started);
        facts.qos1 = qos == QoS::AtLeastOnce;
        facts.outstanding = measure.outstanding.load(Ordering::Relaxed);
        facts.unacknowledged = errors.get("unacknowledged_at_end").copied().unwrap_or(0);
        facts.devices = layout.devices.len() as u64;
        facts.connected = connected_at_end;
        let puback = measure.puback();
        facts.others_p99 = Duration::from_secs_f64(puback.p99_ms / 1000.0);
        facts.others_acked = puback.count;
        check::judge(&scenario.expectations, &facts)
    });
    let passed = check
        .as_ref()
        .map(|verdicts| verdicts.iter().all(|v| v.passed));
    let acked = measure.publishes_acked.load(Ordering::Relaxed);
    Ok(Report {
        scenario: serde_json::to_value(options.scenario)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        seed: options.seed,
        speed: options.speed,
        homes: layout.homes.len(),
        devices: layout.devices.len(),
        qos: options.qos,
        sim_start: clock_text(start),
        sim_end: clock_text(world.now()),
        wall_seconds,
        ramp_seconds,
        connects: measure.connects.load(Ordering::Relaxed),
        publishes_sent: measure.publishes_sent.load(Ordering::Relaxed),
        publishes_acked: acked,
        events_sent: measure.events_sent.load(Ordering::Relaxed),
        events_acked: measure.events_acked.load(Ordering::Relaxed),
        outstanding_at_end: measure.outstanding.load(Ordering::Relaxed),
        wills: measure.wills.load(Ordering::Relaxed),
        acked_per_second: acked_while_simulating as f64 / wall_seconds.max(0.001),
        commands_received: measure.commands_received.load(Ordering::Relaxed),
        puback: measure.puback(),
        puback_flood: flood.map(|_| measure.puback_flood()),
        reaction: measure.reaction(),
        reactions_by_correlation: measure.reactions_by_correlation.load(Ordering::Relaxed),
        reactions_by_room: measure.reactions_by_room.load(Ordering::Relaxed),
        errors: errors.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        check,
        passed,
    })
}

fn observed_facts(measure: &Measure) -> Facts {
    let observations = measure.observations.lock().expect("observations lock");
    Facts {
        marks: observations.marks.clone(),
        sirens: observations.sirens.clone(),
        alarm_states: observations.alarm_states.clone(),
        ..Facts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_give_host_port_and_tls() {
        let url = |host: &str, port, tls| MqttUrl {
            host: host.to_owned(),
            port,
            tls,
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1883").unwrap(),
            url("127.0.0.1", 1883, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://gateway").unwrap(),
            url("gateway", 1883, false)
        );
        assert_eq!(
            parse_mqtt_url("localhost:2883").unwrap(),
            url("localhost", 2883, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://gateway").unwrap(),
            url("gateway", 8883, true)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]:9883").unwrap(),
            url("::1", 9883, true)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]").unwrap(),
            url("::1", 8883, true)
        );
        assert!(parse_mqtt_url("http://gateway").is_err());
        assert!(parse_mqtt_url("mqtt://:1883").is_err());
        assert!(parse_mqtt_url("mqtt://gateway:port").is_err());
    }
}
