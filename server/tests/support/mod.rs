//! Helpers shared by the Kafka tests: a producer on the test broker and a send that
//! returns the record's offset.

// NOTE: each test binary that includes this module uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

use millrace_sqllogictest::broker::Broker;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A producer on `broker` that gives up on a message after 10 s.
pub fn producer(broker: &Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

/// Produces `payload` (keyed `k<partition>`) to `partition` and returns its offset.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    payload: &[u8],
) -> i64 {
    let key = format!("k{partition}");
    let record = FutureRecord::to(topic)
        .partition(partition)
        .key(&key)
        .payload(payload);
    match producer.send(record, Duration::from_secs(10)).await {
        Ok(delivery) => delivery.offset,
        Err((e, _)) => panic!("produce to {topic}/{partition}: {e}"),
    }
}
