//! TEMP
pub async fn start(_relay: &crate::serve::Standalone) -> anyhow::Result<()> {
    anyhow::bail!("demo not ready")
}
