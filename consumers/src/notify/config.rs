//! `[homes.<home>.notify]`: who is told, on which channels, and the
//! policies (dedup, rate limits, quiet hours, escalation, retries).
//!
//! ```toml
//! [homes.home]
//! timezone = "Europe/Berlin"      # quiet hours are local time there; default the system's
//!
//! [homes.home.notify]
//! dedup_window = "10m"            # same category and device within this: told once
//! escalate = ["5m", "15m", "30m"] # unacknowledged critical: again this long after the first
//! battery_below = 15              # percent
//! silent_after = "6h"             # a device silent this long is reported (off when absent)
//! retry = { tries = 5, backoff = "10s", max_backoff = "10m", timeout = "10s" }
//!
//! [[homes.home.notify.recipients]]
//! name = "alice"
//! quiet_hours = "22:00-07:00"
//! rate_limit = { max = 5, period = "1h" }
//!
//! [[homes.home.notify.recipients.channels]]
//! name = "phone"
//! kind = "ntfy"
//! server = "https://ntfy.sh"
//! topic = "alice-home-3f9a"
//! token_env = "NTFY_TOKEN"
//!
//! [[homes.home.notify.recipients.channels]]
//! name = "mail"
//! kind = "email"
//! server = "smtp.example.com"
//! tls = "starttls"
//! from = "hearth <hearth@example.com>"
//! to = "alice@example.com"
//! user = "hearth"
//! password_env = "SMTP_PASSWORD"
//! ```
//!
//! Channels are written flat (one table per channel with a `kind`) and
//! turned into a typed [`ChannelSpec`] by [`ChannelConfig::spec`], which is
//! also what validation runs: a field that does not belong to the kind, a
//! missing one or an environment variable that is not set is an error that
//! names the recipient and the channel.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `[homes.<home>.notify]`: recipients, channels and policies of a home.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeConfig {
    /// The people told, in order: escalation goes down this list.
    pub recipients: Vec<Recipient>,
    /// Notifications of the same category about the same device within this
    /// long of one that was sent are dropped (a critical one only while the
    /// earlier one is unacknowledged). `0s` turns dedup off.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// When an unacknowledged critical notification is sent again, counted
    /// from its first sending; strictly increasing. Empty: no escalation.
    #[serde(deserialize_with = "durations")]
    pub escalate: Vec<Duration>,
    /// A battery reported below this percentage is told once, until it is
    /// reported at or above it again.
    pub battery_below: f64,
    /// A device that reported before and then stays silent this long is
    /// told once, until it reports again. Off when absent.
    #[serde(with = "humantime_serde")]
    pub silent_after: Option<Duration>,
    /// How each channel retries.
    pub retry: Retry,
}

impl Default for HomeConfig {
    fn default() -> Self {
        Self {
            recipients: Vec::new(),
            dedup_window: Duration::from_secs(600),
            escalate: vec![
                Duration::from_secs(300),
                Duration::from_secs(900),
                Duration::from_secs(1800),
            ],
            battery_below: 15.0,
            silent_after: None,
            retry: Retry::default(),
        }
    }
}

/// How a delivery is retried; a channel may override `tries` and
/// `backoff`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts at a delivery before it is given up (and dead-lettered).
    pub tries: u32,
    /// The wait before the first retry, doubled for each further one.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            tries: 5,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Retry {
    /// The wait after the `attempts`-th failed attempt.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(20);
        self.backoff
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max_backoff)
    }
}

/// A person (or a household account) told of notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    /// How acknowledgements and the log name them: `alice`.
    pub name: String,
    /// Their channels, in order: the first is used first, escalation moves
    /// on to the next.
    pub channels: Vec<ChannelConfig>,
    /// Local time of day (in the home's `timezone`) when non-critical
    /// notifications are held, and sent as one summary when it ends:
    /// `"22:00-07:00"`.
    #[serde(default)]
    pub quiet_hours: Option<crate::daytime::Hours>,
    /// At most `max` non-critical notifications per `period`; the rest are
    /// sent as one summary when the period ends.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Told only of critical notifications that were not acknowledged in
    /// time (from the first escalation step on): a neighbour, a relative.
    #[serde(default)]
    pub backup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub max: u32,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// The kinds of channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// HTTP POST of the notification as JSON.
    Webhook,
    /// An e-mail over SMTP.
    Email,
    /// A push through an ntfy server.
    Ntfy,
    /// An SMS through a provider's HTTP API, by template.
    Sms,
    /// A line in the rule's log.
    Log,
}

impl ChannelKind {
    fn name(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Email => "email",
            Self::Ntfy => "ntfy",
            Self::Sms => "sms",
            Self::Log => "log",
        }
    }
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refuses to send
    /// when the server cannot upgrade.
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption (port 25): a relay on the same machine or network only.
    None,
}

/// One channel of a recipient, as written in the homes file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Unique within the recipient; named in delivery outcomes.
    pub name: String,
    pub kind: ChannelKind,
    /// Overrides the home's `retry.tries`.
    #[serde(default)]
    pub tries: Option<u32>,
    /// Overrides the home's `retry.backoff`.
    #[serde(default, with = "humantime_serde")]
    pub backoff: Option<Duration>,
    /// webhook, sms: where to send. For sms, `{to}` and `{message}` in it
    /// are replaced (URL-encoded).
    #[serde(default)]
    pub url: Option<String>,
    /// webhook, sms: extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// webhook, sms: extra request headers whose values are read from
    /// environment variables (`{ Authorization = "SMS_AUTH" }`).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// sms: `POST` (default), `PUT` or `GET`.
    #[serde(default)]
    pub method: Option<String>,
    /// sms: the phone number; email: the address told.
    #[serde(default)]
    pub to: Option<String>,
    /// sms: the request body, with `{to}` and `{message}` replaced (escaped
    /// for JSON when the content type is JSON, URL-encoded for a form).
    #[serde(default)]
    pub body: Option<String>,
    /// sms: the body's content type; `application/json` by default.
    #[serde(default)]
    pub content_type: Option<String>,
    /// email: the SMTP server's host name; ntfy: the server's URL
    /// (`https://ntfy.sh` by default).
    #[serde(default)]
    pub server: Option<String>,
    /// email: the SMTP port; by default 587, 465 or 25 after `tls`.
    #[serde(default)]
    pub port: Option<u16>,
    /// email: `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub tls: Option<SmtpTls>,
    /// email: the sender, `"hearth <hearth@example.com>"`.
    #[serde(default)]
    pub from: Option<String>,
    /// email: the SMTP login.
    #[serde(default)]
    pub user: Option<String>,
    /// email: the SMTP password (prefer `password_env`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// email: the environment variable holding the SMTP password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// ntfy: the topic.
    #[serde(default)]
    pub topic: Option<String>,
    /// ntfy: an access token (prefer `token_env`).
    #[serde(default)]
    pub token: Option<Secret>,
    /// ntfy: the environment variable holding the access token.
    #[serde(default)]
    pub token_env: Option<String>,
}

/// A password, a token or a header value: kept out of `Debug` output (and
/// so out of logs).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A channel checked and with its secrets read: what the rule sends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    Webhook(WebhookSpec),
    Email(EmailSpec),
    Ntfy(NtfySpec),
    Sms(SmsSpec),
    Log,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    pub url: String,
    pub headers: Vec<(String, Secret)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailSpec {
    pub server: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub from: String,
    pub to: String,
    pub credentials: Option<(String, Secret)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtfySpec {
    pub server: String,
    pub topic: String,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsSpec {
    pub url: String,
    pub method: String,
    pub to: String,
    pub body: Option<String>,
    pub content_type: String,
    pub headers: Vec<(String, Secret)>,
}

impl HomeConfig {
    /// Checks the whole configuration; the error names the recipient and
    /// channel concerned and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        if self.escalate.iter().any(Duration::is_zero)
            || self.escalate.windows(2).any(|pair| pair[0] >= pair[1])
        {
            return Err(
                "notify: escalate must be strictly increasing delays above 0 (e.g. [\"5m\", \"15m\", \"30m\"])"
                    .to_owned(),
            );
        }
        if !(0.0..=100.0).contains(&self.battery_below) {
            return Err("notify: battery_below must be between 0 and 100".to_owned());
        }
        if self.silent_after.is_some_and(|d| d.is_zero()) {
            return Err(
                "notify: silent_after must be above 0 (leave it out to turn it off)".to_owned(),
            );
        }
        check_retry("notify.retry", self.retry.tries, self.retry.backoff)?;
        if self.retry.timeout.is_zero() {
            return Err("notify.retry: timeout must be above 0".to_owned());
        }
        if self.retry.max_backoff < self.retry.backoff {
            return Err("notify.retry: max_backoff must be at least backoff".to_owned());
        }
        let mut names = BTreeSet::new();
        for recipient in &self.recipients {
            let name = &recipient.name;
            if name.trim().is_empty() {
                return Err("notify: a recipient has an empty name".to_owned());
            }
            if !names.insert(name.as_str()) {
                return Err(format!("notify: recipient {name:?} is listed twice"));
            }
            if recipient.channels.is_empty() {
                return Err(format!("notify: recipient {name:?} has no channels"));
            }
            if let Some(limit) = recipient.rate_limit {
                if limit.max == 0 || limit.period.is_zero() {
                    return Err(format!(
                        "notify: recipient {name:?}: rate_limit needs max and period above 0"
                    ));
                }
            }
            let mut channels = BTreeSet::new();
            for channel in &recipient.channels {
                if channel.name.trim().is_empty() {
                    return Err(format!(
                        "notify: recipient {name:?} has a channel with an empty name"
                    ));
                }
                if !channels.insert(channel.name.as_str()) {
                    return Err(format!(
                        "notify: recipient {name:?} has two channels named {:?}",
                        channel.name
                    ));
                }
                // Secrets are read when the notify rule starts, so the other
                // rules start without them.
                channel
                    .spec_with(&|_| Some(String::new()))
                    .map_err(|problem| {
                        format!(
                            "notify: recipient {name:?}, channel {:?} ({}): {problem}",
                            channel.name,
                            channel.kind.name()
                        )
                    })?;
                check_retry(
                    &format!("notify: recipient {name:?}, channel {:?}", channel.name),
                    channel.tries.unwrap_or(self.retry.tries),
                    channel.backoff.unwrap_or(self.retry.backoff),
                )?;
            }
        }
        if !self.recipients.is_empty() && self.recipients.iter().all(|r| r.backup) {
            return Err(
                "notify: every recipient is a backup; at least one must be told first".to_owned(),
            );
        }
        Ok(())
    }

    /// The retry settings of one channel.
    pub fn retry_of(&self, channel: &ChannelConfig) -> Retry {
        Retry {
            tries: channel.tries.unwrap_or(self.retry.tries),
            backoff: channel.backoff.unwrap_or(self.retry.backoff),
            ..self.retry.clone()
        }
    }

    /// A recipient by name.
    pub fn recipient(&self, name: &str) -> Option<&Recipient> {
        self.recipients.iter().find(|r| r.name == name)
    }
}

fn check_retry(what: &str, tries: u32, backoff: Duration) -> Result<(), String> {
    if tries == 0 {
        return Err(format!("{what}: tries must be at least 1"));
    }
    if backoff.is_zero() {
        return Err(format!("{what}: backoff must be above 0"));
    }
    Ok(())
}

impl ChannelConfig {
    /// The channel checked, with secrets read from the environment.
    pub fn spec(&self) -> Result<ChannelSpec, String> {
        self.spec_with(&|variable| std::env::var(variable).ok())
    }

    /// [`Self::spec`] with environment variables read by `env`.
    fn spec_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<ChannelSpec, String> {
        let allowed: &[&str] = match self.kind {
            ChannelKind::Webhook => &["url", "headers", "headers_env"],
            ChannelKind::Email => &[
                "server",
                "port",
                "tls",
                "from",
                "to",
                "user",
                "password",
                "password_env",
            ],
            ChannelKind::Ntfy => &["server", "topic", "token", "token_env"],
            ChannelKind::Sms => &[
                "url",
                "method",
                "to",
                "body",
                "content_type",
                "headers",
                "headers_env",
            ],
            ChannelKind::Log => &[],
        };
        if let Some(field) = self
            .fields_set()
            .into_iter()
            .find(|field| !allowed.contains(field))
        {
            return Err(format!(
                "`{field}` does not apply to a {} channel",
                self.kind.name()
            ));
        }
        match self.kind {
            ChannelKind::Webhook => {
                let url = required(&self.url, "url")?;
                check_url(url)?;
                Ok(ChannelSpec::Webhook(WebhookSpec {
                    url: url.to_owned(),
                    headers: self.headers(env)?,
                }))
            }
            ChannelKind::Email => {
                let tls = self.tls.unwrap_or(SmtpTls::Starttls);
                let server = required(&self.server, "server")?;
                if server.contains("://") || server.contains('/') {
                    return Err(format!(
                        "server must be a host name (smtp.example.com), not {server:?}"
                    ));
                }
                let from = required(&self.from, "from")?;
                let to = required(&self.to, "to")?;
                for (field, address) in [("from", from), ("to", to)] {
                    address.parse::<lettre::message::Mailbox>().map_err(|e| {
                        format!("{field} {address:?} is not an e-mail address: {e}")
                    })?;
                }
                let password = secret(&self.password, &self.password_env, "password", env)?;
                let credentials = match (&self.user, password) {
                    (Some(user), Some(password)) => Some((user.clone(), password)),
                    (None, None) => None,
                    (Some(_), None) => return Err("user is set but no password(_env)".to_owned()),
                    (None, Some(_)) => return Err("a password is set but no user".to_owned()),
                };
                Ok(ChannelSpec::Email(EmailSpec {
                    server: server.to_owned(),
                    port: self.port.unwrap_or(match tls {
                        SmtpTls::Starttls => 587,
                        SmtpTls::Tls => 465,
                        SmtpTls::None => 25,
                    }),
                    tls,
                    from: from.to_owned(),
                    to: to.to_owned(),
                    credentials,
                }))
            }
            ChannelKind::Ntfy => {
                let server = self
                    .server
                    .as_deref()
                    .unwrap_or("https://ntfy.sh")
                    .trim_end_matches('/');
                check_url(server)?;
                let topic = required(&self.topic, "topic")?;
                if topic.contains('/') || topic.contains(char::is_whitespace) {
                    return Err(format!(
                        "topic {topic:?} must be one path segment without spaces"
                    ));
                }
                Ok(ChannelSpec::Ntfy(NtfySpec {
                    server: server.to_owned(),
                    topic: topic.to_owned(),
                    token: secret(&self.token, &self.token_env, "token", env)?,
                }))
            }
            ChannelKind::Sms => {
                let url = required(&self.url, "url")?;
                let to = required(&self.to, "to")?;
                let method = self
                    .method
                    .as_deref()
                    .unwrap_or("POST")
                    .to_ascii_uppercase();
                if !matches!(method.as_str(), "POST" | "PUT" | "GET") {
                    return Err(format!("method must be POST, PUT or GET, not {method:?}"));
                }
                check_url(&url.replace("{to}", "0").replace("{message}", "m"))?;
                let in_body = self
                    .body
                    .as_deref()
                    .is_some_and(|b| b.contains("{message}"));
                if !in_body && !url.contains("{message}") {
                    return Err(
                        "neither body nor url has a {message} placeholder: the SMS would be empty"
                            .to_owned(),
                    );
                }
                if method == "GET" && self.body.is_some() {
                    return Err("a GET request has no body; put the placeholders in url".to_owned());
                }
                Ok(ChannelSpec::Sms(SmsSpec {
                    url: url.to_owned(),
                    method,
                    to: to.to_owned(),
                    body: self.body.clone(),
                    content_type: self
                        .content_type
                        .clone()
                        .unwrap_or_else(|| "application/json".to_owned()),
                    headers: self.headers(env)?,
                }))
            }
            ChannelKind::Log => Ok(ChannelSpec::Log),
        }
    }

    fn fields_set(&self) -> Vec<&'static str> {
        let options = [
            ("url", self.url.is_some()),
            ("headers", !self.headers.is_empty()),
            ("headers_env", !self.headers_env.is_empty()),
            ("method", self.method.is_some()),
            ("to", self.to.is_some()),
            ("body", self.body.is_some()),
            ("content_type", self.content_type.is_some()),
            ("server", self.server.is_some()),
            ("port", self.port.is_some()),
            ("tls", self.tls.is_some()),
            ("from", self.from.is_some()),
            ("user", self.user.is_some()),
            ("password", self.password.is_some()),
            ("password_env", self.password_env.is_some()),
            ("topic", self.topic.is_some()),
            ("token", self.token.is_some()),
            ("token_env", self.token_env.is_some()),
        ];
        options
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| name)
            .collect()
    }

    fn headers(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, Secret)>, String> {
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            headers.push((name.clone(), Secret(value.clone())));
        }
        for (name, variable) in &self.headers_env {
            let value = env(variable).ok_or_else(|| {
                format!("header {name}: environment variable {variable} is not set")
            })?;
            headers.push((name.clone(), Secret(value)));
        }
        for (name, value) in &headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a valid header name"))?;
            reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| format!("the value of header {name} is not a valid header value"))?;
        }
        Ok(headers)
    }
}

fn required<'a>(value: &'a Option<String>, field: &str) -> Result<&'a str, String> {
    match value.as_deref().map(str::trim) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(format!("{field} is missing")),
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?} is not valid: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("url {url:?} must be http:// or https://"));
    }
    Ok(())
}

/// A secret given inline or by the name of an environment variable.
fn secret(
    inline: &Option<Secret>,
    variable: &Option<String>,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    match (inline, variable) {
        (Some(_), Some(_)) => Err(format!("set {field} or {field}_env, not both")),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(variable)) if variable.trim().is_empty() => Err(format!(
            "{field}_env is empty: it names an environment variable"
        )),
        (None, Some(variable)) => env(variable)
            .map(|value| Some(Secret(value)))
            .ok_or_else(|| format!("{field}_env: environment variable {variable} is not set")),
        (None, None) => Ok(None),
    }
}

/// `["5m", "15m"]` as durations.
fn durations<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    let list = Vec::<humantime_serde::Serde<Duration>>::deserialize(deserializer)?;
    Ok(list
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HomeConfig, String> {
        let config: HomeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn an_empty_section_is_valid_with_the_defaults() {
        let config = parse("").unwrap();
        assert!(config.recipients.is_empty());
        assert_eq!(config.dedup_window, Duration::from_secs(600));
        assert_eq!(config.escalate.len(), 3);
        assert_eq!(config.battery_below, 15.0);
        assert_eq!(config.silent_after, None);
    }

    #[test]
    fn every_kind_of_channel_reads_into_its_spec() {
        let config = parse(
            r#"
            escalate = ["1m", "2m"]
            [[recipients]]
            name = "alice"
            quiet_hours = "22:00-07:00"
            rate_limit = { max = 3, period = "1h" }
            [[recipients.channels]]
            name = "hook"
            kind = "webhook"
            url = "http://127.0.0.1:9/hook"
            headers = { X-Token = "abc" }
            [[recipients.channels]]
            name = "mail"
            kind = "email"
            server = "smtp.example.com"
            tls = "tls"
            from = "hearth <hearth@example.com>"
            to = "alice@example.com"
            [[recipients.channels]]
            name = "push"
            kind = "ntfy"
            topic = "alice"
            tries = 2
            [[recipients.channels]]
            name = "sms"
            kind = "sms"
            url = "https://sms.example.com/send"
            to = "+4912345"
            body = '{"to":"{to}","text":"{message}"}'
            [[recipients.channels]]
            name = "log"
            kind = "log"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.escalate,
            [Duration::from_secs(60), Duration::from_secs(120)]
        );
        let specs: Vec<ChannelSpec> = config.recipients[0]
            .channels
            .iter()
            .map(|c| c.spec().unwrap())
            .collect();
        assert!(matches!(&specs[1], ChannelSpec::Email(e) if e.port == 465));
        assert!(
            matches!(&specs[2], ChannelSpec::Ntfy(n) if n.server == "https://ntfy.sh" && n.token.is_none())
        );
        assert!(matches!(&specs[3], ChannelSpec::Sms(s) if s.method == "POST"));
        assert_eq!(specs[4], ChannelSpec::Log);
        assert_eq!(config.retry_of(&config.recipients[0].channels[2]).tries, 2);
    }

    #[test]
    fn errors_name_the_recipient_the_channel_and_the_problem() {
        let cases = [
            (
                "[[recipients]]\nname = \"alice\"\n[[recipients.channels]]\nname = \"hook\"\nkind = \"webhook\"\n",
                "recipient \"alice\", channel \"hook\" (webhook): url is missing",
            ),
            (
                "[[recipients]]\nname = \"bob\"\n[[recipients.channels]]\nname = \"push\"\nkind = \"ntfy\"\ntopic = \"t\"\nport = 25\n",
                "recipient \"bob\", channel \"push\" (ntfy): `port` does not apply to a ntfy channel",
            ),
            (
                "[[recipients]]\nname = \"bob\"\n[[recipients.channels]]\nname = \"mail\"\nkind = \"email\"\nserver = \"s\"\nfrom = \"not an address\"\nto = \"x@y.z\"\n",
                "channel \"mail\" (email): from \"not an address\" is not an e-mail address",
            ),
            (
                "[[recipients]]\nname = \"bob\"\n[[recipients.channels]]\nname = \"sms\"\nkind = \"sms\"\nurl = \"https://x\"\nto = \"1\"\nbody = \"hi\"\n",
                "neither body nor url has a {message} placeholder",
            ),
            (
                "[[recipients]]\nname = \"bob\"\nchannels = []\n",
                "recipient \"bob\" has no channels",
            ),
            (
                "[[recipients]]\nname = \"bob\"\nrate_limit = { max = 0, period = \"1h\" }\n[[recipients.channels]]\nname = \"l\"\nkind = \"log\"\n",
                "recipient \"bob\": rate_limit",
            ),
            ("escalate = [\"15m\", \"5m\"]\n", "escalate must be strictly increasing"),
            (
                "[[recipients]]\nname = \"a\"\n[[recipients.channels]]\nname = \"l\"\nkind = \"log\"\n[[recipients]]\nname = \"a\"\n[[recipients.channels]]\nname = \"l\"\nkind = \"log\"\n",
                "recipient \"a\" is listed twice",
            ),
            (
                "[[recipients]]\nname = \"a\"\nquiet_hours = \"22:00-25:00\"\n[[recipients.channels]]\nname = \"l\"\nkind = \"log\"\n",
                "\"25:00\" is not a time of day",
            ),
            (
                "[[recipients]]\nname = \"a\"\n[[recipients.channels]]\nname = \"l\"\nkind = \"pigeon\"\n",
                "pigeon",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }

    #[test]
    fn secrets_are_read_from_the_environment_when_the_rule_starts_only() {
        let config = parse(
            r#"
            [[recipients]]
            name = "bob"
            [[recipients.channels]]
            name = "mail"
            kind = "email"
            server = "smtp.example.com"
            from = "a@b.c"
            to = "x@y.z"
            user = "u"
            password_env = "HEARTH_TEST_SURELY_UNSET"
            "#,
        )
        .expect("valid: the other rules start without the notify secrets");
        let error = config.recipients[0].channels[0].spec().unwrap_err();
        assert_eq!(
            error,
            "password_env: environment variable HEARTH_TEST_SURELY_UNSET is not set"
        );
        let spec = config.recipients[0].channels[0]
            .spec_with(&|variable| {
                (variable == "HEARTH_TEST_SURELY_UNSET").then(|| "secret".to_owned())
            })
            .unwrap();
        assert!(
            matches!(&spec, ChannelSpec::Email(e) if e.credentials == Some(("u".to_owned(), Secret("secret".to_owned()))))
        );
        assert!(!format!("{spec:?}").contains("secret"), "{spec:?}");
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let retry = Retry {
            tries: 10,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        };
        let delays: Vec<u64> = (1..=5).map(|n| retry.delay_after(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 60, 60]);
    }
}
