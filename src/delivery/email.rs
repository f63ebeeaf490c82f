//! Email over SMTP: lettre's async transport with a pool of connections.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::{Claimed, Outcome};

/// How long one SMTP exchange may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends the emails of one instance.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// What an email delivery's payload holds (see `plan::email`).
#[derive(Deserialize)]
struct Parts {
    kind: String,
    title: String,
    body: String,
    link: Option<String>,
}

impl Mailer {
    /// A mailer for the server at `url` (`smtp://`, `smtps://`), sending as
    /// `from`, with up to `connections` open at once.
    pub fn new(url: &str, from: &str, connections: usize) -> anyhow::Result<Self> {
        let from: Mailbox = from.parse().map_err(|err| {
            anyhow::anyhow!("PODIUM_EMAIL_FROM {from:?} is not an address: {err}")
        })?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|err| anyhow::anyhow!("PODIUM_SMTP_URL is not usable: {err}"))?
            .timeout(Some(TIMEOUT))
            .pool_config(
                PoolConfig::new()
                    .max_size(u32::try_from(connections).unwrap_or(u32::MAX))
                    .idle_timeout(Duration::from_secs(60)),
            )
            .build();
        Ok(Self { transport, from })
    }

    /// One try of an email delivery.
    pub async fn send(&self, delivery: &Claimed) -> Outcome {
        let message = match self.message(delivery) {
            Ok(message) => message,
            Err(error) => {
                return Outcome::Permanent {
                    status_code: None,
                    error,
                }
            }
        };
        match self.transport.send(message).await {
            Ok(response) => Outcome::Delivered {
                status_code: Some(u16::from(response.code())),
            },
            Err(err) => {
                let status_code = err
                    .status()
                    .and_then(|code| code.to_string().parse::<u16>().ok());
                let error = err.to_string();
                if err.is_permanent() {
                    Outcome::Permanent { status_code, error }
                } else {
                    // 4xx, connection refused or reset, timeouts, TLS trouble:
                    // all may pass.
                    Outcome::Temporary { status_code, error }
                }
            }
        }
    }

    /// The email of `delivery`: plain text and HTML, with the message id as
    /// its `Message-ID` (the same on every try).
    fn message(&self, delivery: &Claimed) -> Result<Message, String> {
        let parts = Parts::deserialize(&delivery.payload)
            .map_err(|err| format!("an email delivery's payload is malformed: {err}"))?;
        let to: Mailbox = delivery
            .target
            .parse()
            .map_err(|err| format!("{:?} is not an address: {err}", delivery.target))?;
        let (text, html) = bodies(&parts);
        let domain = self.from.email.domain().to_string();
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(parts.title.clone())
            .message_id(Some(format!("<{}@{domain}>", delivery.message_id)))
            .header(PodiumKind(parts.kind.clone()))
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|err| format!("cannot build the email: {err}"))
    }
}

/// The plain-text and HTML bodies of a notification.
fn bodies(parts: &Parts) -> (String, String) {
    let mut text = format!("{}\n\n{}\n", parts.title, parts.body);
    let mut html = format!(
        "<!doctype html><html><body><h1>{}</h1><p>{}</p>",
        escape(&parts.title),
        escape(&parts.body).replace('\n', "<br>")
    );
    if let Some(link) = &parts.link {
        text.push_str(&format!("\n{link}\n"));
        html.push_str(&format!("<p><a href=\"{0}\">{0}</a></p>", escape(link)));
    }
    html.push_str("</body></html>");
    (text, html)
}

fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `X-Podium-Kind`: the notification's kind, for receivers' filters.
#[derive(Clone)]
struct PodiumKind(String);

impl lettre::message::header::Header for PodiumKind {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str("X-Podium-Kind")
    }

    fn parse(raw: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(raw.to_string()))
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_escape_what_html_would_read_as_markup() {
        let parts = Parts {
            kind: "announcement".into(),
            title: "Exams <soon>".into(),
            body: "Bring a pen & paper\nand water".into(),
            link: Some("https://x.org/?a=1&b=\"2\"".into()),
        };
        let (text, html) = bodies(&parts);
        assert!(text.contains("Bring a pen & paper\nand water"));
        assert!(text.contains("https://x.org/?a=1&b=\"2\""));
        assert!(html.contains("<h1>Exams &lt;soon&gt;</h1>"));
        assert!(html.contains("pen &amp; paper<br>and water"));
        assert!(html.contains("href=\"https://x.org/?a=1&amp;b=&quot;2&quot;\""));
    }
}
