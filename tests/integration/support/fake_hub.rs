//! A local server in the Hugging Face Hub's URL layout, for `HF_ENDPOINT`: the revision API
//! (`/api/models/ORG/NAME/revision/REV` -> sha and file list) and ranged file downloads
//! (`/ORG/NAME/resolve/REV/FILE` with `X-Repo-Commit`, `ETag`, `Content-Range`), as hf-hub and
//! the Python library read them. Branches can be moved while it runs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    /// commit sha -> file name -> bytes
    commits: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// branch -> commit sha
    refs: BTreeMap<String, String>,
}

pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    /// File bodies served (not counting 1-byte metadata probes).
    pub downloads: Arc<AtomicUsize>,
}

impl FakeHub {
    /// Serves `repo` with no commits yet.
    pub fn start(repo: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let downloads = Arc::new(AtomicUsize::new(0));
        let (s, d, r) = (state.clone(), downloads.clone(), repo.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, d, r) = (s.clone(), d.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &r, &s, &d));
            }
        });
        Self {
            endpoint,
            state,
            downloads,
        }
    }

    /// Adds a commit holding `files` and points `branch` at it.
    pub fn commit(&self, sha: &str, branch: &str, files: BTreeMap<String, Vec<u8>>) {
        let mut st = self.state.lock().unwrap();
        st.commits.insert(sha.to_string(), files);
        st.refs.insert(branch.to_string(), sha.to_string());
    }
}

fn serve(stream: TcpStream, repo: &str, state: &Mutex<State>, downloads: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start = 0usize;
    let mut range_end: Option<usize> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
            range_start = a.parse().unwrap_or(0);
            range_end = b.parse().ok();
        }
    }
    let st = state.lock().unwrap();
    let resolve = |rev: &str| -> Option<String> {
        if st.commits.contains_key(rev) {
            Some(rev.to_string())
        } else {
            st.refs.get(rev).cloned()
        }
    };
    let mut out = stream;
    let not_found = |out: &mut TcpStream| {
        let _ = write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    let api_prefix = format!("/api/models/{repo}/revision/");
    let file_prefix = format!("/{repo}/resolve/");
    if let Some(rev) = path.strip_prefix(&api_prefix) {
        let Some(sha) = resolve(rev) else {
            return not_found(&mut out);
        };
        let siblings: Vec<String> = st.commits[&sha]
            .keys()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{repo}\",\"sha\":\"{sha}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    } else if let Some(rest) = path.strip_prefix(&file_prefix) {
        let Some((rev, file)) = rest.split_once('/') else {
            return not_found(&mut out);
        };
        let Some(sha) = resolve(rev) else {
            return not_found(&mut out);
        };
        let Some(bytes) = st.commits[&sha].get(file) else {
            return not_found(&mut out);
        };
        let end = range_end
            .unwrap_or(bytes.len().saturating_sub(1))
            .min(bytes.len() - 1);
        let body = &bytes[range_start.min(bytes.len())..=end];
        if range_end != Some(0) {
            downloads.fetch_add(1, Ordering::SeqCst);
        }
        let etag = format!(
            "{:x}",
            bytes
                .iter()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64))
        );
        let _ = write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nX-Repo-Commit: {sha}\r\nETag: \"{etag}-{}\"\r\nContent-Range: bytes {range_start}-{end}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bytes.len(),
            bytes.len(),
            body.len()
        );
        let _ = out.write_all(body);
    } else {
        not_found(&mut out);
    }
}
