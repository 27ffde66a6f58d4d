"""Fine-tuning: rows -> tokenised examples -> LoRA (or full) classifier under Ray Train -> merge."""
