//! The standard AWS environment, shared by every AWS client (S3, DynamoDB): credentials and
//! region as the SDK finds them, one retry policy, and the endpoint variables that point a
//! client at another server.

/// Attempts per request, the first included: the SDK's standard mode retries throttling and 5xx
/// answers with exponential backoff.
pub const MAX_ATTEMPTS: u32 = 6;

/// SDK configuration from the environment, with cuboids' retry policy (`AWS_MAX_ATTEMPTS`
/// overrides the number of attempts, as in the AWS CLI).
pub async fn sdk_config() -> aws_config::SdkConfig {
    let attempts = std::env::var("AWS_MAX_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(MAX_ATTEMPTS);
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts))
        .load()
        .await
}

/// The endpoint set for one service (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_DYNAMODB`...) or
/// for all (`AWS_ENDPOINT_URL`); `None` means AWS itself.
pub fn endpoint(service_var: &str) -> Option<String> {
    [service_var, "AWS_ENDPOINT_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
}
