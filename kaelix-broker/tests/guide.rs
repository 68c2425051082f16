//! The user's guide snippets ("Creating Messages", "Working with
//! MessageBatch", "Setting up Pub/Sub", "Memory Optimization", "Example
//! Test"), as written there, plus the imports the guide leaves implicit.

use bytes::Bytes;
use kaelix_broker::MessageBroker;
use kaelix_core::{Message, MessageBatch, MessagePool, PartitionId, Topic};

#[test]
fn creating_messages() -> Result<(), Box<dyn std::error::Error>> {
    // Simple message creation
    let topic = Topic::new("events.user.signup")?;
    let payload = Bytes::from("user_data");
    let message = Message::new(topic, payload)?;
    assert_eq!(message.topic.as_str(), "events.user.signup");

    // Using builder pattern
    let message = Message::builder()
        .topic("events.user.signup")
        .payload(Bytes::from(
            r#"{"userId": "12345", "email": "user@example.com"}"#,
        ))
        .header("content-type", "application/json")
        .header("timestamp", "2024-01-15T10:30:00Z")
        .partition(PartitionId::new(1))
        .build()?;
    assert_eq!(message.header("content-type"), Some("application/json"));
    assert_eq!(message.header("timestamp"), Some("2024-01-15T10:30:00Z"));
    assert_eq!(message.partition, Some(PartitionId::new(1)));

    let err = Topic::new("events/user signup").unwrap_err();
    assert!(err
        .to_string()
        .starts_with("Topic name contains invalid characters"));
    Ok(())
}

#[test]
fn working_with_message_batch() -> Result<(), Box<dyn std::error::Error>> {
    let topic = Topic::new("events.batch")?;
    let make = |n: usize| -> Result<Vec<Message>, kaelix_core::Error> {
        (0..n)
            .map(|i| Message::new(topic.clone(), format!("m{i}")))
            .collect()
    };
    let [message1, message2, message3]: [Message; 3] = make(3)?.try_into().unwrap();
    let (batch1, batch2, batch3) = (
        MessageBatch::new(make(250)?),
        MessageBatch::new(make(2)?),
        MessageBatch::new(make(1)?),
    );

    // Create batch from messages
    let messages = vec![message1, message2, message3];
    let batch = MessageBatch::new(messages);

    // Split large batch
    let smaller_batches = batch1.split(100); // 100 messages per batch
    assert_eq!(
        smaller_batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        [100, 100, 50]
    );

    // Merge multiple batches
    let merged = MessageBatch::merge(vec![batch1, batch2, batch3]);
    assert_eq!(merged.len(), 253);
    assert_eq!(
        merged.total_bytes(),
        merged.iter().map(Message::size_bytes).sum::<usize>()
    );

    // Process batch
    let mut seen = 0;
    for message in batch {
        // Process each message
        println!("Processing message: {}", message.id);
        seen += 1;
    }
    assert_eq!(seen, 3);
    Ok(())
}

#[tokio::test]
async fn setting_up_pub_sub() -> Result<(), Box<dyn std::error::Error>> {
    // Create and start broker
    let broker = MessageBroker::new();
    broker.start().await?;

    // Create topic
    let topic = Topic::new("events.notifications")?;

    // Subscribe to topic
    let mut receiver = broker.subscribe(&topic).await?;

    // Publish messages
    let message = Message::new(topic.clone(), Bytes::from("Hello, World!"))?;
    broker.publish(&topic, message).await?;

    // Receive messages
    let handle = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(message) = receiver.recv().await {
            println!("Received: {:?}", message);
            got.push(message.payload);
        }
        got
    });

    // Get broker statistics
    let stats = broker.stats();
    println!("Broker stats: {}", stats);
    assert!(stats.to_string().contains("1 published"), "{stats}");

    broker.shutdown().await?;
    assert_eq!(handle.await?, [Bytes::from("Hello, World!")]);
    Ok(())
}

#[tokio::test]
async fn publishing_before_start_says_so() {
    let broker = MessageBroker::new();
    let topic = Topic::new("events.early").unwrap();
    let message = Message::new(topic.clone(), Bytes::from("x")).unwrap();
    let err = broker.publish(&topic, message).await.unwrap_err();
    assert_eq!(err.to_string(), "Broker is not running");
}

#[test]
fn memory_optimization() -> Result<(), Box<dyn std::error::Error>> {
    let topic = Topic::new("events.pooled")?;
    let payload = Bytes::from("pooled");

    // Use object pools for frequent allocations
    let message_pool = MessagePool::new(1000);

    // Reuse message instances
    let mut message = message_pool.acquire();
    message.reset();
    message.set_topic(topic);
    message.set_payload(payload);
    assert_eq!(message.topic.as_str(), "events.pooled");
    assert_eq!(message.payload, "pooled");

    // Return to pool when done
    message_pool.release(message);
    assert_eq!(message_pool.available(), 1);
    let again = message_pool.acquire();
    assert!(
        again.payload.is_empty(),
        "a released message comes back cleared"
    );
    Ok(())
}

#[tokio::test]
async fn test_message_broker_pub_sub() {
    let broker = MessageBroker::new();
    broker.start().await.unwrap();

    let topic = Topic::new("test.topic").unwrap();
    let mut receiver = broker.subscribe(&topic).await.unwrap();

    let message = Message::new(topic.clone(), Bytes::from("test payload")).unwrap();

    broker.publish(&topic, message.clone()).await.unwrap();

    let received = tokio::time::timeout(std::time::Duration::from_millis(100), receiver.recv())
        .await
        .unwrap()
        .unwrap();

    assert_eq!(received.payload, message.payload);
}
