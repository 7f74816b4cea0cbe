"""Parameter-efficient fine-tuning: LoRA (optionally on a quantised base) and prompt tuning, saved in
Hugging Face PEFT's adapter format."""
