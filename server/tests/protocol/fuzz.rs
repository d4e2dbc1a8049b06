//! Random bytes against the wire protocol and COPY input: garbage startup packets, messages
//! of random types, truncated, oversized and lying lengths, Bind and Parse with huge counts,
//! invalid UTF-8, and COPY data with invalid text, huge field counts and long lines, ended
//! by CopyDone, CopyFail or a dropped connection. Seeded (`WIRE_FUZZ_SEED` replays a run,
//! `WIRE_FUZZ_CASES` sets its size, 400 by default) and bounded in time (40 s of cases).
//!
//! After every case the server must still be up; at the end the table the COPYs went to
//! holds exactly the rows of the COPYs that reported `COPY n`, and a new session answers.

use std::time::{Duration, Instant};

use millrace_sqllogictest::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A small seeded generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Fewer than `most` random bytes.
    fn bytes(&mut self, most: u64) -> Vec<u8> {
        let n = self.below(most);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A frontend message: tag, length (counting itself), body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// The startup packet of protocol 3.0 for user and database `millrace`.
fn startup_packet() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0millrace\0database\0millrace\0\0");
    let mut m = (body.len() as i32 + 4).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

/// Backend messages read until ReadyForQuery, the end of the stream or `wait` without a
/// byte: `(tag, body)`, and whether ReadyForQuery came.
async fn read_until_ready(stream: &mut TcpStream, wait: Duration) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut buffer = Vec::new();
    let mut messages = Vec::new();
    loop {
        // Whole messages in the buffer first.
        while buffer.len() >= 5 {
            let len = i32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
            let Ok(len) = usize::try_from(len) else {
                return (messages, false);
            };
            if buffer.len() < len + 1 {
                break;
            }
            let tag = buffer[0];
            let body = buffer[5..len + 1].to_vec();
            buffer.drain(..len + 1);
            messages.push((tag, body));
            if tag == b'Z' {
                return (messages, true);
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
            _ => return (messages, false),
        }
    }
}

/// A session past its startup, or `None` if the server would not have it.
async fn session(port: u16) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(&startup_packet()).await.ok()?;
    let (_, ready) = read_until_ready(&mut stream, Duration::from_secs(5)).await;
    ready.then_some(stream)
}

/// A garbage startup packet: random or lying length, random bytes.
async fn garbage_startup(rng: &mut Rng, port: u16) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let body = rng.bytes(200);
    let len: i32 = match rng.below(4) {
        0 => body.len() as i32 + 4,
        1 => i32::MAX,
        2 => -(rng.below(1000) as i32),
        _ => rng.next() as i32,
    };
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let _ = stream.write_all(&packet).await;
    let _ = read_until_ready(&mut stream, Duration::from_millis(300)).await;
}

/// One bad frontend message in a live session, then a valid query.
async fn bad_message(rng: &mut Rng, port: u16) {
    let Some(mut stream) = session(port).await else {
        return;
    };
    let tags = b"QPBEDSHCXdcfpFr";
    let tag = tags[rng.below(tags.len() as u64) as usize];
    let packet = match rng.below(6) {
        // Random body, honest length.
        0 => message(tag, &rng.bytes(300)),
        // A query of invalid UTF-8, with or without its NUL.
        1 => {
            let mut body = rng.bytes(50);
            body.push(0xff);
            if rng.below(2) == 0 {
                body.push(0);
            }
            message(b'Q', &body)
        }
        // A length larger than what follows (the rest never comes), or absurd.
        2 => {
            let mut m = message(tag, &rng.bytes(40));
            let lie: i32 = match rng.below(3) {
                0 => i32::MAX,
                1 => 1 << 30,
                _ => m.len() as i32 + 100,
            };
            m[1..5].copy_from_slice(&lie.to_be_bytes());
            m
        }
        // A length smaller than its own header.
        3 => {
            let mut m = message(tag, &rng.bytes(9));
            m[1..5].copy_from_slice(&(rng.below(4) as i32).to_be_bytes());
            m
        }
        // Bind announcing 32,767 formats and parameters it does not carry.
        4 => {
            let mut body = b"\0\0".to_vec();
            body.extend_from_slice(&i16::MAX.to_be_bytes());
            body.extend_from_slice(&[0, 1]);
            body.extend_from_slice(&i16::MAX.to_be_bytes());
            body.extend_from_slice(&i32::MAX.to_be_bytes());
            message(b'B', &body)
        }
        // Parse of a statement announcing 32,767 parameter types.
        _ => {
            let mut body = b"s\0SELECT $1\0".to_vec();
            body.extend_from_slice(&i16::MAX.to_be_bytes());
            body.extend_from_slice(&rng.bytes(64));
            message(b'P', &body)
        }
    };
    let _ = stream.write_all(&packet).await;
    let _ = stream.write_all(&message(b'S', &[])).await;
    let _ = read_until_ready(&mut stream, Duration::from_millis(300)).await;
    let _ = stream.write_all(&message(b'Q', b"SELECT 1\0")).await;
    let _ = read_until_ready(&mut stream, Duration::from_millis(300)).await;
}

/// One COPY into `fz` of random lines; the rows it reports it copied.
async fn bad_copy(rng: &mut Rng, port: u16, next_key: &mut u64) -> u64 {
    let Some(mut stream) = session(port).await else {
        return 0;
    };
    let copy = if rng.below(2) == 0 {
        "COPY fz FROM STDIN\0"
    } else {
        "COPY fz FROM STDIN WITH (FORMAT csv)\0"
    };
    let csv = copy.contains("csv");
    if stream
        .write_all(&message(b'Q', copy.as_bytes()))
        .await
        .is_err()
    {
        return 0;
    }
    // CopyInResponse ('G') comes without a ReadyForQuery after it.
    let mut head = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await {
        Ok(Ok(n)) if n > 0 && head[0] == b'G' => {}
        _ => return 0,
    }
    let separator = if csv { "," } else { "\t" };
    // A third of the COPYs are all good lines, so that some rows land.
    let clean = rng.below(3) == 0;
    for _ in 0..rng.below(5) + 1 {
        let mut data = Vec::new();
        for _ in 0..rng.below(20) + 1 {
            let kind = if clean { 7 } else { rng.below(8) };
            match kind {
                0 => data.extend_from_slice(&rng.bytes(40)),
                1 => {
                    data.extend_from_slice(b"7");
                    data.extend_from_slice(separator.repeat(10_000).as_bytes());
                    data.push(b'\n');
                }
                2 => {
                    data.extend_from_slice(format!("{}{separator}", *next_key).as_bytes());
                    data.extend_from_slice(&[0xc3, 0x28, 0xff, b'\n']);
                    *next_key += 1;
                }
                3 => {
                    let long = "x".repeat(100_000);
                    data.extend_from_slice(format!("{}{separator}{long}\n", *next_key).as_bytes());
                    *next_key += 1;
                }
                _ => {
                    data.extend_from_slice(format!("{}{separator}v\n", *next_key).as_bytes());
                    *next_key += 1;
                }
            }
        }
        if stream.write_all(&message(b'd', &data)).await.is_err() {
            return 0;
        }
    }
    let end = match rng.below(4) {
        0 => message(b'f', b"given up\0"),
        1 => return 0, // the connection drops mid-COPY
        _ => message(b'c', &[]),
    };
    if stream.write_all(&end).await.is_err() {
        return 0;
    }
    let (messages, _) = read_until_ready(&mut stream, Duration::from_secs(10)).await;
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'C')
        .filter_map(|(_, body)| {
            let text = String::from_utf8_lossy(body);
            text.trim_end_matches('\0')
                .strip_prefix("COPY ")
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_wire_and_in_copy_leave_the_server_serving() {
    let seed: u64 = std::env::var("WIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(7)
        });
    let cases: u64 = std::env::var("WIRE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    println!("wire fuzz: seed {seed} (WIRE_FUZZ_SEED={seed} replays), {cases} cases");
    let mut server = TestServer::start(&[]).expect("start millrace");
    let client = server.connect("millrace").await.expect("connect");
    client
        .batch_execute("CREATE TABLE fz (k BIGINT PRIMARY KEY, v TEXT)")
        .await
        .expect("create");
    let mut rng = Rng(seed.max(1));
    let mut next_key = 1;
    let mut copied = 0;
    let started = Instant::now();
    let mut ran = 0;
    for case in 0..cases {
        if started.elapsed() > Duration::from_secs(40) {
            break;
        }
        match rng.below(3) {
            0 => garbage_startup(&mut rng, server.port).await,
            1 => bad_message(&mut rng, server.port).await,
            _ => copied += bad_copy(&mut rng, server.port, &mut next_key).await,
        }
        ran += 1;
        assert!(
            server.is_running(),
            "seed {seed} case {case}: the server died:\n{}",
            server.log()
        );
    }
    println!(
        "wire fuzz: {ran} cases in {:.0} s, {copied} rows copied",
        started.elapsed().as_secs_f64()
    );
    let other = server
        .connect("millrace")
        .await
        .expect("a new session after the fuzz");
    let n: i64 = other
        .query_one("SELECT count(*) FROM fz", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        n as u64, copied,
        "seed {seed}: rows in fz against rows COPY reported"
    );
    let one: i64 = client
        .query_one("SELECT 1::BIGINT", &[])
        .await
        .expect("the first session still answers")
        .get(0);
    assert_eq!(one, 1);
}
