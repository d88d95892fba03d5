//! Reading `/metrics`: a plain HTTP/1.1 GET, and the Prometheus text format
//! parsed into series a test can look up by name and labels.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `GET path` on `addr`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8(response).expect("UTF-8"))
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the metrics listener answers within 10 s")
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_owned())
}

/// One sample: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The samples of one scrape, and its `# TYPE` lines.
#[derive(Debug, Default)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<(Series, f64)>,
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut scrape = Scrape {
            text: text.to_owned(),
            ..Scrape::default()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                scrape.types.insert(name.into(), kind.into());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = split_labels(labels)
                .into_iter()
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').replace("\\\"", "\""))
                })
                .collect();
            scrape.samples.push((
                Series {
                    name: name.to_owned(),
                    labels,
                },
                value,
            ));
        }
        scrape
    }

    /// The samples named `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(&Series, f64)> {
        self.samples
            .iter()
            .filter(|(s, _)| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(s, v)| (s, *v))
            .collect()
    }

    /// The sum of the samples `matching`; 0 when there are none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|(_, v)| v).sum()
    }

    /// The one sample `matching`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.matching(name, labels)[..] {
            [(_, value)] => value,
            ref found => panic!(
                "one {name} {labels:?} expected, found {found:?} in\n{}",
                self.text
            ),
        }
    }
}

/// `a="1",b="x,y"` into its pairs, commas inside quotes kept.
fn split_labels(labels: &str) -> Vec<&str> {
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        pairs.push(&labels[start..]);
    }
    pairs
}
