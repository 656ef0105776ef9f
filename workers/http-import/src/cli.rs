//! http-import's flags, and their validation into a [`Config`] (no I/O
//! besides reading the secret files the flags name).

use std::path::PathBuf;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use populator_core::http::{parse_header, HttpOptions};
use populator_core::options::{CommonArgs, ContentArgs, NetworkArgs};
use populator_core::secrets::{read_secret_lines, secret_from};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use url::Url;

/// Fill a volume from an HTTP(S) URL: a file, an extracted tar archive, or a
/// raw image, decompressed on the fly, verified and flushed.
#[derive(clap::Parser, Debug)]
#[command(name = "http-import", version, about, max_term_width = 100)]
pub struct Args {
    /// The source URL (http or https).
    #[arg(long, env = "POPULATOR_URL", value_name = "URL")]
    pub url: Url,

    #[command(flatten)]
    pub content: ContentArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// A request header, "Name: value" (repeatable; not for secrets, use --header-file).
    #[arg(long = "header", env = "POPULATOR_HEADER", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// A file of secret headers, one "Name: value" per line.
    #[arg(long, env = "POPULATOR_HEADER_FILE", value_name = "PATH")]
    pub header_file: Option<PathBuf>,

    /// File holding the user name for basic authentication (or the value
    /// itself in POPULATOR_USERNAME).
    #[arg(long, env = "POPULATOR_USERNAME_FILE", value_name = "PATH")]
    pub username_file: Option<PathBuf>,

    /// File holding the password for basic authentication (or the value
    /// itself in POPULATOR_PASSWORD).
    #[arg(long, env = "POPULATOR_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,

    /// File holding a bearer token (or the value itself in POPULATOR_BEARER_TOKEN).
    #[arg(
        long,
        visible_alias = "token-file",
        env = "POPULATOR_BEARER_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub bearer_token_file: Option<PathBuf>,

    #[command(flatten)]
    pub network: NetworkArgs,

    /// Parallel ranged connections when the server allows ranges.
    #[arg(long, env = "POPULATOR_CONNECTIONS", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connections: u16,
}

/// Validated HTTP settings, secrets read.
pub struct HttpConfig {
    pub options: HttpOptions,
    pub public_headers: HeaderMap,
    pub secret_headers: HeaderMap,
    pub connections: usize,
}

impl HttpArgs {
    pub fn config(&self, url: &Url) -> Result<HttpConfig> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!("--url must be http or https, not {}", url.scheme()),
            ));
        }
        let mut public_headers = HeaderMap::new();
        for line in &self.headers {
            let (name, value) = parse_header(line, false)?;
            public_headers.append(name, value);
        }
        let mut secret_headers = HeaderMap::new();
        if let Some(path) = &self.header_file {
            for line in read_secret_lines(path, "header")? {
                let (name, value) = parse_header(line.expose(), true)?;
                secret_headers.append(name, value);
            }
        }
        let user = secret_from(
            self.username_file.as_deref(),
            "POPULATOR_USERNAME",
            "username",
        )?;
        let pass = secret_from(
            self.password_file.as_deref(),
            "POPULATOR_PASSWORD",
            "password",
        )?;
        let token = secret_from(
            self.bearer_token_file.as_deref(),
            "POPULATOR_BEARER_TOKEN",
            "bearer token",
        )?;
        match (user, pass, token) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(usage("give basic-auth credentials or a bearer token, not both"))
            }
            (Some(user), Some(pass), None) => {
                let encoded = base64_encode(format!("{}:{}", user.expose(), pass.expose()).as_bytes());
                secret_headers.insert(AUTHORIZATION, sensitive(&format!("Basic {encoded}"))?);
            }
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err(usage("basic authentication needs both a username and a password (--username-file, --password-file)"))
            }
            (None, None, Some(token)) => {
                secret_headers.insert(AUTHORIZATION, sensitive(&format!("Bearer {}", token.expose()))?);
            }
            (None, None, None) => {}
        }
        Ok(HttpConfig {
            options: self.network.options()?,
            public_headers,
            secret_headers,
            connections: self.connections as usize,
        })
    }
}

fn usage(message: &str) -> anyhow::Error {
    fail(Kind::Usage, "InvalidConfiguration", message)
}

fn sensitive(value: &str) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            "a credential holds characters not allowed in a header",
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn base64_encode(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }
}
