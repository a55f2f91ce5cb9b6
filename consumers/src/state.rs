//! Where rules keep their state: JetStream KV buckets, one per rule, read
//! with `nats kv get <bucket> <key>`.

use async_nats::jetstream::{self, kv, stream};

/// Opens the KV bucket `bucket`, creating it (history 1) when missing.
///
/// Created as its backing stream `KV_<bucket>` rather than with
/// `create_key_value`, which asks for account limits in a shape
/// nats-server 2.9 does not answer; `description` is what `nats stream ls`
/// shows for it.
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
) -> Result<kv::Store, async_nats::Error> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(bucket).await?)
}

/// A KV key made of names (home, room, ...): the names joined with `.`,
/// each with the characters KV keys cannot hold written `=XX` (hex of each
/// UTF-8 byte), so `key(&["Flat 2.1", "Küche"])` is `Flat=202=2E1.K=C3=BCche`.
pub fn key(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| escape(name))
        .collect::<Vec<_>>()
        .join(".")
}

/// The names of a key made by [`key`]; `None` if it is not one.
pub fn split_key(key: &str) -> Option<Vec<String>> {
    key.split('.').map(unescape).collect()
}

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

fn unescape(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_and_read_back() {
        for names in [
            vec!["home", "hall"],
            vec!["home", "Living Room"],
            vec!["Flat 2.1", "Küche"],
            vec!["home"],
        ] {
            let key = key(&names);
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=.".contains(c)),
                "{key}"
            );
            assert_eq!(key.matches('.').count(), names.len() - 1, "{key}");
            assert_eq!(
                split_key(&key),
                Some(names.iter().map(|n| n.to_string()).collect())
            );
        }
        assert_eq!(key(&["Flat 2.1", "Küche"]), "Flat=202=2E1.K=C3=BCche");
    }
}
