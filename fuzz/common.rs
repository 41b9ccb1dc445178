//! Shared by the fuzz targets (each includes it with `#[path]`).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Header fields from `name: value` lines of arbitrary bytes: those `http` accepts.
pub fn headers_from_lines(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    headers
}
