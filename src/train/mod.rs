//! Training building blocks that do not need the model: learning-rate schedules, NF4 storage for
//! QLoRA, GRPO rewards and advantages, PEFT adapter files, and the metrics log.

pub mod adalora;
pub mod metrics_log;
pub mod nf4;
pub mod peft_io;
pub mod rewards;
pub mod schedule;
