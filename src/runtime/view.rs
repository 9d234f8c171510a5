//! `cuboids view`: serves volumes over HTTP on this machine, with CORS, for a browser-hosted
//! neuroglancer, and prints a neuroglancer link whose state already holds them as layers (images
//! as image layers, segmentations as segmentation layers), like `igneous view`.
//!
//! A small HTTP/1.1 server: GET (and HEAD) of `/<name>/<key>` answers the object `key` of the
//! volume served as `name` (a local directory or `s3://`), with `Content-Encoding: gzip` for
//! gzipped chunks as CloudVolume stores them; OPTIONS answers CORS preflights. It stops on
//! Ctrl-C (or SIGTERM).

use crate::formats::precomputed::info::LayerType;
use crate::store::{ContentEncoding, Store};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The neuroglancer the link opens.
pub const NEUROGLANCER: &str = "https://neuroglancer-demo.appspot.com/";

/// One served volume.
struct Served {
    name: String,
    store: Arc<dyn Store>,
    layer: LayerType,
}

/// A layer name from a location: its last path component.
fn name_of(location: &str) -> String {
    location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("volume")
        .to_string()
}

/// The neuroglancer link whose state shows `layers` served from `base`.
pub fn neuroglancer_link(base: &str, layers: &[(String, LayerType)]) -> String {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(name, layer)| {
            serde_json::json!({
                "type": match layer {
                    LayerType::Image => "image",
                    LayerType::Segmentation => "segmentation",
                },
                "source": format!("precomputed://{base}/{name}"),
                "name": name,
            })
        })
        .collect();
    let state = serde_json::json!({ "layers": layers, "layout": "4panel" }).to_string();
    let encoded = percent_encoding::utf8_percent_encode(&state, percent_encoding::NON_ALPHANUMERIC);
    format!("{NEUROGLANCER}#!{encoded}")
}

/// Serves `locations` on `host:port` (0: any free port) until Ctrl-C or SIGTERM.
pub async fn view(locations: &[String], host: &str, port: u16) -> Result<()> {
    let mut served: HashMap<String, Served> = HashMap::new();
    let mut layers = Vec::new();
    for location in locations {
        let vol = crate::runtime::segmentation::open_input(location).await?;
        let mut name = name_of(location);
        while served.contains_key(&name) {
            name.push('_');
        }
        layers.push((name.clone(), vol.info.layer_type));
        served.insert(
            name.clone(),
            Served {
                name,
                store: vol.store,
                layer: vol.info.layer_type,
            },
        );
    }
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening on {host}:{port}"))?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("serving {} volume(s) on {base}", served.len());
    for s in served.values() {
        println!("  {base}/{} ({:?})", s.name, s.layer);
    }
    println!(
        "open with neuroglancer: {}",
        neuroglancer_link(&base, &layers)
    );
    println!("press Ctrl-C to stop");
    let stop = crate::runtime::activity::shutdown_on_signals()?;
    serve(listener, Arc::new(served), stop).await;
    println!("stopped");
    Ok(())
}

async fn serve(
    listener: TcpListener,
    served: Arc<HashMap<String, Served>>,
    stop: CancellationToken,
) {
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let served = served.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(socket, &served).await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

/// Answers the requests of one connection (keep-alive) until it closes.
async fn connection(socket: TcpStream, served: &HashMap<String, Served>) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut request = String::new();
        if read.read_line(&mut request).await? == 0 {
            return Ok(());
        }
        // Headers: only their end matters here.
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let response = answer(method, target, served).await;
        write.write_all(&response).await?;
    }
}

/// A whole HTTP response.
fn response(status: &str, headers: &[(&str, String)], body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nAccess-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: GET, HEAD, OPTIONS\r\nAccess-Control-Allow-Headers: *\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

async fn answer(method: &str, target: &str, served: &HashMap<String, Served>) -> Vec<u8> {
    let head_only = method == "HEAD";
    match method {
        "OPTIONS" => return response("204 No Content", &[], b"", false),
        "GET" | "HEAD" => {}
        _ => return response("405 Method Not Allowed", &[], b"", false),
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (name, key) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let Some(volume) = served.get(name) else {
        return response("404 Not Found", &[], b"no such volume\n", head_only);
    };
    match volume.store.get(key).await {
        Ok(Some(object)) => {
            let kind = if key == "info" || key.ends_with(".json") {
                "application/json"
            } else {
                "application/octet-stream"
            };
            let mut headers = vec![("Content-Type", kind.to_string())];
            if object.encoding == ContentEncoding::Gzip {
                headers.push(("Content-Encoding", "gzip".to_string()));
            }
            response("200 OK", &headers, &object.data, head_only)
        }
        Ok(None) => response("404 Not Found", &[], b"no such object\n", head_only),
        // A bad key (one that would leave the volume) is the client's error.
        Err(crate::store::StoreError::InvalidKey { .. }) => {
            response("400 Bad Request", &[], b"invalid key\n", head_only)
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "reading an object to serve");
            response("502 Bad Gateway", &[], b"the store failed\n", head_only)
        }
    }
}
